"""Recurrent mixers: ``mixer(x_BTD, state) -> (y_BTD, new_state)``, ``init_state(batch)``.

The state is everything needed to continue a sequence: feeding [x1; x2] equals feeding x1, then
x2 with the returned state. All matrix work is outside the recurrence (one fused projection per
mixer); the recurrences are the element-wise kernels of :mod:`rnnpipe.kernels`, except ATR (its U·h_{t−1}
is a matrix product inside the recurrence) and torch's LSTM and GRU.

Every mixer is one :class:`Mixer` subclass that declares itself (its config name, parameter and
FLOP coefficients, saved activations, state layout); defining it registers it
(:mod:`rnnpipe.pipeline.models.registry`). Element-wise FLOPs follow
:mod:`rnnpipe.pipeline.models.flops`' conventions (σ and tanh 4, +, −, ×, ÷ 1).

Shapes: B batch, T positions, D width (d_model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from rnnpipe.kernels import linear_scan, lrn_recurrence, olrn_recurrence, sru_recurrence
from rnnpipe.pipeline.models.config import ModelConfig
from rnnpipe.pipeline.models.flops import SIGMOID, TANH
from rnnpipe.pipeline.models.registry import find_mixer, register_mixer

State = Tensor | tuple[Tensor, ...] | None


def detach_state(state: Any) -> Any:
    """A state (or a list of per-layer states) cut from the autograd graph, for truncated BPTT."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)


class Mixer(nn.Module):
    """Base: ``forward(x_BTD, state=None) -> (y_BTD, state)``; ``state=None`` means the zero state.

    A subclass declares itself with the class attributes below. One that sets ``kind`` is
    registered under it: ``model.mixer=<kind>`` builds it (:meth:`from_config`), and the FLOP and
    memory estimates, the elastic remap and the Hugging Face cache read its declarations. It
    must then declare ``param_coeffs``, ``flop_coeffs`` and ``saved_activations`` (the tests check
    them against the module and torch's FlopCounterMode); a cost that is not a multiple of d² or d
    (attention's context, a matrix state's d²/heads) is its classmethod's override. The
    classmethods take no module: the remap and the cache know a layer by its kind only.

    The state is whatever :meth:`init_state` returns and ``forward`` carries: a tensor or a tuple
    of tensors of any shape (h [B, D] for most mixers, torch's LSTM (h, c) [1, B, D] each,
    attention's KV cache, a matrix per head [B, H, K, V]), as long as ``state_batch_dims`` says
    where its rows are: the elastic remap joins and splits it across ranks by them, and the
    Hugging Face cache selects, repeats and stacks rows by them (:meth:`map_state`,
    :meth:`join_states`, :meth:`split_state`).
    """

    kind: ClassVar[str] = ""  # the config name (model.mixer); "" = a base, not registered
    # Parameters p2·d² + p1·d at width d, as (p2, p1).
    param_coeffs: ClassVar[tuple[int, int] | None] = None
    # Forward FLOPs per token: matrix products m2·d², element-wise e1·d (bias adds and the
    # recurrence), as (m2, e1).
    flop_coeffs: ClassVar[tuple[int, int] | None] = None
    # Tensors of width d per token that backward keeps (projection outputs, the recurrence's outputs).
    saved_activations: ClassVar[int | None] = None
    # Gates and recurrence in float32 whatever the model's dtype: in bf16 they take twice the bytes.
    fp32_recurrence: ClassVar[bool] = False
    # The batch dimension of each tensor of the state, in order (a one-tensor state: one entry);
    # None for a value every row shares. The last entry stands for any further tensors. A 0-d
    # tensor (attention's position) is always shared.
    state_batch_dims: ClassVar[tuple[int | None, ...]] = (0,)
    # The state's size grows with the positions read (attention's KV cache): rows read one by one
    # (a left-padded batch) cannot be stacked again.
    state_grows: ClassVar[bool] = False
    # May serve as model.recurrence.cell: built as cls(width), its state read by summary_vector.
    summary_cell: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__ and cls.kind:  # declared by this class, not inherited
            missing = [
                name
                for name in ("param_coeffs", "flop_coeffs", "saved_activations")
                if getattr(cls, name) is None
            ]
            if missing:
                raise TypeError(
                    f"mixer {cls.__qualname__} (kind {cls.kind!r}) declares no {', '.join(missing)}"
                )
            register_mixer(cls)

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Mixer:
        """The layer a model of ``cfg`` has (``cls(cfg.d_model)``, unless it needs more keys)."""
        return cls(cfg.d_model)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> State:
        """The zero state of ``batch`` rows: [B, D] unless the subclass says otherwise."""
        return torch.zeros(batch, self.d_model, device=device, dtype=dtype or torch.float32)

    # ------------------------------------------------------------------------------------ costs

    @classmethod
    def param_count(cls, cfg: ModelConfig) -> int:
        """Parameters of one layer at ``cfg.d_model``."""
        p2, p1 = cls.param_coeffs
        d = cfg.d_model
        return p2 * d * d + p1 * d

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> tuple[int, int]:
        """Forward (matrix, element-wise) FLOPs per token of one layer over a context of ``seq_len``."""
        m2, e1 = cls.flop_coeffs
        d = cfg.d_model
        return m2 * d * d, e1 * d

    @classmethod
    def activation_values(cls, cfg: ModelConfig) -> int:
        """Values per token that backward keeps of one layer (counted in the recurrence's dtype:
        the memory estimate doubles them for ``fp32_recurrence`` under bf16)."""
        return cls.saved_activations * cfg.d_model

    # ------------------------------------------------------------------------------ state layout

    @classmethod
    def batch_dim(cls, index: int, t: Tensor) -> int | None:
        """The batch dimension of tensor ``index`` of a state, ``t``; None for a shared value."""
        if t.dim() == 0:
            return None
        dims = cls.state_batch_dims
        return dims[min(index, len(dims) - 1)]

    @classmethod
    def map_state(cls, state: State, fn: Callable[[Tensor, int], Tensor]) -> State:
        """``fn(tensor, batch_dim)`` on every tensor of ``state`` that has rows (shared ones as they
        are): select rows for a beam, repeat them, narrow to one."""
        if state is None:
            return None
        if isinstance(state, Tensor):
            dim = cls.batch_dim(0, state)
            return state if dim is None else fn(state, dim)
        out = []
        for i, t in enumerate(state):
            dim = cls.batch_dim(i, t)
            out.append(t if dim is None else fn(t, dim))
        return type(state)(out)

    @classmethod
    def join_states(cls, parts: Sequence[State]) -> State:
        """One state holding the rows of ``parts`` in order: each tensor concatenated along its batch
        dimension (streams of several ranks, rows read one by one). ValueError when the parts
        differ in structure or disagree on a shared value."""
        first = parts[0]
        if isinstance(first, Tensor):
            if not all(isinstance(p, Tensor) for p in parts):
                raise ValueError("the parts' states have different structures")
            return _join(list(parts), cls.batch_dim(0, first))
        if any(isinstance(p, Tensor) or len(p) != len(first) for p in parts):
            raise ValueError("the parts' states have different structures")
        return type(first)(_join([p[i] for p in parts], cls.batch_dim(i, t)) for i, t in enumerate(first))

    @classmethod
    def split_state(cls, state: State, parts: int) -> list[State]:
        """``state`` cut into ``parts`` states of equal rows, in order (shared values copied to
        each). ValueError when its rows do not divide evenly."""
        tensors = [state] if isinstance(state, Tensor) else list(state)
        columns = []
        for i, t in enumerate(tensors):
            dim = cls.batch_dim(i, t)
            if dim is None:
                columns.append([t.clone() for _ in range(parts)])
            elif t.shape[dim] % parts:
                raise ValueError(f"{t.shape[dim]} rows in dim {dim} do not split into {parts} equal parts")
            else:
                columns.append([p.clone() for p in t.split(t.shape[dim] // parts, dim=dim)])
        pieces = list(zip(*columns, strict=True))
        return [p[0] if isinstance(state, Tensor) else type(state)(p) for p in pieces]

    @classmethod
    def summary_vector(cls, state: State) -> Tensor:
        """A cell's state as one vector per row, [B, width] (``summary_cell`` mixers)."""
        return state


def _join(tensors: list[Tensor], dim: int | None) -> Tensor:
    """Tensors concatenated along ``dim``; for None (a shared value) the one value they all hold."""
    if dim is not None:
        return torch.cat(tensors, dim=dim)
    if any(not torch.equal(t, tensors[0]) for t in tensors):
        values = [t.tolist() for t in tensors]
        raise ValueError(f"the parts disagree on a value every row shares ({values})")
    return tensors[0].clone()


def state_layout(kind: str | None) -> type[Mixer]:
    """The class whose declarations lay out a state entry of ``kind``: the registered mixer's, or
    :class:`Mixer` itself (batch-first; 0-d shared) for an entry no mixer names (an added
    recurrence's fill count, memory and KV cache: ``AddedRecurrenceLM.state_kinds``)."""
    cls = None if kind is None else find_mixer(kind)
    return cls if cls is not None else Mixer


class LRN(Mixer):
    """Q, K, V = XW_q, XW_k, XW_v; i = σ(k + h), f = σ(q − h), h_t = tanh(i ⊙ v + f ⊙ h)
    (seed 001, eq. 1–4)."""

    kind = "lrn"
    param_coeffs = (3, 3)
    # bias 3; k+h, q−h 2; two σ 8; i·v + f·h 3; tanh 4
    flop_coeffs = (6, 3 + 2 + 2 * SIGMOID + 3 + TANH)
    saved_activations = 4  # q, k, v and h
    summary_cell = True

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.proj = nn.Linear(d_model, 3 * d_model)

    def forward(self, x_BTD: Tensor, state: State = None) -> tuple[Tensor, State]:
        q, k, v = self.proj(x_BTD).chunk(3, dim=-1)
        return lrn_recurrence(q, k, v, state)


class OLRN(Mixer):
    """LRN with an output gate: c = i ⊙ v + f ⊙ h, o = σ(W_o x − c), h_t = o ⊙ c (seed 001, eq. 11–13)."""

    kind = "olrn"
    param_coeffs = (4, 4)
    # bias 4; as LRN without tanh 13; o − c 1; σ 4; ·c 1
    flop_coeffs = (8, 4 + 2 + 2 * SIGMOID + 3 + 1 + SIGMOID + 1)
    saved_activations = 5  # q, k, v, o and h

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

    kind = "mingru"
    param_coeffs = (2, 2)
    # bias 2; σ 4; 1 − z 1; z·h̃ 1; scan a·h + b 2
    flop_coeffs = (4, 2 + SIGMOID + 1 + 1 + 2)
    saved_activations = 5
    fp32_recurrence = True
    summary_cell = True

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

    kind = "minlstm"
    param_coeffs = (3, 3)
    # bias 3; two σ 8; f + i 1; two divisions 2; i'·h̃ 1; scan 2
    flop_coeffs = (6, 3 + 2 * SIGMOID + 1 + 2 + 1 + 2)
    saved_activations = 7
    fp32_recurrence = True

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

    kind = "sru"
    param_coeffs = (3, 4)  # W, W_f, W_r; b_f, b_r, v_f, v_r
    # bias 2; v·c + and σ for f and r 12; c update 4; highway 4
    flop_coeffs = (6, 2 + 2 * (2 + SIGMOID) + 4 + 4)
    saved_activations = 5  # the projection (3), the cell states and h

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

    kind = "atr"
    param_coeffs = (2, 1)  # W, U; b
    # bias 1; p ± q and σ 10; i·p + f·h 3
    flop_coeffs = (4, 1 + 2 * (1 + SIGMOID) + 3)
    saved_activations = 6

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

    kind = "lstm"
    param_coeffs = (8, 8)
    # biases 8; gate sums 4; three σ and a tanh 16; c update 3; tanh(c)·o 5
    flop_coeffs = (16, 8 + 4 + 3 * SIGMOID + TANH + 3 + TANH + 1)
    saved_activations = 10
    state_batch_dims = (1, 1)  # torch keeps [layers × directions = 1, B, D]

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

    kind = "gru"
    param_coeffs = (6, 6)
    # biases 6; r and z: sum and σ 10; n: r·h, sum, tanh 6; h update 4
    flop_coeffs = (12, 6 + 2 * (1 + SIGMOID) + 2 + TANH + 4)
    saved_activations = 8
    state_batch_dims = (1,)  # torch keeps [layers × directions = 1, B, D]
    summary_cell = True

    def __init__(self, d_model: int):
        super().__init__(d_model)
        self.rnn = nn.GRU(d_model, d_model, batch_first=True)

    def init_state(self, batch, device=None, dtype=None):
        return torch.zeros(1, batch, self.d_model, device=device, dtype=dtype or torch.float32)

    def forward(self, x_BTD, state=None):
        return self.rnn(x_BTD, state)

    @classmethod
    def summary_vector(cls, state: State) -> Tensor:
        return state[0]  # [1, B, D] -> [B, D]
