"""Recurrent language models: LRN, oLRN, minGRU, minLSTM, SRU, ATR, LSTM, GRU and attention.

``LanguageModel(ModelConfig(...), vocab_size)`` maps tokens and a state to logits and the next
state; :mod:`pipeline.models.flops` counts its parameters and FLOPs per token. Models know nothing
of DeepSpeed or Slurm. Equations, formulas and speeds: docs/models.md.
"""

from pipeline.models.config import MixerKind, ModelConfig, NormKind
from pipeline.models.flops import flops_per_token, model_params, training_flops_per_token
from pipeline.models.lm import LanguageModel
from pipeline.models.pretrained import load_pretrained, load_pretrained_tokenizer

__all__ = [
    "LanguageModel",
    "MixerKind",
    "ModelConfig",
    "NormKind",
    "flops_per_token",
    "load_pretrained",
    "load_pretrained_tokenizer",
    "model_params",
    "training_flops_per_token",
]
