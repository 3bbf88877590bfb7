"""Recurrent mixers: ``mixer(x_BTD, state) -> (y_BTD, new_state)``, ``init_state(batch)``.

The state is everything needed to continue a sequence: feeding [x1; x2] equals feeding x1, then
x2 with the returned state. All matrix work is outside the recurrence (one fused projection per
mixer); the recurrences are the element-wise kernels of :mod:`rnnpipe.kernels`, except ATR (its U·h_{t−1}
is a matrix product inside the recurrence) and torch's LSTM and GRU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rnnpipe.kernels import linear_scan, lrn_recurrence, olrn_recurrence, sru_recurrence

State = Tensor | tuple[Tensor, ...] | None


def detach_state(state: Any) -> Any:
    """A state (or a list of per-layer states) cut from the autograd graph, for truncated BPTT."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)


class Mixer(nn.Module):
    """Base: ``forward(x_BTD, state=None) -> (y_BTD, state)``; ``state=None`` means the zero state."""

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        return torch.zeros(batch, self.d_model, device=device, dtype=dtype or torch.float32)


class LRN(Mixer):
    """Q, K, V = XW_q, XW_k, XW_v; i = σ(k + h), f = σ(q − h), h_t = tanh(i ⊙ v + f ⊙ h)
    (seed 001, eq. 1–4)."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.proj = nn.Linear(d_model, 3 * d_model)

    def forward(self, x_BTD: Tensor, state: State = None) -> tuple[Tensor, State]:
        q, k, v = self.proj(x_BTD).chunk(3, dim=-1)
        return lrn_recurrence(q, k, v, state)


class OLRN(Mixer):
    """LRN with an output gate: c = i ⊙ v + f ⊙ h, o = σ(W_o x − c), h_t = o ⊙ c (seed 001, eq. 11–13)."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.proj = nn.Linear(d_model, 4 * d_model)

    def forward(self, x_BTD, state=None):
        q, k, v, o = self.proj(x_BTD).chunk(4, dim=-1)
        return olrn_recurrence(q, k, v, o, state)


def _wide(t: Tensor | None) -> Tensor | None:
    """``t`` in float32 when it is of a narrower float type (bf16, fp16); as it is otherwise
    (float32, and float64 for the tests' exact checks)."""
    if t is None or t.dtype not in (torch.bfloat16, torch.float16):
        return t
    return t.float()


# minGRU and minLSTM compute their gates and run their scan in float32 when the model runs in bf16:
# in bf16 a decay of 0.99909 (1 - σ(-7)) rounds to exactly 1.0 and the state stops forgetting
# (over 10k carried tokens mean |h| grew to 3x fp32's). fla feeds its log-decays in fp32 likewise.
# The state they carry is float32; the layer's output has the input's dtype.
class MinGRU(Mixer):
    """z = σ(W_z x), h̃ = W_h x, h_t = (1 − z) ⊙ h_{t−1} + z ⊙ h̃: a linear scan (Feng et al. 2024)."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.proj = nn.Linear(d_model, 2 * d_model)

    def forward(self, x_BTD, state=None):
        z_pre, h_tilde = _wide(self.proj(x_BTD)).chunk(2, dim=-1)
        z = torch.sigmoid(z_pre)
        h_BTD, state = linear_scan(1 - z, z * h_tilde, _wide(state))
        return h_BTD.to(x_BTD.dtype), state


class MinLSTM(Mixer):
    """f = σ(W_f x), i = σ(W_i x), h̃ = W_h x; f' = f/(f + i), i' = i/(f + i);
    h_t = f' ⊙ h_{t−1} + i' ⊙ h̃ (Feng et al. 2024)."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.proj = nn.Linear(d_model, 3 * d_model)

    def forward(self, x_BTD, state=None):
        f_pre, i_pre, h_tilde = _wide(self.proj(x_BTD)).chunk(3, dim=-1)
        f, i = torch.sigmoid(f_pre), torch.sigmoid(i_pre)
        total = f + i
        h_BTD, state = linear_scan(f / total, (i / total) * h_tilde, _wide(state))
        return h_BTD.to(x_BTD.dtype), state


class SRU(Mixer):
    """f = σ(W_f x + v_f ⊙ c_{t−1} + b_f), r = σ(W_r x + v_r ⊙ c_{t−1} + b_r),
    c_t = f ⊙ c_{t−1} + (1 − f) ⊙ W x, h_t = r ⊙ c_t + (1 − r) ⊙ x (Lei et al. 2018). The state is c."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.bias = nn.Parameter(torch.zeros(2 * d_model))  # b_f, b_r
        self.v = nn.Parameter(torch.empty(2, d_model).uniform_(-0.5, 0.5))  # v_f, v_r as in SRU's code

    def forward(self, x_BTD, state=None):
        u, f_pre, r_pre = self.proj(x_BTD).chunk(3, dim=-1)
        b_f, b_r = self.bias.chunk(2)
        return sru_recurrence(u, f_pre + b_f, r_pre + b_r, x_BTD, self.v[0], self.v[1], state)


class ATR(Mixer):
    """p = W x_t + b, q = U h_{t−1}; i = σ(p + q), f = σ(p − q), h_t = i ⊙ p + f ⊙ h_{t−1}
    (Zhang et al. 2018). U·h_{t−1} is a matrix product in the recurrence: a loop over time."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.w = nn.Linear(d_model, d_model)
        self.u = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BTD, state=None):
        p_BTD = self.w(x_BTD)
        h = torch.zeros_like(p_BTD[:, 0]) if state is None else state.to(p_BTD.dtype)
        out = []
        for t in range(p_BTD.shape[1]):
            q = self.u(h)
            p = p_BTD[:, t]
            h = torch.sigmoid(p + q) * p + torch.sigmoid(p - q) * h
            out.append(h)
        return torch.stack(out, dim=1), h


class LSTM(Mixer):
    """torch.nn.LSTM (cuDNN on GPU); the state is (h, c), each [1, B, D]."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.rnn = nn.LSTM(d_model, d_model, batch_first=True)

    def init_state(self, batch, device=None, dtype=None):
        z = torch.zeros(1, batch, self.d_model, device=device, dtype=dtype or torch.float32)
        return z, z.clone()

    def forward(self, x_BTD, state=None):
        y, (h, c) = self.rnn(x_BTD, state)
        return y, (h, c)


class GRU(Mixer):
    """torch.nn.GRU (cuDNN on GPU); the state is h [1, B, D]."""

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.rnn = nn.GRU(d_model, d_model, batch_first=True)

    def init_state(self, batch, device=None, dtype=None):
        return torch.zeros(1, batch, self.d_model, device=device, dtype=dtype or torch.float32)

    def forward(self, x_BTD, state=None):
        return self.rnn(x_BTD, state)
