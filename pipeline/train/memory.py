"""How much GPU memory a pretrain config needs per device, before trying it.

Model states with DeepSpeed mixed precision (bf16) take 2 bytes per parameter for the bf16
weights, 2 for their gradients, and 12 for the fp32 master copy and AdamW's two moments: 16
bytes per parameter, partitioned by ZeRO stage 1 (the 12), 2 (the 12 and the gradients) or 3
(all 16) across the data-parallel ranks. fp32 training takes 4 + 4 + 8. Activations: what
backward keeps per token and layer, estimated from the block's tensors (projection outputs,
recurrence outputs, norms, MLP; each mixer's as its class declares), times micro-batch × seq_len;
activation checkpointing keeps one block input per layer plus one block's activations.
"""

from __future__ import annotations

from rnnpipe.pipeline.models.config import ModelConfig
from rnnpipe.pipeline.models.flops import model_params
from rnnpipe.pipeline.models.registry import mixer_class
from rnnpipe.pipeline.train.config import Precision, PretrainConfig


def block_activation_values(kind: str, model: ModelConfig, bf16: bool) -> int:
    """Values per token that one block of mixer ``kind`` keeps for backward, in the model's dtype:
    its mixer's (``Mixer.activation_values``; twice as many for a recurrence that runs in float32
    under bf16, ``Mixer.fp32_recurrence``), the norms' and residual's 3 of width d, and the MLP's."""
    cls = mixer_class(kind)
    d, m = model.d_model, round(model.mlp_ratio * model.d_model)
    mixer = cls.activation_values(model) * (2 if bf16 and cls.fp32_recurrence else 1)
    return mixer + 3 * d + (2 * m + d if m else 0)


def estimate_memory(cfg: PretrainConfig, vocab_size: int, world_size: int) -> dict[str, float]:
    """Estimated GiB per device: ``params``, ``grads``, ``optimizer``, ``activations``, ``total``."""
    n = model_params(cfg.model, vocab_size)
    bf16 = cfg.train.precision is Precision.bf16
    weight, grad, opt = (2, 2, 12) if bf16 else (4, 4, 8)
    stage = cfg.train.zero_stage
    shard = max(1, world_size)
    params = n * weight / (shard if stage >= 3 else 1)
    grads = n * grad / (shard if stage >= 2 else 1)
    optimizer = n * opt / (shard if stage >= 1 else 1)
    d = cfg.model.d_model
    width = 2 if bf16 else 4
    per_block = [block_activation_values(k, cfg.model, bf16) for k in cfg.model.layer_kinds()]
    tokens = cfg.data.batch_size * cfg.data.seq_len
    if cfg.train.activation_checkpointing:
        acts = tokens * width * (d * len(per_block) + max(per_block))
    else:
        acts = tokens * width * sum(per_block)
    acts += tokens * vocab_size * 4 * 2  # fp32 logits and their gradient
    gib = 2**30
    out = {
        "params": params / gib,
        "grads": grads / gib,
        "optimizer": optimizer / gib,
        "activations": acts / gib,
    }
    out["total"] = sum(out.values())
    out["parameters_millions"] = n / 1e6
    return out
