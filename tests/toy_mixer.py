"""A mixer of the tests' own, defined outside rnnpipe as one class: the worked example of
docs/models.md ("Add a mixer").

A tiny gated linear attention (GLA, Yang et al. 2024) whose state is a matrix per head,
[B, H, K, V], not rnnpipe's usual [B, D]. Per head, with K = V = D / H:

    q, k, v, g = x W (no bias), each split into H heads
    S_t = diag(σ(g_t)) S_{t−1} + k_t v_tᵀ            (K × V: a decayed sum of outer products)
    o_t = S_tᵀ q_t / √K,   y = [o_t of every head] W_o

The recurrence is a plain PyTorch loop over time, in float32 (float64 for a float64 input). A run
finds the class through ``RNNPIPE_PLUGINS=toy_mixer`` (and this folder on ``PYTHONPATH``): the
launcher, every rank and the export import it, and ``model.mixer=toy_gla`` names it.

Shapes: B batch, T positions, D width, H heads, K key width, V value width (K = V = D / H).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.models.config import ModelConfig
from rnnpipe.pipeline.models.flops import SIGMOID
from rnnpipe.pipeline.models.mixers import Mixer, State


class ToyGLA(Mixer):
    """Gated linear attention: a matrix state per head, decayed per key and added an outer product."""

    kind = "toy_gla"  # model.mixer=toy_gla
    param_coeffs = (5, 0)  # W [D, 4D] and W_o [D, D], no biases: 5d²
    # The projections 10d²; the gate's σ 4d and the 1/√K scale d. The state's part is per head
    # (d²/H, not a multiple of d² or d): flops_per_token adds it.
    flop_coeffs = (10, SIGMOID + 1)
    saved_activations = 5  # q, k, v, g and o; the per-step states: activation_values
    fp32_recurrence = True  # the state is float32 whatever the model's dtype
    state_batch_dims = (0,)  # S [B, H, K, V]: rows first (the default, said here for the example)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> ToyGLA:
        if cfg.d_model % cfg.n_heads:
            raise ConfigError(f"model.d_model ({cfg.d_model}) must split into model.n_heads ({cfg.n_heads})")
        return cls(cfg.d_model, cfg.n_heads)

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> tuple[int, int]:
        """Per head, the readout S_tᵀ q_t is a matrix product (2·K·V); the decay, the outer product
        and their sum are element-wise (3·K·V). H·K·V = d²/H."""
        matmul, elementwise = super().flops_per_token(cfg, seq_len)
        per_state = cfg.d_model * cfg.d_model // cfg.n_heads
        return matmul + 2 * per_state, elementwise + 3 * per_state

    @classmethod
    def activation_values(cls, cfg: ModelConfig) -> int:
        """q, k, v, g and o (5d), and the two states backward keeps per step (2·d²/H)."""
        return super().activation_values(cfg) + 2 * cfg.d_model * cfg.d_model // cfg.n_heads

    def __init__(self, d_model: int, n_heads: int):
        super().__init__(d_model)
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.proj = nn.Linear(d_model, 4 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def init_state(
        self, batch: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """The zero state S [B, H, K, V]."""
        H, K = self.n_heads, self.head_dim
        return torch.zeros(batch, H, K, K, device=device, dtype=dtype or torch.float32)

    def forward(self, x_BTD: Tensor, state: State = None) -> tuple[Tensor, Tensor]:
        """y [B, T, D] and the state after the last position, S [B, H, K, V]."""
        B, T, D = x_BTD.shape
        H, K = self.n_heads, self.head_dim
        dtype = torch.promote_types(x_BTD.dtype, torch.float32)
        q_BTHK, k_BTHK, v_BTHK, g_BTHK = self.proj(x_BTD).to(dtype).view(B, T, 4, H, K).unbind(2)
        decay_BTHK = torch.sigmoid(g_BTHK)
        q_BTHK = q_BTHK * K**-0.5
        S_BHKV = self.init_state(B, x_BTD.device, dtype) if state is None else state.to(dtype)
        outs = []
        for t in range(T):
            S_BHKV = (
                decay_BTHK[:, t, :, :, None] * S_BHKV + k_BTHK[:, t, :, :, None] * v_BTHK[:, t, :, None, :]
            )
            outs.append(torch.einsum("bhk,bhkv->bhv", q_BTHK[:, t], S_BHKV))
        o_BTD = torch.stack(outs, dim=1).reshape(B, T, D)
        return self.out(o_BTD.to(x_BTD.dtype)), S_BHKV
