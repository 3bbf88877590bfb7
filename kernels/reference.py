"""PyTorch references for the recurrences: plain loops (the test oracles) and fast CPU forms.

Shapes: inputs ``[B, T, D]``, states ``[B, D]``. Every function computes in float32 (float64 stays
float64) and returns outputs in the input dtype.

- ``*_loop``: the equations one time step at a time, differentiated by autograd. Slow; the oracle.
- ``*_fwd`` / ``*_bwd``: what the custom ops run on CPU. The linear scan is a two-level chunked
  scan (about 2·√T vectorized steps instead of T), the nonlinear recurrences a loop without
  autograd plus a hand-written backward loop (less memory and time than autograd through T steps).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _f32(*xs: Tensor | None) -> list[Tensor | None]:
    return [None if x is None else (x if x.dtype == torch.float64 else x.float()) for x in xs]


def _zeros_state(x: Tensor, h0: Tensor | None) -> Tensor:
    return torch.zeros_like(x[:, 0]) if h0 is None else h0.to(x.dtype)


# ------------------------------------------------------------------------------------- linear scan


def linear_scan_loop(a: Tensor, b: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """h_t = a_t ⊙ h_{t−1} + b_t, one step at a time. Returns (h [B, T, D], h_last [B, D])."""
    a32, b32, h = _f32(a, b, h0)
    h = _zeros_state(a32, h)
    out = []
    for t in range(a.shape[1]):
        h = a32[:, t] * h + b32[:, t]
        out.append(h)
    hs = torch.stack(out, 1).to(a.dtype)
    return hs, hs[:, -1]


def _chunked_scan(a32: Tensor, b32: Tensor, h0: Tensor | None, reverse: bool, chunk: int) -> Tensor:
    """h_t = a_t ⊙ h_{t∓1} + b_t forwards (or backwards) in time, as a two-level chunked scan.

    Chunks of C ≈ √T steps are scanned from a zero state in parallel (C vectorized steps), each
    chunk's end state and product of a are carried across chunks (T/C steps), then every step is
    corrected by (product of a so far in its chunk) × (state entering its chunk). No division,
    so a = 0 and tiny a are exact. Padding at the end (a = 1, b = 0) is neutral both ways.
    """
    B, T, D = a32.shape
    C = chunk or max(1, math.isqrt(T))
    n = -(-T // C)
    pad = n * C - T
    if pad:
        a32 = torch.cat([a32, a32.new_ones(B, pad, D)], 1)
        b32 = torch.cat([b32, b32.new_zeros(B, pad, D)], 1)
    a4, b4 = a32.view(B, n, C, D), b32.view(B, n, C, D)
    local = torch.empty_like(a4)
    prod = torch.empty_like(a4)
    steps = range(C - 1, -1, -1) if reverse else range(C)
    h = a4.new_zeros(B, n, D)
    p = a4.new_ones(B, n, D)
    for i in steps:
        h = torch.addcmul(b4[:, :, i], a4[:, :, i], h)
        p = p * a4[:, :, i]
        local[:, :, i] = h
        prod[:, :, i] = p
    carry = torch.empty(B, n, D, dtype=a4.dtype, device=a4.device)
    s = torch.zeros_like(a32[:, 0]) if h0 is None else h0.to(a32.dtype)
    last = 0 if reverse else C - 1
    for c in range(n - 1, -1, -1) if reverse else range(n):
        carry[:, c] = s
        s = torch.addcmul(local[:, c, last], prod[:, c, last], s)
    return torch.addcmul(local, prod, carry[:, :, None]).view(B, n * C, D)[:, :T]


def scan_fwd(a: Tensor, b: Tensor, h0: Tensor | None, chunk: int = 0) -> Tensor:
    """The linear scan by :func:`_chunked_scan`; returns h [B, T, D] in ``a``'s dtype."""
    a32, b32, h0_ = _f32(a, b, h0)
    return _chunked_scan(a32, b32, h0_, reverse=False, chunk=chunk).to(a.dtype).contiguous()


def scan_bwd(a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of the linear scan: (da, db, dh0) from dh = dL/dh [B, T, D].

    g_t = dh_t + a_{t+1} ⊙ g_{t+1} is a scan backwards in time; da_t = g_t ⊙ h_{t−1},
    db_t = g_t, dh0 = a_0 ⊙ g_0.
    """
    a32, h32, h0_, dh32 = _f32(a, h, h0, dh)
    coef = torch.cat([a32[:, 1:], torch.ones_like(a32[:, :1])], 1)  # a_{t+1}; nothing after the end
    g = _chunked_scan(coef, dh32, None, reverse=True, chunk=0)
    h_prev = torch.cat([_zeros_state(a32, h0_)[:, None], h32[:, :-1]], 1)
    da = (g * h_prev).to(a.dtype)
    dh0 = None if h0 is None else (a32[:, 0] * g[:, 0]).to(h0.dtype)
    return da, g.to(dh.dtype).contiguous(), dh0


# ---------------------------------------------------------------------------------------------- LRN


def lrn_loop(q: Tensor, k: Tensor, v: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """LRN (seed 001, eq. 1–4): i = σ(k_t + h), f = σ(q_t − h), h_t = tanh(i ⊙ v_t + f ⊙ h)."""
    q32, k32, v32, h = _f32(q, k, v, h0)
    h = _zeros_state(q32, h)
    out = []
    for t in range(q.shape[1]):
        i = torch.sigmoid(k32[:, t] + h)
        f = torch.sigmoid(q32[:, t] - h)
        h = torch.tanh(i * v32[:, t] + f * h)
        out.append(h)
    hs = torch.stack(out, 1).to(q.dtype)
    return hs, hs[:, -1]


# --------------------------------------------------------------------------------------------- oLRN


def olrn_loop(q, k, v, o, h0=None) -> tuple[Tensor, Tensor]:
    """oLRN (seed 001, eq. 11–13): c = i ⊙ v_t + f ⊙ h, o_t = σ(o_t − c), h_t = o_t ⊙ c."""
    q32, k32, v32, o32, h = _f32(q, k, v, o, h0)
    h = _zeros_state(q32, h)
    out = []
    for t in range(q.shape[1]):
        i = torch.sigmoid(k32[:, t] + h)
        f = torch.sigmoid(q32[:, t] - h)
        c = i * v32[:, t] + f * h
        h = torch.sigmoid(o32[:, t] - c) * c
        out.append(h)
    hs = torch.stack(out, 1).to(q.dtype)
    return hs, hs[:, -1]


@torch.no_grad()
def _lrn_family_fwd(q, k, v, o, h0) -> Tensor:
    """LRN (``o`` None: h = tanh(c)) or oLRN (h = σ(o_t − c) ⊙ c), c = i ⊙ v_t + f ⊙ h_{t−1}."""
    q32, k32, v32, o32, h = _f32(q, k, v, o, h0)
    h = _zeros_state(q32, h)
    out = torch.empty_like(q32)
    for t in range(q.shape[1]):
        i = torch.sigmoid(k32[:, t] + h)
        f = torch.sigmoid(q32[:, t] - h)
        c = i * v32[:, t] + f * h
        h = torch.tanh(c) if o is None else torch.sigmoid(o32[:, t] - c) * c
        out[:, t] = h
    return out.to(q.dtype)


@torch.no_grad()
def _lrn_family_bwd(q, k, v, o, h, h0, dh):
    """Gradients for :func:`_lrn_family_fwd`, walking T backwards with the carry g = dL/dh_t.

    dc = g·(1 − h_t²) for LRN; for oLRN with z = o_t − c: dz = g·c·og(1 − og), dc = g·og − dz.
    Then dk = dc·v·i(1 − i), dq = dc·h_{t−1}·f(1 − f), dv = dc·i, g_{t−1} += dc·f + dk − dq.
    """
    q32, k32, v32, o32, h32, h0_, dh32 = _f32(q, k, v, o, h, h0, dh)
    dq, dk, dv = (torch.empty_like(q32) for _ in range(3))
    do = torch.empty_like(q32) if o is not None else None
    g = torch.zeros_like(q32[:, 0])
    first = _zeros_state(q32, h0_)
    for t in range(q.shape[1] - 1, -1, -1):
        hp = h32[:, t - 1] if t > 0 else first
        g = g + dh32[:, t]
        i = torch.sigmoid(k32[:, t] + hp)
        f = torch.sigmoid(q32[:, t] - hp)
        if o is None:
            dc = g * (1 - h32[:, t] ** 2)
        else:
            c = i * v32[:, t] + f * hp
            og = torch.sigmoid(o32[:, t] - c)
            dz = g * c * og * (1 - og)
            dc = g * og - dz
            do[:, t] = dz
        di = dc * v32[:, t] * i * (1 - i)
        df = dc * hp * f * (1 - f)
        dk[:, t], dq[:, t], dv[:, t] = di, df, dc * i
        g = dc * f + di - df
    dh0 = None if h0 is None else g.to(h0.dtype)
    grads = [dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)]
    return (*grads, dh0) if o is None else (*grads, do.to(o.dtype), dh0)


def lrn_fwd(q: Tensor, k: Tensor, v: Tensor, h0: Tensor | None) -> Tensor:
    return _lrn_family_fwd(q, k, v, None, h0)


def lrn_bwd(q, k, v, h, h0, dh) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dh0)."""
    return _lrn_family_bwd(q, k, v, None, h, h0, dh)


def olrn_fwd(q, k, v, o, h0) -> Tensor:
    return _lrn_family_fwd(q, k, v, o, h0)


def olrn_bwd(q, k, v, o, h, h0, dh):
    """(dq, dk, dv, do, dh0)."""
    return _lrn_family_bwd(q, k, v, o, h, h0, dh)


# ---------------------------------------------------------------------------------------------- SRU


def sru_loop(u, fp, rp, x, vf, vr, c0=None) -> tuple[Tensor, Tensor]:
    """SRU (Lei et al. 2018): f = σ(fp_t + v_f ⊙ c), r = σ(rp_t + v_r ⊙ c) with c = c_{t−1},
    c_t = f ⊙ c + (1 − f) ⊙ u_t, h_t = r ⊙ c_t + (1 − r) ⊙ x_t. Returns (h, c) [B, T, D]."""
    u32, fp32, rp32, x32, vf32, vr32, c = _f32(u, fp, rp, x, vf, vr, c0)
    c = _zeros_state(u32, c)
    hs, cs = [], []
    for t in range(u.shape[1]):
        f = torch.sigmoid(fp32[:, t] + vf32 * c)
        r = torch.sigmoid(rp32[:, t] + vr32 * c)
        c = f * c + (1 - f) * u32[:, t]
        hs.append(r * c + (1 - r) * x32[:, t])
        cs.append(c)
    return torch.stack(hs, 1).to(u.dtype), torch.stack(cs, 1).to(u.dtype)


@torch.no_grad()
def sru_fwd(u, fp, rp, x, vf, vr, c0) -> tuple[Tensor, Tensor]:
    u32, fp32, rp32, x32, vf32, vr32, c = _f32(u, fp, rp, x, vf, vr, c0)
    c = _zeros_state(u32, c)
    hs, cs = torch.empty_like(u32), torch.empty_like(u32)
    for t in range(u.shape[1]):
        f = torch.sigmoid(fp32[:, t] + vf32 * c)
        r = torch.sigmoid(rp32[:, t] + vr32 * c)
        c = f * c + (1 - f) * u32[:, t]
        hs[:, t] = r * c + (1 - r) * x32[:, t]
        cs[:, t] = c
    return hs.to(u.dtype), cs.to(u.dtype)


@torch.no_grad()
def sru_bwd(u, fp, rp, x, vf, vr, c0, c, dh, dc):
    """(du, dfp, drp, dx, dvf, dvr, dc0) given dL/dh and dL/dc (the returned cell states)."""
    u32, fp32, rp32, x32, vf32, vr32, c32, c0_, dh32, dc32 = _f32(u, fp, rp, x, vf, vr, c, c0, dh, dc)
    du, dfp, drp, dx = (torch.empty_like(u32) for _ in range(4))
    dvf = torch.zeros_like(u32[:, 0])
    dvr = torch.zeros_like(u32[:, 0])
    carry = torch.zeros_like(u32[:, 0])
    first = _zeros_state(u32, c0_)
    for t in range(u.shape[1] - 1, -1, -1):
        cp = c32[:, t - 1] if t > 0 else first
        f = torch.sigmoid(fp32[:, t] + vf32 * cp)
        r = torch.sigmoid(rp32[:, t] + vr32 * cp)
        g = carry + dc32[:, t] + dh32[:, t] * r  # total dL/dc_t
        dr = dh32[:, t] * (c32[:, t] - x32[:, t]) * r * (1 - r)
        dfg = g * (cp - u32[:, t]) * f * (1 - f)
        du[:, t], dx[:, t], drp[:, t], dfp[:, t] = g * (1 - f), dh32[:, t] * (1 - r), dr, dfg
        dvf += dfg * cp
        dvr += dr * cp
        carry = g * f + dfg * vf32 + dr * vr32
    dc0 = None if c0 is None else carry.to(c0.dtype)
    return (
        du.to(u.dtype),
        dfp.to(fp.dtype),
        drp.to(rp.dtype),
        dx.to(x.dtype),
        dvf.sum(0).to(vf.dtype),
        dvr.sum(0).to(vr.dtype),
        dc0,
    )
