"""Recurrence kernels: Triton on CUDA, PyTorch references elsewhere, as torch custom ops.

All take ``[B, T, D]`` inputs (float32, bfloat16 or float16; float64 on the reference), accumulate
in float32, return outputs in the input dtype, and are differentiable (hand-written backward
passes). Each returns ``(outputs, last_state)`` so a sequence can be continued from the state.
Kernels know nothing of training: parameters enter only where the equations need them (SRU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnpipe.kernels.ops import backend, linear_scan_op, lrn_family, sru_op

__all__ = ["backend", "linear_scan", "lrn_recurrence", "olrn_recurrence", "sru_recurrence"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check(
    name: str,
    *xs: Tensor,
    state: Tensor | None = None,
    state_name: str = "h0",
    state_shape: tuple[int, ...] | None = None,
) -> None:
    """The inputs ``xs`` are [B, T, D] with T >= 1, of one shape and a supported dtype; ``state``
    (when given) has ``state_shape``: a row's state is what the kernel carries, [B, D] for the
    element-wise recurrences (the default), another shape for a kernel whose state is a matrix
    per row (a GLA's [B, H, K, V]), which names its own."""
    first = xs[0]
    if first.dim() != 3 or first.shape[1] < 1:
        raise ValueError(f"{name}: inputs must be [B, T, D] with T >= 1, got {tuple(first.shape)}")
    for x in xs:
        if x.shape != first.shape:
            raise ValueError(f"{name}: input shapes differ: {tuple(x.shape)} vs {tuple(first.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {x.dtype} is not supported (float32, bfloat16, float16, float64)")
    expected = (first.shape[0], first.shape[2]) if state_shape is None else tuple(state_shape)
    if state is not None and tuple(state.shape) != expected:
        what = "[B, D] =" if state_shape is None else "of shape"
        raise ValueError(f"{name}: {state_name} must be {what} {expected}, got {tuple(state.shape)}")


def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """h_t = a_t ⊙ h_{t−1} + b_t with h_{−1} = h0 (zeros if None). Returns (h [B, T, D], h_last [B, D])."""
    _check("linear_scan", a, b, state=h0)
    h = linear_scan_op(a, b, h0)
    return h, h[:, -1]


def lrn_recurrence(q: Tensor, k: Tensor, v: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """LRN: i_t = σ(k_t + h_{t−1}), f_t = σ(q_t − h_{t−1}), h_t = tanh(i_t ⊙ v_t + f_t ⊙ h_{t−1}).

    ``q, k, v`` are the projections XW_q, XW_k, XW_v [B, T, D]. Returns (h, h_last).
    """
    _check("lrn_recurrence", q, k, v, state=h0)
    h = lrn_family(q, k, v, None, h0)
    return h, h[:, -1]


def olrn_recurrence(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, h0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """oLRN: c_t = i_t ⊙ v_t + f_t ⊙ h_{t−1} (gates as LRN), h_t = σ(o_t − c_t) ⊙ c_t, o = XW_o."""
    _check("olrn_recurrence", q, k, v, o, state=h0)
    h = lrn_family(q, k, v, o, h0)
    return h, h[:, -1]


def sru_recurrence(
    u: Tensor, fp: Tensor, rp: Tensor, x: Tensor, vf: Tensor, vr: Tensor, c0: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """SRU: f_t = σ(fp_t + v_f ⊙ c_{t−1}), r_t = σ(rp_t + v_r ⊙ c_{t−1}),
    c_t = f_t ⊙ c_{t−1} + (1 − f_t) ⊙ u_t, h_t = r_t ⊙ c_t + (1 − r_t) ⊙ x_t.

    ``u = XW``, ``fp = XW_f + b_f``, ``rp = XW_r + b_r``, ``x`` the highway input, ``vf, vr`` [D].
    Returns (h [B, T, D], c_last [B, D]). The v vectors are cloned before entering the op: the op
    keeps its own copy for backward, so ZeRO-3 may re-partition the parameters after forward.
    """
    _check("sru_recurrence", u, fp, rp, x, state=c0, state_name="c0")
    if vf.shape != (u.shape[2],) or vr.shape != (u.shape[2],):
        raise ValueError(f"sru_recurrence: vf and vr must be [D] = [{u.shape[2]}]")
    h, c = sru_op(u, fp, rp, x, vf.clone(), vr.clone(), c0)
    return h, c[:, -1]
