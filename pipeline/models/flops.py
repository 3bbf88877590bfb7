"""Parameter counts and forward FLOPs per token, in closed form, for every configuration.

The pretrain stage divides achieved FLOPs by the device's peak for MFU; training FLOPs are taken
as 3× forward (backward ≈ 2× forward), the PaLM convention. Matrix products count 2·m·n·k.
Element-wise work counts add, subtract, multiply and divide as 1 FLOP, sigmoid and tanh as 4,
GELU as 8. Attention adds 4·d·T per token per layer for the scores and the weighted sum over a
context of T, without halving for causality (as PaLM). Embedding lookups count 0. Each mixer's
own counts are its class's declarations (``Mixer.param_coeffs``, ``flop_coeffs``, read through the
mixer registry); this module adds the norms, MLPs, embedding and output layer. The formulas are in
docs/models.md; the tests check parameter counts against the modules and matrix FLOPs against
torch's FlopCounterMode.
"""

from __future__ import annotations

from rnnpipe.pipeline.models.config import ModelConfig, NormKind
from rnnpipe.pipeline.models.registry import mixer_class

SIGMOID = TANH = 4
GELU = 8


def _norm(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, FLOPs per token) of one norm."""
    d = cfg.d_model
    return (2 * d, 7 * d) if cfg.norm is NormKind.layernorm else (d, 4 * d)


def block_params(kind: str, cfg: ModelConfig) -> int:
    """Parameters of one block of mixer ``kind``: its norms, its mixer (as the mixer's class
    declares them) and its MLP."""
    d, m = cfg.d_model, round(cfg.mlp_ratio * cfg.d_model)
    norm, _ = _norm(cfg)
    mlp = 2 * d * m + m + d + norm if m else 0
    return norm + mixer_class(kind).param_count(cfg) + mlp


def model_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Distinct parameters of ``LanguageModel(cfg, vocab_size)``."""
    kinds = cfg.layer_kinds()
    blocks = list(dict.fromkeys(kinds)) if cfg.share_layers else kinds
    head = 0 if cfg.tie_embeddings else vocab_size * cfg.d_model
    return vocab_size * cfg.d_model + head + _norm(cfg)[0] + sum(block_params(k, cfg) for k in blocks)


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per token at context ``seq_len``: ``matmul``, ``elementwise``, ``total``.

    Shared layers still run once per layer: sharing saves parameters, not FLOPs.
    """
    d, m = cfg.d_model, round(cfg.mlp_ratio * cfg.d_model)
    _, norm = _norm(cfg)
    matmul = 2 * d * vocab_size  # output layer
    elementwise = norm  # final norm
    for kind in cfg.layer_kinds():
        mixer_matmul, mixer_elementwise = mixer_class(kind).flops_per_token(cfg, seq_len)
        matmul += mixer_matmul
        elementwise += mixer_elementwise + norm + d  # mixer, its norm, the residual add
        if m:
            matmul += 4 * d * m
            elementwise += m + d + GELU * m + norm + d
    return {"matmul": matmul, "elementwise": elementwise, "total": matmul + elementwise}


def training_flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> int:
    """3 × forward: what MFU divides by."""
    return 3 * flops_per_token(cfg, vocab_size, seq_len)["total"]
