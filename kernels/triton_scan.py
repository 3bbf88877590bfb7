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
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _scan_kernel(
    COEF,
    X,
    INIT,
    OUT,
    SUM_P,
    SUM_H,
    HPREV,
    H0,
    DCOEF,
    T,
    D,
    CHUNK,
    REVERSE: tl.constexpr,
    SHIFT: tl.constexpr,
    HAS_INIT: tl.constexpr,
    WRITE_OUT: tl.constexpr,
    WRITE_SUM: tl.constexpr,
    WRITE_DCOEF: tl.constexpr,
    HAS_H0: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_d = tl.program_id(2)
    n_chunks = tl.num_programs(1)
    offs = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs < D
    base = pid_b.to(tl.int64) * T * D
    summary = (pid_b.to(tl.int64) * n_chunks + pid_c) * D
    t_lo = pid_c * CHUNK
    t_hi = tl.minimum(t_lo + CHUNK, T)
    if HAS_INIT:
        h = tl.load(INIT + summary + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D], dtype=tl.float32)
    p = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
    if WRITE_DCOEF:
        if HAS_H0:
            h_first = tl.load(H0 + pid_b.to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            h_first = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(0, t_hi - t_lo):
        if REVERSE:  # noqa: SIM108 (a constexpr branch, resolved when the kernel compiles)
            t = t_hi - 1 - i
        else:
            t = t_lo + i
        if SHIFT:  # backward: the coefficient of g_{t+1} is a_{t+1}; past the end it is 1
            inside = (offs * 0 + t + 1) < T  # a vector mask: the interpreter wants one
            coef = tl.load(COEF + base + (t + 1) * D + offs, mask=mask & inside, other=1.0)
        else:
            coef = tl.load(COEF + base + t * D + offs, mask=mask, other=1.0)
        x = tl.load(X + base + t * D + offs, mask=mask, other=0.0).to(tl.float32)
        h = coef.to(tl.float32) * h + x
        if WRITE_SUM:
            p = p * coef.to(tl.float32)
        if WRITE_OUT:
            tl.store(OUT + base + t * D + offs, h.to(OUT.dtype.element_ty), mask=mask)
        if WRITE_DCOEF:
            later = (offs * 0 + t) > 0
            prev = tl.load(HPREV + base + (t - 1) * D + offs, mask=mask & later, other=0.0).to(tl.float32)
            prev = tl.where(later, prev, h_first)
            tl.store(DCOEF + base + t * D + offs, (h * prev).to(DCOEF.dtype.element_ty), mask=mask)
    if WRITE_SUM:
        tl.store(SUM_P + summary + offs, p, mask=mask)
        tl.store(SUM_H + summary + offs, h, mask=mask)


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


def _launch(
    coef,
    x,
    *,
    out=None,
    init=None,
    sum_p=None,
    sum_h=None,
    hprev=None,
    h0=None,
    dcoef=None,
    reverse=False,
    shift=False,
    n_chunks=1,
):
    B, T, D = x.shape
    block, warps = _blocks(D)
    chunk = triton.cdiv(T, n_chunks)
    n_chunks = triton.cdiv(T, chunk)
    dummy = x
    grid = (B, n_chunks, triton.cdiv(D, block))
    _scan_kernel[grid](
        coef,
        x,
        init if init is not None else dummy,
        out if out is not None else dummy,
        sum_p if sum_p is not None else dummy,
        sum_h if sum_h is not None else dummy,
        hprev if hprev is not None else dummy,
        h0 if h0 is not None else dummy,
        dcoef if dcoef is not None else dummy,
        T,
        D,
        chunk,
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
    """h [B, T, D] in ``a``'s dtype; ``chunks`` forces the number of time chunks (0 = choose)."""
    a, b = a.contiguous(), b.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    B, T, D = a.shape
    out = torch.empty_like(a)
    n = _n_chunks(B, T, D, a.device, chunks)
    if n == 1:
        _launch(a, b, out=out, init=h0)
        return out
    entry = _chunk_entry_states(a, b, h0, n, reverse=False, shift=False)
    _launch(a, b, out=out, init=entry, n_chunks=n)
    return out


def scan_bwd(a, h, h0, dh, chunks: int = 0):
    """(da, db, dh0) for dh = dL/dh [B, T, D]; see the module docstring."""
    a, h, dh = a.contiguous(), h.contiguous(), dh.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    B, T, D = a.shape
    da = torch.empty_like(a)
    db = torch.empty_like(dh)
    n = _n_chunks(B, T, D, a.device, chunks)
    entry = None if n == 1 else _chunk_entry_states(a, dh, None, n, reverse=True, shift=True)
    _launch(a, dh, out=db, init=entry, hprev=h, h0=h0, dcoef=da, reverse=True, shift=True, n_chunks=n)
    dh0 = None if h0 is None else (a[:, 0].float() * db[:, 0].float()).to(h0.dtype)
    return da, db, dh0
