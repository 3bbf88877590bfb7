"""Parameter counts and forward FLOPs per token, in closed form, for every configuration.

The pretrain stage divides achieved FLOPs by the device's peak for MFU; training FLOPs are taken
as 3× forward (backward ≈ 2× forward), the PaLM convention. Matrix products count 2·m·n·k.
Element-wise work counts add, subtract, multiply and divide as 1 FLOP, sigmoid and tanh as 4,
GELU as 8. Attention adds 4·d·T per token per layer for the scores and the weighted sum over a
context of T, without halving for causality (as PaLM). Embedding lookups count 0. The formulas are
in docs/models.md; the tests check parameter counts against the modules and matrix FLOPs against
torch's FlopCounterMode.
"""

from __future__ import annotations

from rnnpipe.pipeline.models.config import MixerKind, ModelConfig, NormKind

SIGMOID = TANH = 4
GELU = 8

# Per mixer of width d: parameters = p2·d² + p1·d, matrix FLOPs = 2·(weights used per token),
# element-wise FLOPs = e1·d per token (bias adds + the recurrence), as (p2, p1, m2, e1).
# Attention's context-dependent part (4·d·T, softmax) is added in flops_per_token.
_MIXERS = {
    # bias 3; k+h, q−h 2; two σ 8; i·v + f·h 3; tanh 4
    MixerKind.lrn: (3, 3, 6, 3 + 2 + 2 * SIGMOID + 3 + TANH),
    # bias 4; as LRN without tanh 13; o − c 1; σ 4; ·c 1
    MixerKind.olrn: (4, 4, 8, 4 + 2 + 2 * SIGMOID + 3 + 1 + SIGMOID + 1),
    # bias 2; σ 4; 1 − z 1; z·h̃ 1; scan a·h + b 2
    MixerKind.mingru: (2, 2, 4, 2 + SIGMOID + 1 + 1 + 2),
    # bias 3; two σ 8; f + i 1; two divisions 2; i'·h̃ 1; scan 2
    MixerKind.minlstm: (3, 3, 6, 3 + 2 * SIGMOID + 1 + 2 + 1 + 2),
    # bias 2; v·c + and σ for f and r 12; c update 4; highway 4
    MixerKind.sru: (3, 4, 6, 2 + 2 * (2 + SIGMOID) + 4 + 4),
    # bias 1; p ± q and σ 10; i·p + f·h 3
    MixerKind.atr: (2, 1, 4, 1 + 2 * (1 + SIGMOID) + 3),
    # biases 8; gate sums 4; three σ and a tanh 16; c update 3; tanh(c)·o 5
    MixerKind.lstm: (8, 8, 16, 8 + 4 + 3 * SIGMOID + TANH + 3 + TANH + 1),
    # biases 6; r and z: sum and σ 10; n: r·h, sum, tanh 6; h update 4
    MixerKind.gru: (6, 6, 12, 6 + 2 * (1 + SIGMOID) + 2 + TANH + 4),
    # rotary positions on q and k, 3 per element each
    MixerKind.attention: (4, 0, 8, 6),
}


def mixer_params(kind: MixerKind, d: int) -> int:
    p2, p1, _, _ = _MIXERS[kind]
    return p2 * d * d + p1 * d


def _norm(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, FLOPs per token) of one norm."""
    d = cfg.d_model
    return (2 * d, 7 * d) if cfg.norm is NormKind.layernorm else (d, 4 * d)


def block_params(kind: MixerKind, cfg: ModelConfig) -> int:
    d, m = cfg.d_model, round(cfg.mlp_ratio * cfg.d_model)
    norm, _ = _norm(cfg)
    mlp = 2 * d * m + m + d + norm if m else 0
    return norm + mixer_params(kind, d) + mlp


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
        _, _, m2, e1 = _MIXERS[kind]
        matmul += m2 * d * d
        elementwise += e1 * d + norm + d  # mixer, its norm, the residual add
        if kind is MixerKind.attention:
            matmul += 4 * d * seq_len
            elementwise += 4 * cfg.n_heads * seq_len  # softmax
        if m:
            matmul += 4 * d * m
            elementwise += m + d + GELU * m + norm + d
    return {"matmul": matmul, "elementwise": elementwise, "total": matmul + elementwise}


def training_flops_per_token(cfg: ModelConfig, vocab_size: int, seq_len: int) -> int:
    """3 × forward: what MFU divides by."""
    return 3 * flops_per_token(cfg, vocab_size, seq_len)["total"]
