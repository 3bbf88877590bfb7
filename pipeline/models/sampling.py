"""Sampling for every language model rnnpipe trains: ``stream`` and ``generate`` on top of
``model(tokens_BT, state) -> (logits_BTV, state)``, whatever the state holds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


class Sampler(nn.Module):
    """A module whose forward maps (tokens [B, T], state) to (logits [B, T, V], state)."""

    @torch.no_grad()
    def stream(
        self,
        prompt: Tensor,
        n: int,
        temperature: float = 1.0,
        top_k: int = 0,
        state: Any = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[Tensor]:
        """Yield ``n`` sampled tokens after ``prompt`` [B, P] (or [P]), one tensor [B, 1] at a time.

        The prompt (P ≥ 1) is read once, from ``state`` (None: the zero state); then each token costs one
        step with the carried state (O(1) memory per token for the recurrent mixers; attention layers
        grow their KV cache). ``temperature=0`` takes the most likely token; ``top_k`` > 0 samples from
        the k likeliest. Random draws come from ``generator`` only (the global generator when None).
        """
        tokens = prompt[None] if prompt.dim() == 1 else prompt
        logits, state = self(tokens, state)
        for i in range(n):
            nxt = self._pick(logits[:, -1].float(), temperature, top_k, generator)
            yield nxt
            if i + 1 < n:  # the state after the last token is never read: skip that step
                logits, state = self(nxt, state)

    @staticmethod
    def _pick(last_BV: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> Tensor:
        """The next token [B, 1] from the fp32 logits [B, V] of the last position."""
        if temperature == 0:
            return last_BV.argmax(-1, keepdim=True)
        scaled_BV = last_BV / temperature
        if not bool(torch.isfinite(scaled_BV).all()):  # a tiny temperature overflows: shift first
            scaled_BV = (last_BV - last_BV.amax(-1, keepdim=True)) / temperature
        last_BV = scaled_BV
        if top_k:
            kth = last_BV.topk(min(top_k, last_BV.shape[-1]), dim=-1).values[:, -1:]
            last_BV = last_BV.masked_fill(last_BV < kth, float("-inf"))
        return torch.multinomial(last_BV.softmax(-1), 1, generator=generator)

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        n: int,
        temperature: float = 1.0,
        top_k: int = 0,
        state: Any = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``n`` ≥ 1 tokens after ``prompt`` [B, P] (or [P]); returns the new tokens [B, n].

        The tokens :meth:`stream` yields, collected: the same ``generator`` seed gives the same tokens.
        """
        return torch.cat(list(self.stream(prompt, n, temperature, top_k, state, generator)), dim=1)
