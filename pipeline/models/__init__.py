"""Recurrent language models: LRN, oLRN, minGRU, minLSTM, SRU, ATR, LSTM, GRU and attention, and
any other :class:`Mixer` subclass with a ``kind`` (the mixer registry: ``mixer_class(kind)``).

``LanguageModel(ModelConfig(...), vocab_size)`` maps tokens and a state to logits and the next
state; :mod:`rnnpipe.pipeline.models.flops` counts its parameters and FLOPs per token. Models know nothing
of DeepSpeed or Slurm. Equations, formulas and speeds: docs/models.md.

The names below load on first use: a config check (``pipeline.models.config``) must not pay for
importing torch, which takes a second or more.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Mixer": "rnnpipe.pipeline.models.mixers",
    "MixerKind": "rnnpipe.pipeline.models.config",
    "ModelConfig": "rnnpipe.pipeline.models.config",
    "NormKind": "rnnpipe.pipeline.models.config",
    "flops_per_token": "rnnpipe.pipeline.models.flops",
    "model_params": "rnnpipe.pipeline.models.flops",
    "training_flops_per_token": "rnnpipe.pipeline.models.flops",
    "mixer_class": "rnnpipe.pipeline.models.registry",
    "LanguageModel": "rnnpipe.pipeline.models.lm",
    "AddedRecurrenceLM": "rnnpipe.pipeline.models.recurrence",
    "build_model": "rnnpipe.pipeline.models.backbone",
    "load_pretrained": "rnnpipe.pipeline.models.pretrained",
    "load_pretrained_tokenizer": "rnnpipe.pipeline.models.pretrained",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'rnnpipe.pipeline.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
