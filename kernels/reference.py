"""PyTorch references for the recurrences: plain loops (the test oracles) and fast CPU forms.

Shapes: inputs ``[B, T, D]``, states ``[B, D]``. Every function computes in float32 (float64 stays
float64) and returns outputs in the input dtype.

- ``*_loop``: the equations one time step at a time, differentiated by autograd. Slow; the oracle.
- ``*_fwd`` / ``*_bwd``: what the custom ops run on CPU. The linear scan is a two-level chunked
  scan written in place (:mod:`rnnpipe.kernels.cpu_scan`, about 2·√T vectorized steps instead of T); the
  nonlinear recurrences a lean forward loop and a backward made of linear scans
  (:mod:`rnnpipe.kernels.cpu_rnn`); ``lrn_packed_*`` take LRN's or oLRN's projection as one tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnpipe.kernels import cpu_rnn, cpu_scan


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


scan_fwd, scan_bwd = cpu_scan.scan_fwd, cpu_scan.scan_bwd  # the in-place chunked scan


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


def lrn_fwd(q: Tensor, k: Tensor, v: Tensor, h0: Tensor | None) -> Tensor:
    """h [B, T, D] by :func:`rnnpipe.kernels.cpu_rnn.lrn_family_fwd`."""
    return cpu_rnn.lrn_family_fwd(q, k, v, None, h0)


def lrn_bwd(q, k, v, h, h0, dh) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dq, dk, dv, dh0) by :func:`rnnpipe.kernels.cpu_rnn.lrn_family_bwd`."""
    return cpu_rnn.lrn_family_bwd(q, k, v, None, h, h0, dh)


def olrn_fwd(q, k, v, o, h0) -> Tensor:
    """h [B, T, D] by :func:`rnnpipe.kernels.cpu_rnn.lrn_family_fwd`."""
    return cpu_rnn.lrn_family_fwd(q, k, v, o, h0)


def olrn_bwd(q, k, v, o, h, h0, dh):
    """(dq, dk, dv, do, dh0) by :func:`rnnpipe.kernels.cpu_rnn.lrn_family_bwd`."""
    return cpu_rnn.lrn_family_bwd(q, k, v, o, h, h0, dh)


lrn_packed_fwd, lrn_packed_bwd = cpu_rnn.lrn_packed_fwd, cpu_rnn.lrn_packed_bwd  # q, k, v in one tensor


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


sru_fwd, sru_bwd = cpu_rnn.sru_fwd, cpu_rnn.sru_bwd  # loop forward, scan backward
