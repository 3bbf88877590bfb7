"""Causal multi-head attention with rotary positions; its state is the KV cache.

Shapes: B batch, T positions, D width, H heads, K head width, L cached positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnpipe.pipeline.models.config import ModelConfig
from rnnpipe.pipeline.models.mixers import Mixer, State


def rotary(x_BHTK: Tensor, start: int, base: float) -> Tensor:
    """Rotate channel pairs (k, k + K/2) by position × base^(−2k/K); positions start at ``start``."""
    K = x_BHTK.shape[-1]
    T = x_BHTK.shape[-2]
    # Angles in float64: at position 65,536 float32 would be off by about 0.004 rad. [T, K/2] is small.
    freqs = base ** (-torch.arange(0, K // 2, device=x_BHTK.device, dtype=torch.float64) * 2 / K)
    angles = torch.arange(start, start + T, device=x_BHTK.device, dtype=torch.float64)[:, None] * freqs
    cos, sin = angles.cos().to(x_BHTK.dtype), angles.sin().to(x_BHTK.dtype)
    x1, x2 = x_BHTK[..., : K // 2], x_BHTK[..., K // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(Mixer):
    """``scaled_dot_product_attention`` over the cache and the new positions.

    The state is (keys, values, position): the rotated keys and the values [B, H, L, K] of the
    last L ≤ ``memory`` positions (all of them when ``memory`` is 0), and how many positions came
    before, so rotary offsets stay right after old positions are dropped. With memory 0, feeding a
    sequence in pieces gives what feeding it at once gives.
    """

    kind = "attention"
    param_coeffs = (4, 0)  # W_qkv, W_out; no biases
    # rotary positions on q and k, 3 per element each (the context's part: flops_per_token)
    flop_coeffs = (8, 6)
    saved_activations = 5  # q, k, v and the outputs
    state_batch_dims = (0, 0, None)  # keys [B, H, L, K], values [B, H, L, K], the position count
    state_grows = True

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Attention:
        return cls(cfg.d_model, cfg.n_heads, cfg.rope_base, cfg.attention_memory)

    @classmethod
    def flops_per_token(cls, cfg: ModelConfig, seq_len: int) -> tuple[int, int]:
        """The projections and rotary positions, plus 4·d·T for the scores and the weighted sum over
        a context of T = ``seq_len`` (not halved for causality: PaLM's convention) and the softmax."""
        matmul, elementwise = super().flops_per_token(cfg, seq_len)
        return matmul + 4 * cfg.d_model * seq_len, elementwise + 4 * cfg.n_heads * seq_len

    def __init__(self, d_model: int, n_heads: int, rope_base: float = 10000.0, memory: int = 0):
        super().__init__(d_model)
        self.n_heads = n_heads
        self.rope_base = rope_base
        self.memory = memory
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch, device=None, dtype=None):
        k = self.d_model // self.n_heads
        empty = torch.zeros(batch, self.n_heads, 0, k, device=device, dtype=dtype or torch.float32)
        return empty, empty.clone(), torch.zeros((), dtype=torch.int64, device=device)

    def forward(self, x_BTD: Tensor, state: State = None) -> tuple[Tensor, State]:
        B, T, D = x_BTD.shape
        H = self.n_heads
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in self.qkv(x_BTD).chunk(3, dim=-1))
        position = 0 if state is None else int(state[2])
        q, k = rotary(q, position, self.rope_base), rotary(k, position, self.rope_base)
        cached = 0 if state is None else state[0].shape[2]
        if cached:
            k = torch.cat([state[0].to(k.dtype), k], dim=2)
            v = torch.cat([state[1].to(v.dtype), v], dim=2)
            # new position i sees every cached position and the new ones up to itself
            rows = torch.arange(T, device=x_BTD.device)[:, None]
            mask = torch.arange(cached + T, device=x_BTD.device)[None, :] <= cached + rows
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.memory:
            k, v = k[:, :, -self.memory :], v[:, :, -self.memory :]
        new_position = torch.tensor(position + T, dtype=torch.int64, device=x_BTD.device)
        return self.out(y.transpose(1, 2).reshape(B, T, D)), (k, v, new_position)
