"""Triton linear scan h_t = a_t ⊙ h_{t−1} + b_t, forward and backward, over ``[B, T, D]``.

One kernel serves every pass. A program owns one batch row, one block of channels and one chunk
of time, and walks its chunk step by step (fp32 in registers, contiguous loads along D). Large
B·D needs no more parallelism than that: one chunk covers all of T. For long T with small B·D,
T is cut into chunks that run in parallel, in three launches:

1. each chunk is scanned from a zero state, keeping only its end state and the product of its a;
2. those per-chunk (product, end state) pairs are scanned (a tiny scan over chunks) to give the
   state entering every chunk;
3. every chunk is scanned again from its entering state, writing h.

The backward pass is the same scan in reverse time with the coefficients shifted by one
(g_t = dh_t + a_{t+1} ⊙ g_{t+1}); its last launch also writes da_t = g_t ⊙ h_{t−1} and db_t = g_t.

A step is one multiply-add, so waiting for its loads would be nearly all of its time: the loop is
software-pipelined as in :mod:`rnnpipe.kernels.triton_rnn` (each pass issues the next step's
loads, then does this step's math and stores on values loaded one pass earlier), and every tensor
is read by its strides, so the launchers copy nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scan_kernel(
    COEF, X, INIT, OUT, SUM_P, SUM_H, HPREV, H0, DCOEF, T, D, CHUNK,
    a_sb, a_st, a_sd, x_sb, x_st, x_sd, i_sb, i_sc, i_sd, o_sb, o_st, o_sd,
    hp_sb, hp_st, hp_sd, h0_sb, h0_sd,
    REVERSE: tl.constexpr, SHIFT: tl.constexpr, HAS_INIT: tl.constexpr, WRITE_OUT: tl.constexpr,
    WRITE_SUM: tl.constexpr, WRITE_DCOEF: tl.constexpr, HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One chunk of time of one batch row's block of channels. COEF, X, HPREV [B, T, D] and H0
    [B, D] of any strides; INIT [B, n_chunks, D] (or [B, D]: i_sc unused with one chunk) likewise;
    OUT and DCOEF share the strides ``o_*``; SUM_P, SUM_H are contiguous [B, n_chunks, D] fp32."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    offs = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    summary = (pid_b.to(tl.int64) * n_chunks + pid_c) * D + offs
    t_lo = pid_c * CHUNK
    t_hi = tl.minimum(t_lo + CHUNK, T)
    if REVERSE:  # the first step t0 and the step dt to the next one, in scan order
        t0 = t_hi - 1
        dt = -1
    else:
        t0 = t_lo
        dt = 1
    row = pid_b.to(tl.int64)
    lane = offs.to(tl.int64)
    if SHIFT:  # noqa: SIM108 (backward: g_{t+1}'s coefficient is a_{t+1}; past the end it is 1)
        ta = t0 + 1
    else:
        ta = t0
    coef = COEF + row * a_sb + lane * a_sd + tl.cast(ta, tl.int64) * a_st
    x = X + row * x_sb + lane * x_sd + tl.cast(t0, tl.int64) * x_st
    out = row * o_sb + lane * o_sd + tl.cast(t0, tl.int64) * o_st  # into OUT and DCOEF
    hprev = HPREV + row * hp_sb + lane * hp_sd + tl.cast(t0 - 1, tl.int64) * hp_st  # at h_{t−1}
    if HAS_INIT:
        h = tl.load(INIT + row * i_sb + pid_c * i_sc + lane * i_sd, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D], dtype=tl.float32)
    p = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
    # The first step's inputs; then each pass loads the next step's before this step's math and
    # stores, which use the values loaded one pass earlier (their latency overlaps the chain).
    inside = (offs * 0 + ta) < T  # a vector mask: the interpreter wants one
    xa = tl.load(coef, mask=mask & inside, other=1.0)
    xx = tl.load(x, mask=mask, other=0.0)
    if WRITE_DCOEF:
        if HAS_H0:
            h_first = tl.load(H0 + row * h0_sb + lane * h0_sd, mask=mask, other=0.0).to(tl.float32)
        else:
            h_first = tl.zeros([BLOCK_D], dtype=tl.float32)
        xp = tl.load(hprev, mask=mask & ((offs * 0 + t0) > 0), other=0.0)  # h_{t−1}, if t > 0
    for i in range(0, t_hi - t_lo):
        t = t0 + i * dt
        more = mask & ((offs * 0 + i + 1) < t_hi - t_lo)  # a next step in this chunk
        coef += dt * a_st
        x += dt * x_st
        if SHIFT:
            na = tl.load(coef, mask=more & ((offs * 0 + t + dt + 1) < T), other=1.0)
        else:
            na = tl.load(coef, mask=more, other=1.0)
        nx = tl.load(x, mask=more, other=0.0)
        if WRITE_DCOEF:
            hprev += dt * hp_st
            n_p = tl.load(hprev, mask=more & ((offs * 0 + t + dt) > 0), other=0.0)
        h = xa.to(tl.float32) * h + xx.to(tl.float32)
        if WRITE_SUM:
            p = p * xa.to(tl.float32)
        if WRITE_OUT:
            tl.store(OUT + out, h.to(OUT.dtype.element_ty), mask=mask)
        if WRITE_DCOEF:
            prev = tl.where((offs * 0 + t) > 0, xp.to(tl.float32), h_first)  # converted where used
            tl.store(DCOEF + out, (h * prev).to(DCOEF.dtype.element_ty), mask=mask)
            xp = n_p
        out += dt * o_st
        xa, xx = na, nx
    if WRITE_SUM:
        tl.store(SUM_P + summary, p, mask=mask)
        tl.store(SUM_H + summary, h, mask=mask)


def _blocks(D: int) -> tuple[int, int]:
    block = min(128, triton.next_power_of_2(D))
    return block, max(1, min(4, block // 32))


def _n_chunks(B: int, T: int, D: int, device: torch.device, chunks: int) -> int:
    """Chunks of time run in parallel when B·D alone cannot fill the device."""
    if chunks:
        return max(1, min(chunks, T))
    block, _ = _blocks(D)
    programs = B * triton.cdiv(D, block)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = 8 * sms
    if programs >= want or T < 64:
        return 1
    return max(1, min(triton.cdiv(want, programs), T // 32))


def _strides(x: torch.Tensor | None) -> tuple[int, int, int]:
    """(batch, time or chunk, feature) strides in elements; a [B, D] state has no middle one."""
    if x is None:
        return (0, 0, 0)
    return (x.stride(0), 0, x.stride(1)) if x.dim() == 2 else tuple(x.stride())


def _launch(
    coef: torch.Tensor,
    x: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    sum_p: torch.Tensor | None = None,
    sum_h: torch.Tensor | None = None,
    hprev: torch.Tensor | None = None,
    h0: torch.Tensor | None = None,
    dcoef: torch.Tensor | None = None,
    reverse: bool = False,
    shift: bool = False,
    n_chunks: int = 1,
) -> int:
    """One pass of :func:`_scan_kernel` over [B, T, D]; the tensors are read where they lie (any
    strides), ``out`` and ``dcoef`` (written with one set of strides) are allocated by the callers,
    sum_p and sum_h contiguous. Returns the number of chunks run."""
    B, T, D = x.shape
    block, warps = _blocks(D)
    chunk = triton.cdiv(T, n_chunks)
    n_chunks = triton.cdiv(T, chunk)
    if out is not None and dcoef is not None and out.stride() != dcoef.stride():
        raise ValueError("out and dcoef must share their strides")
    written = out if out is not None else dcoef
    strides = (*_strides(coef), *_strides(x), *_strides(init), *_strides(written), *_strides(hprev))
    strides += _strides(h0)[::2]
    pointers = [t if t is not None else x for t in (coef, x, init, out, sum_p, sum_h, hprev, h0, dcoef)]
    grid = (B, n_chunks, triton.cdiv(D, block))
    _scan_kernel[grid](
        *pointers,
        T,
        D,
        chunk,
        *strides,
        REVERSE=reverse,
        SHIFT=shift,
        HAS_INIT=init is not None,
        WRITE_OUT=out is not None,
        WRITE_SUM=sum_p is not None,
        WRITE_DCOEF=dcoef is not None,
        HAS_H0=h0 is not None,
        BLOCK_D=block,
        num_warps=warps,
    )
    return n_chunks


def _chunk_entry_states(coef, x, init, n_chunks, reverse, shift) -> torch.Tensor:
    """Phases 1 and 2: the state entering every chunk, [B, n_chunks, D] fp32."""
    B, T, D = x.shape
    chunk = triton.cdiv(T, n_chunks)
    n_chunks = triton.cdiv(T, chunk)
    sum_p = torch.empty(B, n_chunks, D, device=x.device, dtype=torch.float32)
    sum_h = torch.empty_like(sum_p)
    _launch(coef, x, sum_p=sum_p, sum_h=sum_h, reverse=reverse, shift=shift, n_chunks=n_chunks)
    states = torch.empty_like(sum_p)  # the state after each chunk, in scan order
    _launch(sum_p, sum_h, out=states, init=init, reverse=reverse, n_chunks=1)
    start = torch.zeros_like(sum_p[:, :1]) if init is None else init.float()[:, None]
    if reverse:
        return torch.cat([states[:, 1:], start], 1)
    return torch.cat([start, states[:, :-1]], 1)


def scan_fwd(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, chunks: int = 0) -> torch.Tensor:
    """h [B, T, D] in ``a``'s dtype, contiguous; ``chunks`` forces the number of time chunks
    (0 = choose). a, b, h0 of any strides: read where they lie."""
    B, T, D = a.shape
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    n = _n_chunks(B, T, D, a.device, chunks)
    if n == 1:
        _launch(a, b, out=out, init=h0)
        return out
    entry = _chunk_entry_states(a, b, h0, n, reverse=False, shift=False)
    _launch(a, b, out=out, init=entry, n_chunks=n)
    return out


def scan_bwd(
    a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, dh: torch.Tensor, chunks: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(da, db, dh0) for dh = dL/dh [B, T, D]; see the module docstring. Inputs of any strides;
    da and db contiguous."""
    B, T, D = a.shape
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.empty(dh.shape, dtype=dh.dtype, device=dh.device)
    n = _n_chunks(B, T, D, a.device, chunks)
    entry = None if n == 1 else _chunk_entry_states(a, dh, None, n, reverse=True, shift=True)
    _launch(a, dh, out=db, init=entry, hprev=h, h0=h0, dcoef=da, reverse=True, shift=True, n_chunks=n)
    dh0 = None if h0 is None else (a[:, 0].float() * db[:, 0].float()).to(h0.dtype)
    return da, db, dh0
