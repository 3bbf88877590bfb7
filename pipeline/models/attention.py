"""Causal multi-head attention with rotary positions; its state is the KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.mixers import Mixer, State


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

    The state is (keys, values) [B, H, L, K] of every earlier position (rotated keys), so that
    feeding a sequence in pieces gives what feeding it at once gives; it grows by T per call.
    """

    def __init__(self, d_model: int, n_heads: int, rope_base: float = 10000.0):
        super().__init__(d_model)
        self.n_heads = n_heads
        self.rope_base = rope_base
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch, device=None, dtype=None):
        k = self.d_model // self.n_heads
        empty = torch.zeros(batch, self.n_heads, 0, k, device=device, dtype=dtype or torch.float32)
        return empty, empty.clone()

    def forward(self, x_BTD: Tensor, state: State = None) -> tuple[Tensor, State]:
        B, T, D = x_BTD.shape
        H = self.n_heads
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in self.qkv(x_BTD).chunk(3, dim=-1))
        past = 0 if state is None else state[0].shape[2]
        q, k = rotary(q, past, self.rope_base), rotary(k, past, self.rope_base)
        if state is not None and past:
            k = torch.cat([state[0].to(k.dtype), k], dim=2)
            v = torch.cat([state[1].to(v.dtype), v], dim=2)
        if past:  # new position i sees cached positions and new ones up to itself
            mask = (
                torch.arange(past + T, device=x_BTD.device)[None, :]
                <= past + torch.arange(T, device=x_BTD.device)[:, None]
            )
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D)), (k, v)
