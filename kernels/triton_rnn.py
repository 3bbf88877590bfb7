"""Triton kernels for the element-wise nonlinear recurrences: LRN, oLRN and SRU.

Their gates depend on the previous state through a sigmoid, so time is sequential: a program owns
one batch row and a block of channels and walks all T steps, O(d) work per step, state in fp32
registers. The backward kernels walk T backwards with the gradient carry in registers,
recomputing the gates from the saved outputs (no gate is stored). Equations and derivatives:
``kernels/reference.py``, which these kernels are tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _channels(T, D, BLOCK_D: tl.constexpr):
    """This program's batch row, channel offsets, channel mask and the row's base offset."""
    pid_b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    return pid_b, offs, offs < D, pid_b.to(tl.int64) * T * D


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _prev(H, H_FIRST, base, t, D, offs, mask):
    """State before step t: H[t − 1], or the initial state at t = 0."""
    later = (offs * 0 + t) > 0
    prev = tl.load(H + base + (t - 1) * D + offs, mask=mask & later, other=0.0).to(tl.float32)
    return tl.where(later, prev, H_FIRST)


@triton.jit
def _start(H0, pid_b, D, offs, mask, HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr):
    """The initial state of a program's channels, fp32 (zeros without H0)."""
    h = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_H0:
        h = tl.load(H0 + pid_b.to(tl.int64) * D + offs, mask=mask, other=0.0).to(tl.float32)
    return h


@triton.jit
def _lrn_fwd_kernel(
    Q, K, V, OG, H0, H, T, D, OUTPUT_GATE: tl.constexpr, HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr
):
    pid_b, offs, mask, base = _channels(T, D, BLOCK_D)
    h = _start(H0, pid_b, D, offs, mask, HAS_H0, BLOCK_D)
    for t in range(0, T):
        at = base + t * D + offs
        i = tl.sigmoid(tl.load(K + at, mask=mask, other=0.0).to(tl.float32) + h)
        f = tl.sigmoid(tl.load(Q + at, mask=mask, other=0.0).to(tl.float32) - h)
        c = i * tl.load(V + at, mask=mask, other=0.0).to(tl.float32) + f * h
        if OUTPUT_GATE:  # oLRN: h = σ(o − c) ⊙ c
            h = tl.sigmoid(tl.load(OG + at, mask=mask, other=0.0).to(tl.float32) - c) * c
        else:  # LRN: h = tanh(c)
            h = _tanh(c)
        tl.store(H + at, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _lrn_bwd_kernel(
    Q,
    K,
    V,
    OG,
    H,
    H0,
    DH,
    DQ,
    DK,
    DV,
    DOG,
    DH0,
    T,
    D,
    OUTPUT_GATE: tl.constexpr,
    HAS_H0: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b, offs, mask, base = _channels(T, D, BLOCK_D)
    h_first = _start(H0, pid_b, D, offs, mask, HAS_H0, BLOCK_D)
    g = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, T):
        t = T - 1 - s
        at = base + t * D + offs
        hp = _prev(H, h_first, base, t, D, offs, mask)
        g += tl.load(DH + at, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + at, mask=mask, other=0.0).to(tl.float32)
        i = tl.sigmoid(tl.load(K + at, mask=mask, other=0.0).to(tl.float32) + hp)
        f = tl.sigmoid(tl.load(Q + at, mask=mask, other=0.0).to(tl.float32) - hp)
        if OUTPUT_GATE:
            c = i * v + f * hp
            og = tl.sigmoid(tl.load(OG + at, mask=mask, other=0.0).to(tl.float32) - c)
            dz = g * c * og * (1.0 - og)
            dc = g * og - dz
            tl.store(DOG + at, dz.to(DOG.dtype.element_ty), mask=mask)
        else:
            ht = tl.load(H + at, mask=mask, other=0.0).to(tl.float32)
            dc = g * (1.0 - ht * ht)
        di = dc * v * i * (1.0 - i)
        df = dc * hp * f * (1.0 - f)
        tl.store(DK + at, di.to(DK.dtype.element_ty), mask=mask)
        tl.store(DQ + at, df.to(DQ.dtype.element_ty), mask=mask)
        tl.store(DV + at, (dc * i).to(DV.dtype.element_ty), mask=mask)
        g = dc * f + di - df
    if HAS_H0:
        tl.store(DH0 + pid_b.to(tl.int64) * D + offs, g.to(DH0.dtype.element_ty), mask=mask)


@triton.jit
def _sru_fwd_kernel(U, FP, RP, X, VF, VR, C0, H, C, T, D, HAS_H0: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_b, offs, mask, base = _channels(T, D, BLOCK_D)
    vf = tl.load(VF + offs, mask=mask, other=0.0).to(tl.float32)
    vr = tl.load(VR + offs, mask=mask, other=0.0).to(tl.float32)
    c = _start(C0, pid_b, D, offs, mask, HAS_H0, BLOCK_D)
    for t in range(0, T):
        at = base + t * D + offs
        f = tl.sigmoid(tl.load(FP + at, mask=mask, other=0.0).to(tl.float32) + vf * c)
        r = tl.sigmoid(tl.load(RP + at, mask=mask, other=0.0).to(tl.float32) + vr * c)
        c = f * c + (1.0 - f) * tl.load(U + at, mask=mask, other=0.0).to(tl.float32)
        h = r * c + (1.0 - r) * tl.load(X + at, mask=mask, other=0.0).to(tl.float32)
        tl.store(C + at, c.to(C.dtype.element_ty), mask=mask)
        tl.store(H + at, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _sru_bwd_kernel(
    U,
    FP,
    RP,
    X,
    VF,
    VR,
    C0,
    C,
    DH,
    DC,
    DU,
    DFP,
    DRP,
    DX,
    DVF,
    DVR,
    DC0,
    T,
    D,
    HAS_H0: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b, offs, mask, base = _channels(T, D, BLOCK_D)
    vf = tl.load(VF + offs, mask=mask, other=0.0).to(tl.float32)
    vr = tl.load(VR + offs, mask=mask, other=0.0).to(tl.float32)
    c_first = _start(C0, pid_b, D, offs, mask, HAS_H0, BLOCK_D)
    carry = tl.zeros([BLOCK_D], dtype=tl.float32)
    dvf = tl.zeros([BLOCK_D], dtype=tl.float32)
    dvr = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, T):
        t = T - 1 - s
        at = base + t * D + offs
        cp = _prev(C, c_first, base, t, D, offs, mask)
        ct = tl.load(C + at, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + at, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + at, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(DH + at, mask=mask, other=0.0).to(tl.float32)
        f = tl.sigmoid(tl.load(FP + at, mask=mask, other=0.0).to(tl.float32) + vf * cp)
        r = tl.sigmoid(tl.load(RP + at, mask=mask, other=0.0).to(tl.float32) + vr * cp)
        g = carry + tl.load(DC + at, mask=mask, other=0.0).to(tl.float32) + dh * r
        dr = dh * (ct - x) * r * (1.0 - r)
        dfg = g * (cp - u) * f * (1.0 - f)
        tl.store(DU + at, (g * (1.0 - f)).to(DU.dtype.element_ty), mask=mask)
        tl.store(DX + at, (dh * (1.0 - r)).to(DX.dtype.element_ty), mask=mask)
        tl.store(DRP + at, dr.to(DRP.dtype.element_ty), mask=mask)
        tl.store(DFP + at, dfg.to(DFP.dtype.element_ty), mask=mask)
        dvf += dfg * cp
        dvr += dr * cp
        carry = g * f + dfg * vf + dr * vr
    row = pid_b.to(tl.int64) * D + offs
    tl.store(DVF + row, dvf, mask=mask)
    tl.store(DVR + row, dvr, mask=mask)
    if HAS_H0:
        tl.store(DC0 + row, carry.to(DC0.dtype.element_ty), mask=mask)


def _grid(B: int, D: int, device: torch.device) -> tuple[tuple[int, int], int, int]:
    """Blocks of channels small enough that B·D/BLOCK_D programs fill the device."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    block = min(128, triton.next_power_of_2(D))
    while block > 16 and B * triton.cdiv(D, block) < 2 * sms:
        block //= 2
    return (B, triton.cdiv(D, block)), block, max(1, min(4, block // 32))


def _c(*xs):
    return [None if x is None else x.contiguous() for x in xs]


def lrn_fwd(q, k, v, h0, o=None):
    """LRN (``o`` None) or oLRN (with the output-gate pre-activations ``o``): h [B, T, D]."""
    q, k, v, o, h0 = _c(q, k, v, o, h0)
    B, T, D = q.shape
    h = torch.empty_like(q)
    grid, block, warps = _grid(B, D, q.device)
    inputs = (q, k, v, o if o is not None else q, h0 if h0 is not None else q)
    flags = dict(OUTPUT_GATE=o is not None, HAS_H0=h0 is not None, BLOCK_D=block, num_warps=warps)
    _lrn_fwd_kernel[grid](*inputs, h, T, D, **flags)
    return h


def lrn_bwd(q, k, v, h, h0, dh, o=None):
    """(dq, dk, dv, dh0), and for oLRN (dq, dk, dv, do, dh0)."""
    q, k, v, o, h, h0, dh = _c(q, k, v, o, h, h0, dh)
    B, T, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    do = torch.empty_like(o) if o is not None else None
    dh0 = torch.empty_like(h0) if h0 is not None else None
    grid, block, warps = _grid(B, D, q.device)
    inputs = (q, k, v, o if o is not None else q, h, h0 if h0 is not None else q, dh)
    grads = (dq, dk, dv, do if do is not None else dq, dh0 if dh0 is not None else dq)
    flags = dict(OUTPUT_GATE=o is not None, HAS_H0=h0 is not None, BLOCK_D=block, num_warps=warps)
    _lrn_bwd_kernel[grid](*inputs, *grads, T, D, **flags)
    return (dq, dk, dv, dh0) if o is None else (dq, dk, dv, do, dh0)


def olrn_fwd(q, k, v, o, h0):
    return lrn_fwd(q, k, v, h0, o=o)


def olrn_bwd(q, k, v, o, h, h0, dh):
    return lrn_bwd(q, k, v, h, h0, dh, o=o)


def sru_fwd(u, fp, rp, x, vf, vr, c0):
    """(h, c) [B, T, D]: the highway outputs and the cell states."""
    u, fp, rp, x, vf, vr, c0 = _c(u, fp, rp, x, vf, vr, c0)
    B, T, D = u.shape
    h, c = torch.empty_like(u), torch.empty_like(u)
    grid, block, warps = _grid(B, D, u.device)
    inputs = (u, fp, rp, x, vf, vr, c0 if c0 is not None else u)
    _sru_fwd_kernel[grid](*inputs, h, c, T, D, HAS_H0=c0 is not None, BLOCK_D=block, num_warps=warps)
    return h, c


def sru_bwd(u, fp, rp, x, vf, vr, c0, c, dh, dc):
    """(du, dfp, drp, dx, dvf, dvr, dc0)."""
    u, fp, rp, x, vf, vr, c0, c, dh, dc = _c(u, fp, rp, x, vf, vr, c0, c, dh, dc)
    B, T, D = u.shape
    du, dfp, drp, dx = (torch.empty_like(u) for _ in range(4))
    dvf = torch.empty(B, D, device=u.device, dtype=torch.float32)  # per batch row, summed below
    dvr = torch.empty_like(dvf)
    dc0 = torch.empty_like(c0) if c0 is not None else None
    grid, block, warps = _grid(B, D, u.device)
    inputs = (u, fp, rp, x, vf, vr, c0 if c0 is not None else u, c, dh, dc)
    grads = (du, dfp, drp, dx, dvf, dvr, dc0 if dc0 is not None else dvf)
    _sru_bwd_kernel[grid](*inputs, *grads, T, D, HAS_H0=c0 is not None, BLOCK_D=block, num_warps=warps)
    return du, dfp, drp, dx, dvf.sum(0).to(vf.dtype), dvr.sum(0).to(vr.dtype), dc0
