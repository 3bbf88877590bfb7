"""The model config: which mixer, how many layers, how wide."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pipeline.errors import ConfigError


class MixerKind(Enum):
    lrn = "lrn"  # Lightweight Recurrent Network (seed 001)
    olrn = "olrn"  # LRN with an output gate (seed 001, eq. 11–13)
    mingru = "mingru"  # minGRU (Feng et al. 2024)
    minlstm = "minlstm"  # minLSTM (Feng et al. 2024)
    sru = "sru"  # Simple Recurrent Unit (Lei et al. 2018)
    atr = "atr"  # Addition-subtraction Twin-gated Recurrent network (Zhang et al. 2018)
    lstm = "lstm"  # torch.nn.LSTM (cuDNN on GPU)
    gru = "gru"  # torch.nn.GRU (cuDNN on GPU)
    attention = "attention"  # causal multi-head attention with rotary positions


class NormKind(Enum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


@dataclass
class ModelConfig:
    mixer: MixerKind = MixerKind.lrn
    n_layers: int = 4
    d_model: int = 512
    mlp_ratio: float = 0.0  # hidden width of the MLP after each mixer, × d_model; 0 = no MLP
    norm: NormKind = NormKind.layernorm
    dropout: float = 0.0
    tie_embeddings: bool = True  # output layer = embedding matrix
    share_layers: bool = False  # one set of block parameters reused by every layer (per mixer kind)
    attention_every: int = 0  # hybrid: every k-th layer is attention (0 = none)
    n_heads: int = 8  # attention layers
    rope_base: float = 10000.0
    # Attention layers keep at most this many past positions in their state (Transformer-XL style
    # memory); 0 = all of them. Pretraining in stream mode uses data.seq_len when this is 0.
    attention_memory: int = 0
    vocab_size: int = 0  # 0 = from the dataset's manifest

    def validate(self) -> None:
        if self.n_layers < 1 or self.d_model < 1:
            raise ConfigError("model.n_layers and model.d_model must be positive")
        if self.mlp_ratio < 0 or not 0 <= self.dropout < 1:
            raise ConfigError("model.mlp_ratio must be >= 0 and model.dropout in [0, 1)")
        if self.attention_every < 0 or self.attention_memory < 0:
            raise ConfigError("model.attention_every and model.attention_memory must be >= 0")
        uses_attention = self.mixer is MixerKind.attention or self.attention_every > 0
        if uses_attention and (self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2):
            raise ConfigError(
                f"model.d_model ({self.d_model}) must split into model.n_heads ({self.n_heads}) "
                "heads of an even width (rotary positions rotate pairs)"
            )

    def layer_kinds(self) -> list[MixerKind]:
        """The mixer of every layer: ``mixer``, with attention at every ``attention_every``-th."""
        k = self.attention_every
        return [MixerKind.attention if k and (i + 1) % k == 0 else self.mixer for i in range(self.n_layers)]
