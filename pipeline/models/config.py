"""The model config: which mixer, how many layers, how wide."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pipeline.config import check_range, config_key
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
        """Check every value's range and that attention heads split ``d_model`` evenly."""
        check_range("n_layers", self.n_layers, ge=1)
        check_range("d_model", self.d_model, ge=1)
        check_range("mlp_ratio", self.mlp_ratio, ge=0, note=" (0 = no MLP)")
        check_range("dropout", self.dropout, ge=0, lt=1)
        check_range("attention_every", self.attention_every, ge=0, note=" (0 = no attention layers)")
        check_range("n_heads", self.n_heads, ge=1)
        check_range("rope_base", self.rope_base, gt=0)
        check_range("attention_memory", self.attention_memory, ge=0, note=" (0 = all positions)")
        check_range("vocab_size", self.vocab_size, ge=0, note=" (0 = the dataset's)")
        if self.mlp_ratio and not round(self.mlp_ratio * self.d_model):
            # The block builds no MLP for a width that rounds to 0: say so rather than drop it.
            raise ConfigError(
                f"{config_key('mlp_ratio')}={self.mlp_ratio} gives an MLP of width 0 at "
                f"{config_key('d_model')}={self.d_model}: use 0 for no MLP or a larger ratio"
            )
        if MixerKind.attention in self.layer_kinds() and (
            self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2
        ):
            raise ConfigError(
                f"{config_key('d_model')} ({self.d_model}) must split into {config_key('n_heads')} "
                f"({self.n_heads}) heads of an even width (rotary positions rotate pairs)"
            )

    def layer_kinds(self) -> list[MixerKind]:
        """The mixer of every layer: ``mixer``, with attention at every ``attention_every``-th."""
        k = self.attention_every
        return [MixerKind.attention if k and (i + 1) % k == 0 else self.mixer for i in range(self.n_layers)]
