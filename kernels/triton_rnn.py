"""Triton kernels for the element-wise nonlinear recurrences: LRN, oLRN and SRU.

Their gates depend on the previous state through a sigmoid, so time is sequential: a program owns
one batch row and a block of channels and walks all T steps, O(d) work per step, state in fp32
registers. The backward kernels walk T backwards with the gradient carry in registers,
recomputing the gates from the saved outputs (no gate is stored). Equations and derivatives:
``kernels/reference.py``, which these kernels are tested against.

Each step's work is a short dependent chain, so a loop that loads step t's inputs only when step t
needs them waits a full global-memory latency every step. The loops are software-pipelined
instead: each pass through the loop first issues the loads of the next step (t + 1 forward,
t − 1 backward; masked off past the end), then does step t's math and stores on values loaded one
pass earlier and carried in registers. tests/helpers_sass.py checks that order in the compiled
SASS.

Every ``[B, T, D]`` tensor comes with its strides (batch, time, feature), so LRN's q, k, v (and
oLRN's o) are read straight out of the packed ``[B, T, n·D]`` projection they are column blocks
of, and any other view is read where it lies: the launchers copy nothing. A feature stride of 1
(the usual case) is specialised by Triton to the constant 1, so the loads along D stay coalesced.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _channels(D, BLOCK_D: tl.constexpr):
    """This program's batch row, its channel offsets and the channel mask."""
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return tl.program_id(0), offs, offs < D


@triton.jit
def _row(X, sb, sd, pid_b, offs):
    """Pointers to row ``pid_b``'s channels ``offs`` at time 0 of a tensor with batch stride
    ``sb`` and feature stride ``sd`` (64-bit offsets: a packed projection can be large)."""
    return X + pid_b.to(tl.int64) * sb + offs.to(tl.int64) * sd


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _prev(raw, t, offs, first):
    """The state before step t, fp32: ``raw``, the saved output of step t − 1 as loaded (one pass
    earlier: converted here, where it is used), or ``first`` (the initial state) at t = 0."""
    return tl.where((offs * 0 + t) > 0, raw.to(tl.float32), first)


@triton.jit
def _start(H0, sb, sd, pid_b, offs, mask, HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr):
    """The initial state of a program's channels, fp32 (zeros without H0)."""
    h = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(_row(H0, sb, sd, pid_b, offs), mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _lrn_fwd_kernel(
    Q, K, V, OG, H0, H, T, D,
    q_sb, q_st, q_sd, k_sb, k_st, k_sd, v_sb, v_st, v_sd, o_sb, o_st, o_sd,
    h0_sb, h0_sd, h_sb, h_st, h_sd,
    OUTPUT_GATE: tl.constexpr, HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Steps t = 0 … T − 1; q, k, v, o, h0 and h of any strides."""
    pid_b, offs, mask = _channels(D, BLOCK_D)
    h = _start(H0, h0_sb, h0_sd, pid_b, offs, mask, HAS_H0, BLOCK_D)
    q, k = _row(Q, q_sb, q_sd, pid_b, offs), _row(K, k_sb, k_sd, pid_b, offs)
    v, out = _row(V, v_sb, v_sd, pid_b, offs), _row(H, h_sb, h_sd, pid_b, offs)
    og = _row(OG, o_sb, o_sd, pid_b, offs)  # (unused without the output gate)
    # Step 0's inputs; then each pass loads step t + 1's before step t's math and store.
    xq = tl.load(q, mask=mask, other=0.0)
    xk = tl.load(k, mask=mask, other=0.0)
    xv = tl.load(v, mask=mask, other=0.0)
    if OUTPUT_GATE:
        xo = tl.load(og, mask=mask, other=0.0)
    for t in range(0, T):
        # Step t + 1's inputs first (masked off after the last step): their latency overlaps
        # step t's math and store, which use the values loaded one pass earlier.
        more = mask & ((offs * 0 + t + 1) < T)  # a vector mask: the interpreter wants one
        q, k, v = q + q_st, k + k_st, v + v_st
        nq = tl.load(q, mask=more, other=0.0)
        nk = tl.load(k, mask=more, other=0.0)
        nv = tl.load(v, mask=more, other=0.0)
        if OUTPUT_GATE:
            og += o_st
            no = tl.load(og, mask=more, other=0.0)
        i = tl.sigmoid(xk.to(tl.float32) + h)
        f = tl.sigmoid(xq.to(tl.float32) - h)
        c = i * xv.to(tl.float32) + f * h
        if OUTPUT_GATE:  # oLRN: h = σ(o − c) ⊙ c
            h = tl.sigmoid(xo.to(tl.float32) - c) * c
            xo = no
        else:  # LRN: h = tanh(c)
            h = _tanh(c)
        tl.store(out, h.to(H.dtype.element_ty), mask=mask)
        out += h_st
        xq, xk, xv = nq, nk, nv


@triton.jit
def _lrn_bwd_kernel(
    Q, K, V, OG, H, H0, DH, DQ, DK, DV, DOG, DH0, T, D,
    q_sb, q_st, q_sd, k_sb, k_st, k_sd, v_sb, v_st, v_sd, o_sb, o_st, o_sd,
    h_sb, h_st, h_sd, h0_sb, h0_sd, dh_sb, dh_st, dh_sd, g_sb, g_st, g_sd,
    OUTPUT_GATE: tl.constexpr, HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Steps t = T − 1 … 0. DQ, DK, DV, DOG share the strides ``g_*``; DH0 is contiguous."""
    pid_b, offs, mask = _channels(D, BLOCK_D)
    h_first = _start(H0, h0_sb, h0_sd, pid_b, offs, mask, HAS_H0, BLOCK_D)
    last = tl.cast(T - 1, tl.int64)
    q = _row(Q, q_sb, q_sd, pid_b, offs) + last * q_st
    k = _row(K, k_sb, k_sd, pid_b, offs) + last * k_st
    v = _row(V, v_sb, v_sd, pid_b, offs) + last * v_st
    og = _row(OG, o_sb, o_sd, pid_b, offs) + last * o_st
    dh = _row(DH, dh_sb, dh_sd, pid_b, offs) + last * dh_st
    hq = _row(H, h_sb, h_sd, pid_b, offs) + (last - 1) * h_st  # at H[t − 1], the state before step t
    grad = pid_b.to(tl.int64) * g_sb + offs.to(tl.int64) * g_sd + last * g_st
    # Step T − 1's inputs; then each pass loads step t − 1's before step t's math and stores.
    xq = tl.load(q, mask=mask, other=0.0)
    xk = tl.load(k, mask=mask, other=0.0)
    xv = tl.load(v, mask=mask, other=0.0)
    xdh = tl.load(dh, mask=mask, other=0.0)
    xh = tl.load(hq, mask=mask & ((offs * 0 + T) > 1), other=0.0)  # h_{T−2}, if there is one
    if OUTPUT_GATE:
        xo = tl.load(og, mask=mask, other=0.0)
    else:  # LRN's dc needs h_t: here h_{T−1}; later the previous pass's h_{t−1}, not loaded again
        ht = tl.load(hq + h_st, mask=mask, other=0.0).to(tl.float32)
    g = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, T):
        t = T - 1 - s
        more = mask & ((offs * 0 + t) > 0)  # step t − 1 exists
        q, k, v, dh, hq = q - q_st, k - k_st, v - v_st, dh - dh_st, hq - h_st
        nq = tl.load(q, mask=more, other=0.0)
        nk = tl.load(k, mask=more, other=0.0)
        nv = tl.load(v, mask=more, other=0.0)
        ndh = tl.load(dh, mask=more, other=0.0)
        nh = tl.load(hq, mask=mask & ((offs * 0 + t) > 1), other=0.0)
        if OUTPUT_GATE:
            og -= o_st
            no = tl.load(og, mask=more, other=0.0)
        hp = _prev(xh, t, offs, h_first)
        g += xdh.to(tl.float32)
        v32 = xv.to(tl.float32)
        i = tl.sigmoid(xk.to(tl.float32) + hp)
        f = tl.sigmoid(xq.to(tl.float32) - hp)
        if OUTPUT_GATE:
            c = i * v32 + f * hp
            o = tl.sigmoid(xo.to(tl.float32) - c)
            dz = g * c * o * (1.0 - o)
            dc = g * o - dz
            tl.store(DOG + grad, dz.to(DOG.dtype.element_ty), mask=mask)
            xo = no
        else:
            dc = g * (1.0 - ht * ht)
            ht = hp
        di = dc * v32 * i * (1.0 - i)
        df = dc * hp * f * (1.0 - f)
        tl.store(DK + grad, di.to(DK.dtype.element_ty), mask=mask)
        tl.store(DQ + grad, df.to(DQ.dtype.element_ty), mask=mask)
        tl.store(DV + grad, (dc * i).to(DV.dtype.element_ty), mask=mask)
        g = dc * f + di - df
        grad -= g_st
        xq, xk, xv, xdh, xh = nq, nk, nv, ndh, nh
    if HAS_H0:
        tl.store(DH0 + pid_b.to(tl.int64) * D + offs, g.to(DH0.dtype.element_ty), mask=mask)


@triton.jit
def _sru_fwd_kernel(
    U, FP, RP, X, VF, VR, C0, H, C, T, D,
    u_sb, u_st, u_sd, f_sb, f_st, f_sd, r_sb, r_st, r_sd, x_sb, x_st, x_sd,
    vf_sd, vr_sd, c0_sb, c0_sd, o_sb, o_st, o_sd,
    HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Steps t = 0 … T − 1. The outputs H and C share the strides ``o_*``."""
    pid_b, offs, mask = _channels(D, BLOCK_D)
    vf = tl.load(VF + offs * vf_sd, mask=mask, other=0.0).to(tl.float32)
    vr = tl.load(VR + offs * vr_sd, mask=mask, other=0.0).to(tl.float32)
    c = _start(C0, c0_sb, c0_sd, pid_b, offs, mask, HAS_H0, BLOCK_D)
    u, fp = _row(U, u_sb, u_sd, pid_b, offs), _row(FP, f_sb, f_sd, pid_b, offs)
    rp, x = _row(RP, r_sb, r_sd, pid_b, offs), _row(X, x_sb, x_sd, pid_b, offs)
    out = pid_b.to(tl.int64) * o_sb + offs.to(tl.int64) * o_sd
    xu = tl.load(u, mask=mask, other=0.0)
    xf = tl.load(fp, mask=mask, other=0.0)
    xr = tl.load(rp, mask=mask, other=0.0)
    xx = tl.load(x, mask=mask, other=0.0)
    for t in range(0, T):
        more = mask & ((offs * 0 + t + 1) < T)  # step t + 1's inputs first, as in LRN
        u, fp, rp, x = u + u_st, fp + f_st, rp + r_st, x + x_st
        nu = tl.load(u, mask=more, other=0.0)
        nf = tl.load(fp, mask=more, other=0.0)
        nr = tl.load(rp, mask=more, other=0.0)
        nx = tl.load(x, mask=more, other=0.0)
        f = tl.sigmoid(xf.to(tl.float32) + vf * c)
        r = tl.sigmoid(xr.to(tl.float32) + vr * c)
        c = f * c + (1.0 - f) * xu.to(tl.float32)
        h = r * c + (1.0 - r) * xx.to(tl.float32)
        tl.store(C + out, c.to(C.dtype.element_ty), mask=mask)
        tl.store(H + out, h.to(H.dtype.element_ty), mask=mask)
        out += o_st
        xu, xf, xr, xx = nu, nf, nr, nx


@triton.jit
def _sru_bwd_kernel(
    U, FP, RP, X, VF, VR, C0, C, DH, DC, DU, DFP, DRP, DX, DVF, DVR, DC0, T, D,
    u_sb, u_st, u_sd, f_sb, f_st, f_sd, r_sb, r_st, r_sd, x_sb, x_st, x_sd,
    vf_sd, vr_sd, c0_sb, c0_sd, c_sb, c_st, c_sd, dh_sb, dh_st, dh_sd, dc_sb, dc_st, dc_sd,
    g_sb, g_st, g_sd,
    HAS_H0: tl.constexpr, HAS_DC: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Steps t = T − 1 … 0. DU, DFP, DRP, DX share the strides ``g_*``; DVF, DVR (fp32) and DC0
    are contiguous [B, D]. Without DC (HAS_DC false) dL/dc is zero and nothing is read for it."""
    pid_b, offs, mask = _channels(D, BLOCK_D)
    vf = tl.load(VF + offs * vf_sd, mask=mask, other=0.0).to(tl.float32)
    vr = tl.load(VR + offs * vr_sd, mask=mask, other=0.0).to(tl.float32)
    c_first = _start(C0, c0_sb, c0_sd, pid_b, offs, mask, HAS_H0, BLOCK_D)
    last = tl.cast(T - 1, tl.int64)
    u = _row(U, u_sb, u_sd, pid_b, offs) + last * u_st
    fp = _row(FP, f_sb, f_sd, pid_b, offs) + last * f_st
    rp = _row(RP, r_sb, r_sd, pid_b, offs) + last * r_st
    x = _row(X, x_sb, x_sd, pid_b, offs) + last * x_st
    dh = _row(DH, dh_sb, dh_sd, pid_b, offs) + last * dh_st
    dcp = _row(DC, dc_sb, dc_sd, pid_b, offs) + last * dc_st  # (unused without DC)
    cq = _row(C, c_sb, c_sd, pid_b, offs) + (last - 1) * c_st  # at C[t − 1]
    grad = pid_b.to(tl.int64) * g_sb + offs.to(tl.int64) * g_sd + last * g_st
    # Step T − 1's inputs; then each pass loads step t − 1's before step t's math and stores.
    xu = tl.load(u, mask=mask, other=0.0)
    xf = tl.load(fp, mask=mask, other=0.0)
    xr = tl.load(rp, mask=mask, other=0.0)
    xx = tl.load(x, mask=mask, other=0.0)
    xdh = tl.load(dh, mask=mask, other=0.0)
    ct = tl.load(cq + c_st, mask=mask, other=0.0).to(tl.float32)  # c_{T−1}; later the last pass's cp
    xc = tl.load(cq, mask=mask & ((offs * 0 + T) > 1), other=0.0)  # c_{T−2}, if there is one
    if HAS_DC:
        xdc = tl.load(dcp, mask=mask, other=0.0)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    dvf = tl.zeros([BLOCK_D], dtype=tl.float32)
    dvr = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, T):
        t = T - 1 - s
        more = mask & ((offs * 0 + t) > 0)  # step t − 1 exists
        u, fp, rp, x, dh, cq = u - u_st, fp - f_st, rp - r_st, x - x_st, dh - dh_st, cq - c_st
        nu = tl.load(u, mask=more, other=0.0)
        nf = tl.load(fp, mask=more, other=0.0)
        nr = tl.load(rp, mask=more, other=0.0)
        nx = tl.load(x, mask=more, other=0.0)
        ndh = tl.load(dh, mask=more, other=0.0)
        nc = tl.load(cq, mask=mask & ((offs * 0 + t) > 1), other=0.0)
        g = carry
        if HAS_DC:
            dcp -= dc_st
            ndc = tl.load(dcp, mask=more, other=0.0)
            g += xdc.to(tl.float32)
            xdc = ndc
        cp = _prev(xc, t, offs, c_first)
        dh32, u32 = xdh.to(tl.float32), xu.to(tl.float32)
        f = tl.sigmoid(xf.to(tl.float32) + vf * cp)
        r = tl.sigmoid(xr.to(tl.float32) + vr * cp)
        g += dh32 * r
        dr = dh32 * (ct - xx.to(tl.float32)) * r * (1.0 - r)
        dfg = g * (cp - u32) * f * (1.0 - f)
        tl.store(DU + grad, (g * (1.0 - f)).to(DU.dtype.element_ty), mask=mask)
        tl.store(DX + grad, (dh32 * (1.0 - r)).to(DX.dtype.element_ty), mask=mask)
        tl.store(DRP + grad, dr.to(DRP.dtype.element_ty), mask=mask)
        tl.store(DFP + grad, dfg.to(DFP.dtype.element_ty), mask=mask)
        dvf += dfg * cp
        dvr += dr * cp
        carry = g * f + dfg * vf + dr * vr
        grad -= g_st
        ct = cp
        xu, xf, xr, xx, xdh, xc = nu, nf, nr, nx, ndh, nc
    row = pid_b.to(tl.int64) * D + offs
    tl.store(DVF + row, dvf, mask=mask)
    tl.store(DVR + row, dvr, mask=mask)
    if HAS_H0:
        tl.store(DC0 + row, carry.to(DC0.dtype.element_ty), mask=mask)


def _warps(block: int) -> int:
    """Warps for a program of ``block`` channels: one channel per thread (see :func:`_grid`)."""
    return max(1, min(4, block // 32))


def _grid(B: int, D: int, device: torch.device) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK_D, num_warps): blocks of channels small enough that B·D/BLOCK_D programs fill
    the device, one channel per thread.

    Why not fewer, wider threads (two bf16 channels each for 32-bit loads)? At the shipped
    shapes (B = 8, D = 1536 on 132 SMs: 384 one-warp programs) every program is resident at once,
    so a layer takes T × the latency of one step's dependent chain; wider threads would halve the
    resident warps without shortening that chain, and only the load count would drop. Prefetching
    the next step is what takes the load latency off the chain. Whether vector loads pay is for
    ``benchmarks/gpu_check.py`` on a GPU to say.
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    block = min(128, triton.next_power_of_2(D))
    while block > 16 and B * triton.cdiv(D, block) < 2 * sms:
        block //= 2
    return (B, triton.cdiv(D, block)), block, _warps(block)


def _s3(x: Tensor | None) -> tuple[int, int, int]:
    """(batch, time, feature) strides of a [B, T, D] tensor, in elements; zeros for None."""
    return (0, 0, 0) if x is None else tuple(x.stride())


def _s2(x: Tensor | None) -> tuple[int, int]:
    """(batch, feature) strides of a [B, D] state; zeros for None."""
    return (0, 0) if x is None else tuple(x.stride())


def _same_strides(*xs: Tensor) -> tuple[int, int, int]:
    """The strides the kernels' output tensors share (they are written with one set)."""
    strides = {x.stride() for x in xs if x is not None}
    if len(strides) != 1:
        raise ValueError(f"the gradient tensors must share their strides, got {sorted(strides)}")
    return strides.pop()


def _grads_like(x: Tensor, n: int, into: tuple[Tensor, ...] | None) -> tuple[Tensor, ...]:
    """n gradient tensors shaped like x: ``into`` (e.g. column blocks of one packed gradient),
    else fresh contiguous ones."""
    if into is not None:
        return into
    return tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(n))


def lrn_fwd(q: Tensor, k: Tensor, v: Tensor, h0: Tensor | None, o: Tensor | None = None) -> Tensor:
    """LRN (``o`` None) or oLRN (with the output-gate pre-activations ``o``): h [B, T, D],
    contiguous. Inputs of any strides (a packed projection's column blocks among them)."""
    B, T, D = q.shape
    h = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grid, block, warps = _grid(B, D, q.device)
    pointers = (q, k, v, o if o is not None else q, h0 if h0 is not None else q, h)
    strides = (*_s3(q), *_s3(k), *_s3(v), *_s3(o), *_s2(h0), *_s3(h))
    flags = dict(OUTPUT_GATE=o is not None, HAS_H0=h0 is not None, BLOCK_D=block, num_warps=warps)
    _lrn_fwd_kernel[grid](*pointers, T, D, *strides, **flags)
    return h


def lrn_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    h: Tensor,
    h0: Tensor | None,
    dh: Tensor,
    o: Tensor | None = None,
    into: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor | None, ...]:
    """(dq, dk, dv, dh0), and for oLRN (dq, dk, dv, do, dh0). ``into``: the gradient tensors
    to write (dq, dk, dv(, do)), sharing one set of strides; fresh contiguous ones without."""
    B, T, D = q.shape
    grads = _grads_like(q, 3 if o is None else 4, into)
    dq, dk, dv, do = (*grads, None)[:4]
    dh0 = torch.empty(h0.shape, dtype=h0.dtype, device=h0.device) if h0 is not None else None
    grid, block, warps = _grid(B, D, q.device)
    inputs = (q, k, v, o if o is not None else q, h, h0 if h0 is not None else q, dh)
    outputs = (dq, dk, dv, do if do is not None else dq, dh0 if dh0 is not None else dq)
    strides = (*_s3(q), *_s3(k), *_s3(v), *_s3(o), *_s3(h), *_s2(h0), *_s3(dh), *_same_strides(*grads))
    flags = dict(OUTPUT_GATE=o is not None, HAS_H0=h0 is not None, BLOCK_D=block, num_warps=warps)
    _lrn_bwd_kernel[grid](*inputs, *outputs, T, D, *strides, **flags)
    return (dq, dk, dv, dh0) if o is None else (dq, dk, dv, do, dh0)


def olrn_fwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, h0: Tensor | None) -> Tensor:
    return lrn_fwd(q, k, v, h0, o=o)


def olrn_bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor):
    return lrn_bwd(q, k, v, h, h0, dh, o=o)


def lrn_packed_fwd(p: Tensor, h0: Tensor | None, gated: bool) -> Tensor:
    """h [B, T, D] of LRN (oLRN when ``gated``) on p [B, T, n·D] = [q | k | v (| o)]: the kernel
    reads the column blocks in place."""
    q, k, v, *o = p.chunk(4 if gated else 3, dim=-1)
    return lrn_fwd(q, k, v, h0, o=o[0] if gated else None)


def lrn_packed_bwd(
    p: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, gated: bool
) -> tuple[Tensor, Tensor | None]:
    """(dp [B, T, n·D], dh0 or None) of :func:`lrn_packed_fwd`: the kernel writes the gradients
    into the column blocks of one tensor, so autograd has no n-way ``cat`` to do."""
    n = 4 if gated else 3
    q, k, v, *o = p.chunk(n, dim=-1)
    dp = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    *_, dh0 = lrn_bwd(q, k, v, h, h0, dh, o=o[0] if gated else None, into=dp.chunk(n, dim=-1))
    return dp, dh0


def sru_fwd(
    u: Tensor, fp: Tensor, rp: Tensor, x: Tensor, vf: Tensor, vr: Tensor, c0: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(h, c) [B, T, D], contiguous: the highway outputs and the cell states."""
    B, T, D = u.shape
    h, c = (torch.empty(u.shape, dtype=u.dtype, device=u.device) for _ in range(2))
    grid, block, warps = _grid(B, D, u.device)
    pointers = (u, fp, rp, x, vf, vr, c0 if c0 is not None else u, h, c)
    strides = (*_s3(u), *_s3(fp), *_s3(rp), *_s3(x), vf.stride(0), vr.stride(0), *_s2(c0), *_s3(h))
    _sru_fwd_kernel[grid](*pointers, T, D, *strides, HAS_H0=c0 is not None, BLOCK_D=block, num_warps=warps)
    return h, c


def sru_bwd(
    u: Tensor,
    fp: Tensor,
    rp: Tensor,
    x: Tensor,
    vf: Tensor,
    vr: Tensor,
    c0: Tensor | None,
    c: Tensor,
    dh: Tensor,
    dc: Tensor,
) -> tuple[Tensor | None, ...]:
    """(du, dfp, drp, dx, dvf, dvr, dc0); ``dc`` empty (numel 0) stands for zeros."""
    B, T, D = u.shape
    has_dc = dc.numel() > 0
    du, dfp, drp, dx = _grads_like(u, 4, None)
    dvf = torch.empty(B, D, device=u.device, dtype=torch.float32)  # per batch row, summed below
    dvr = torch.empty_like(dvf)
    dc0 = torch.empty(c0.shape, dtype=c0.dtype, device=c0.device) if c0 is not None else None
    grid, block, warps = _grid(B, D, u.device)
    inputs = (u, fp, rp, x, vf, vr, c0 if c0 is not None else u, c, dh, dc if has_dc else u)
    grads = (du, dfp, drp, dx, dvf, dvr, dc0 if dc0 is not None else dvf)
    strides = (*_s3(u), *_s3(fp), *_s3(rp), *_s3(x), vf.stride(0), vr.stride(0), *_s2(c0))
    strides += (*_s3(c), *_s3(dh), *_s3(dc if has_dc else None), *_s3(du))
    flags = dict(HAS_H0=c0 is not None, HAS_DC=has_dc, BLOCK_D=block, num_warps=warps)
    _sru_bwd_kernel[grid](*inputs, *grads, T, D, *strides, **flags)
    return du, dfp, drp, dx, dvf.sum(0).to(vf.dtype), dvr.sum(0).to(vr.dtype), dc0
