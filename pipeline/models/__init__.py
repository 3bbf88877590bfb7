"""Recurrent language models: LRN, oLRN, minGRU, minLSTM, SRU, ATR, LSTM, GRU and attention.

``LanguageModel(ModelConfig(...), vocab_size)`` maps tokens and a state to logits and the next
state; :mod:`pipeline.models.flops` counts its parameters and FLOPs per token. Models know nothing
of DeepSpeed or Slurm. Equations, formulas and speeds: docs/models.md.

The names below load on first use: a config check (``pipeline.models.config``) must not pay for
importing torch, which takes a second or more.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "MixerKind": "pipeline.models.config",
    "ModelConfig": "pipeline.models.config",
    "NormKind": "pipeline.models.config",
    "flops_per_token": "pipeline.models.flops",
    "model_params": "pipeline.models.flops",
    "training_flops_per_token": "pipeline.models.flops",
    "LanguageModel": "pipeline.models.lm",
    "AddedRecurrenceLM": "pipeline.models.recurrence",
    "build_model": "pipeline.models.backbone",
    "load_pretrained": "pipeline.models.pretrained",
    "load_pretrained_tokenizer": "pipeline.models.pretrained",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
