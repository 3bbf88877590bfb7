"""The model config: which mixer, how many layers, how wide; or a Hugging Face causal LM with
added recurrence (``model.kind=huggingface``, see :mod:`rnnpipe.pipeline.models.recurrence`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from rnnpipe.pipeline.config import _PREFIX, check_choice, check_range, config_key
from rnnpipe.pipeline.errors import ConfigError


class MixerKind(StrEnum):
    """The built-in mixers' names. ``model.mixer`` is a string, checked against the mixer registry
    (:mod:`rnnpipe.pipeline.models.registry`, which says why): a plugin adds names, and each member
    here equals its string (``MixerKind.lrn == "lrn"``)."""

    lrn = "lrn"  # Lightweight Recurrent Network (seed 001)
    olrn = "olrn"  # LRN with an output gate (seed 001, eq. 11–13)
    mingru = "mingru"  # minGRU (Feng et al. 2024)
    minlstm = "minlstm"  # minLSTM (Feng et al. 2024)
    sru = "sru"  # Simple Recurrent Unit (Lei et al. 2018)
    atr = "atr"  # Addition-subtraction Twin-gated Recurrent network (Zhang et al. 2018)
    lstm = "lstm"  # torch.nn.LSTM (cuDNN on GPU)
    gru = "gru"  # torch.nn.GRU (cuDNN on GPU)
    attention = "attention"  # causal multi-head attention with rotary positions


# Names a config check accepts without asking the registry (which would import torch).
_BUILTIN_MIXERS = frozenset(k.value for k in MixerKind)


class NormKind(Enum):
    layernorm = "layernorm"
    rmsnorm = "rmsnorm"


class ModelKind(Enum):
    rnnpipe = "rnnpipe"  # rnnpipe's own language model (mixer, n_layers, d_model, ...)
    huggingface = "huggingface"  # any transformers AutoModelForCausalLM, with model.recurrence added


class RecurrenceKind(Enum):
    none = "none"  # the unmodified model on independent segments: the baseline
    memory_tokens = "memory_tokens"  # Recurrent Memory Transformer (Bulatov et al. 2022)
    recurrent_summary = "recurrent_summary"  # a cell's state as prefix vectors (Yoshida et al.)
    kv_memory = "kv_memory"  # the previous segment's keys and values (Transformer-XL)


class FreezeKind(Enum):
    none = "none"  # train everything
    backbone = "backbone"  # train only the recurrence module and the new embeddings
    embeddings = "embeddings"  # the backbone's token and position embeddings (and a tied output layer)


class EmbeddingFreeze(Enum):
    none = "none"  # the initialised embedding trains like every other weight
    found = "found"  # the rows the vectors file gave stay as they are; the others train
    all = "all"  # the whole embedding stays as initialised (with tie_embeddings, the output layer too)


HF_INITS = ("pretrained", "random")


@dataclass
class HFBackboneConfig:
    """Where a ``model.kind=huggingface`` backbone comes from."""

    # A hub name (gpt2) on a machine that reaches the hub, a local transformers directory, or an
    # rnnpipe export of a huggingface-kind model (its backbone's weights, without its recurrence).
    path: str = ""
    init: str = "pretrained"  # pretrained (the path's weights) | random (its config, fresh weights)
    model_type: str = ""  # init=random without a path: a transformers model type (gpt2)
    # Overrides of the backbone's config (n_layer, n_embd, dropout, ...); vocab_size is the dataset's.
    config: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Check the init (whatever the model's kind: a bad value is a mistake even where unused)."""
        check_choice("init", self.init, HF_INITS)

    def check_named(self) -> None:
        """For kind huggingface: the backbone is named one way or the other."""
        if not self.path and not (self.init == "random" and self.model_type):
            raise ConfigError(
                f"{config_key('path')} is empty: name a Hugging Face model (a hub name or a directory), "
                f"or set {config_key('init')}=random with {config_key('model_type')} (e.g. gpt2)"
            )
        if self.model_type and self.path:
            raise ConfigError(
                f"{config_key('model_type')}={self.model_type!r} is for init=random without a path; "
                f"{config_key('path')}={self.path!r} already names the model"
            )


@dataclass
class RecurrenceConfig:
    """How a huggingface-kind backbone carries a state from one segment to the next.

    The stream is cut into segments of ``segment_len`` tokens at fixed positions; each segment is
    one pass of the backbone, and the state carries what the variant keeps. See docs/models.md.
    """

    kind: RecurrenceKind = RecurrenceKind.none
    # Tokens per segment (one backbone pass); 0 = data.seq_len / bptt_segments for memory_tokens
    # and recurrent_summary, data.seq_len for none and kv_memory (resolved by the pretrain config).
    segment_len: int = 0
    # memory_tokens: m memory vectors; recurrent_summary: k prefix vectors; kv_memory: M cached
    # positions. 0 = the variant's default (16, 4 and segment_len).
    memory: int = 0
    # Segments a gradient flows back through (within one training window): at least 2 for the
    # variants that learn their carry (memory_tokens, recurrent_summary); ignored by the others.
    bptt_segments: int = 2
    # recurrent_summary: a mixer that may serve as a cell (Mixer.summary_cell): lrn | mingru | gru
    cell: str = MixerKind.lrn.value
    cell_dim: int = 0  # recurrent_summary: the cell's width; 0 = the backbone's hidden size
    read_layer: int = -1  # recurrent_summary: hidden states after this many layers; -1 = the last
    inject_layer: int = 0  # recurrent_summary: the prefix enters before this layer (0 = as embeddings)

    def validate(self) -> None:
        """Check every value's range (the cell: ``ModelConfig``, for kind huggingface)."""
        check_range("segment_len", self.segment_len, ge=0, note=" (0 = data.seq_len)")
        check_range("memory", self.memory, ge=0, note=" (0 = the variant's default)")
        check_range("bptt_segments", self.bptt_segments, ge=1)
        check_range("cell_dim", self.cell_dim, ge=0, note=" (0 = the backbone's hidden size)")
        check_range("read_layer", self.read_layer, ge=-1, note=" (-1 = the last layer)")
        check_range("inject_layer", self.inject_layer, ge=0)

    def learns_carry(self) -> bool:
        """Whether what crosses segments is trained through them (RMT's memory, the summary's cell)."""
        return self.kind in (RecurrenceKind.memory_tokens, RecurrenceKind.recurrent_summary)

    def memory_size(self) -> int:
        """m, k or M: ``memory``, or the variant's default (0 for none)."""
        if self.kind is RecurrenceKind.none:
            return 0
        if self.memory:
            return self.memory
        return {"memory_tokens": 16, "recurrent_summary": 4}.get(self.kind.value, self.segment_len)

    def extra_positions(self) -> int:
        """Positions a segment takes besides its tokens: 2m memory (read and write), k prefix
        vectors, or up to M cached ones. With segment_len, at most the backbone's context."""
        m = self.memory_size()
        return {"memory_tokens": 2 * m, "recurrent_summary": m, "kv_memory": m}.get(self.kind.value, 0)


@dataclass
class EmbeddingsConfig:
    """Pretrained word vectors for an rnnpipe-kind model's embedding (see docs/models.md)."""

    # A GloVe (``word v1 ... vd`` per line) or word2vec text file (a first line ``count dim``),
    # plain or compressed (.gz, .bz2, .xz), any fsspec URL (zip://glove.6B.300d.txt::https://...).
    # Its dimension must be model.d_model. Applied at the start of a fresh pretrain run, for a
    # word-level dataset (tokenizer.kind=word); "" = none (the usual random initialisation).
    init: str = ""
    freeze: EmbeddingFreeze = EmbeddingFreeze.none

    def validate(self) -> None:
        """A freeze needs vectors to keep."""
        if self.freeze is not EmbeddingFreeze.none and not self.init:
            raise ConfigError(
                f"{config_key('freeze')}={self.freeze.value} keeps pretrained vectors, but "
                f"{config_key('init')} is empty: name a GloVe or word2vec file"
            )


@dataclass
class ModelConfig:
    kind: ModelKind = ModelKind.rnnpipe
    # A registered mixer's kind: a built-in (MixerKind) or one a plugin module defines (RNNPIPE_PLUGINS).
    mixer: str = MixerKind.lrn.value
    n_layers: int = 4
    d_model: int = 512
    mlp_ratio: float = 0.0  # hidden width of the MLP after each mixer, × d_model; 0 = no MLP
    norm: NormKind = NormKind.layernorm
    dropout: float = 0.0
    tie_embeddings: bool = True  # output layer = embedding matrix
    share_layers: bool = False  # one set of block parameters reused by every layer (per mixer kind)
    attention_every: int = 0  # hybrid: every k-th layer is attention (0 = none)
    n_heads: int = 8  # attention layers (and any mixer with heads: its from_config reads it)
    rope_base: float = 10000.0
    # Attention layers keep at most this many past positions in their state (Transformer-XL style
    # memory); 0 = all of them. Pretraining in stream mode uses data.seq_len when this is 0.
    attention_memory: int = 0
    vocab_size: int = 0  # 0 = from the dataset's manifest
    # kind=huggingface: the backbone, the recurrence added to it, and what training leaves as it is.
    hf: HFBackboneConfig = field(default_factory=HFBackboneConfig)
    recurrence: RecurrenceConfig = field(default_factory=RecurrenceConfig)
    freeze: FreezeKind = FreezeKind.none
    # kind=rnnpipe: the embedding from pretrained word vectors (GloVe, word2vec), frozen or not.
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)

    def __post_init__(self) -> None:
        self.mixer = str(self.mixer)  # MixerKind.lrn -> "lrn": one type whatever the caller passed

    def validate(self) -> None:
        """Check every value's range, that the mixer is registered, and that attention heads split
        ``d_model`` evenly."""
        if self.mixer not in _BUILTIN_MIXERS:  # a plugin's (its module imports torch anyway)
            from rnnpipe.pipeline.models.registry import mixer_class

            mixer_class(self.mixer, config_key("mixer"))
        if self.kind is ModelKind.huggingface:
            if self.embeddings != EmbeddingsConfig():
                raise ConfigError(
                    f"{config_key('embeddings')} is for {config_key('kind')}=rnnpipe (a huggingface "
                    "backbone has its own pretrained embeddings)"
                )
            self._validate_huggingface()
        else:  # the huggingface kind's keys would be silently ignored (yet part of the identity)
            defaults = ModelConfig()
            for key in ("hf", "recurrence", "freeze"):
                if getattr(self, key) != getattr(defaults, key):
                    raise ConfigError(
                        f"{config_key(key)} is set, but it is for {config_key('kind')}=huggingface "
                        f"(this model is kind {self.kind.value})"
                    )
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
        if MixerKind.attention.value in self.layer_kinds() and (
            self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2
        ):
            raise ConfigError(
                f"{config_key('d_model')} ({self.d_model}) must split into {config_key('n_heads')} "
                f"({self.n_heads}) heads of an even width (rotary positions rotate pairs)"
            )

    def _validate_huggingface(self) -> None:
        """What a huggingface-kind model needs besides its nested configs' own checks."""
        if importlib.util.find_spec("transformers") is None:
            raise ConfigError(
                f"{config_key('kind')}=huggingface needs transformers: pip install 'rnnpipe[hf]'"
            )
        token = _PREFIX.set(_PREFIX.get() + "hf.")
        try:
            self.hf.check_named()
        finally:
            _PREFIX.reset(token)
        r = self.recurrence
        # The cell's class says whether it may be one; a huggingface-kind model imports torch anyway.
        from rnnpipe.pipeline.models.registry import find_mixer, mixer_kinds

        cell = find_mixer(r.cell)
        if cell is None or not cell.summary_cell:
            cells = mixer_kinds(lambda c: c.summary_cell)
            raise ConfigError(f"{config_key('recurrence.cell')} must be {' or '.join(cells)}, got {r.cell!r}")
        if self.freeze is FreezeKind.backbone and r.kind in (RecurrenceKind.none, RecurrenceKind.kv_memory):
            raise ConfigError(
                f"{config_key('freeze')}=backbone with {config_key('recurrence.kind')}={r.kind.value} leaves "
                "nothing to train (that variant adds no parameters): use freeze=none or embeddings"
            )
        if r.kind is RecurrenceKind.none and r.memory:
            raise ConfigError(f"{config_key('recurrence.memory')}={r.memory} has no meaning for kind none")

    def check_backbone_fits(self, vocab_size: int, rows: int, positions: int, layers: int) -> None:
        """A huggingface-kind model's recurrence against its backbone: ``rows`` token embeddings
        for the dataset's ``vocab_size`` ids, a segment and its extra positions within
        ``positions``, the summary's layers within ``layers`` (0: a size unknown, not checked)."""
        if rows and rows < vocab_size:
            raise ConfigError(
                f"model.hf.path={self.hf.path!r} has {rows} token embeddings, the dataset {vocab_size} ids: "
                "prepare it with the model's tokenizer (tokenizer.kind=huggingface tokenizer.path=...)"
            )
        r = self.recurrence
        used = r.segment_len + r.extra_positions()
        if positions and used > positions:
            raise ConfigError(
                f"model.recurrence: a segment of {r.segment_len} tokens with {r.kind.value}'s "
                f"{r.extra_positions()} extra positions uses {used}, beyond the backbone's {positions} "
                "positions: lower model.recurrence.segment_len or model.recurrence.memory"
            )
        if layers and r.kind is RecurrenceKind.recurrent_summary:
            for key in ("read_layer", "inject_layer"):
                value = getattr(r, key)
                if value > layers or (key == "inject_layer" and value >= layers):
                    raise ConfigError(
                        f"model.recurrence.{key}={value} is beyond the backbone's {layers} layers"
                    )

    def layer_kinds(self) -> list[str]:
        """The mixer kind of every layer: ``mixer``, with attention at every ``attention_every``-th."""
        k = self.attention_every
        attention = MixerKind.attention.value
        return [attention if k and (i + 1) % k == 0 else self.mixer for i in range(self.n_layers)]
