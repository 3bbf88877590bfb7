"""Fine-tuning configs: a task (its files), a head, the optimiser, and one job of a sweep.

A sweep file names its tasks once (``tasks: {sst2: {...}, conll: {...}}``), sets the job defaults
(``job:``) and a grid of values for any ``job`` key (``grid: {task: [sst2, conll], seed: [0, 1]}``);
:mod:`rnnpipe.pipeline.finetune.sweep` expands it into :class:`JobConfig` s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from rnnpipe.pipeline.config import check_range, config_key
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.models.config import EmbeddingsConfig
from rnnpipe.pipeline.train.config import WandbConfig


class TaskKind(StrEnum):
    """The names of rnnpipe's own task kinds. What a kind is (its data, head, loss, metrics) is its
    class in :mod:`rnnpipe.pipeline.finetune.kinds`, whose registry also holds kinds defined
    outside rnnpipe; a task's ``kind`` is any registered name. Equal to the name as a string."""

    classification = "classification"  # GLUE-style TSV: a sentence column and a label column
    tagging = "tagging"  # CoNLL-2003 columns: word ... tag
    lm = "lm"  # word-level LM files (PTB): one sentence per line
    regression = "regression"  # GLUE-style TSV with a numeric label column (STS-B): an MSE head


class Init(Enum):
    pretrained = "pretrained"  # the backbone's weights from the pretrained model
    scratch = "scratch"  # the same architecture, randomly initialised (the control)


class Features(Enum):
    """What the head reads (``head.features``)."""

    last = "last"  # the backbone's final-norm features (LanguageModel.hidden)
    # the same forward backbone also run over each sequence reversed (within its length), the two
    # feature sequences concatenated: a BiRNN whose two directions share the weights
    reversed_input = "reversed_input"
    # ELMo (Peters et al. 2018): the forward LM and a backward LM (pretrained on the reversed
    # stream: ``pretrained_backward``), every layer of both concatenated, then a learned scalar mix
    elmo = "elmo"


class Pooling(Enum):
    last = "last"  # the feature at the last token
    mean = "mean"  # the mean over the tokens
    attentive = "attentive"  # softmax(v · tanh(W h_t)) weights over the tokens (seed 001)


@dataclass
class TaskConfig:
    # a registered task kind (rnnpipe.pipeline.finetune.kinds): classification, regression, tagging,
    # lm, or one of one's own; checked, with its own options below, when a sweep is loaded
    kind: str = TaskKind.classification.value
    train: str = ""  # paths or URLs (fsspec; .gz/.bz2 decompressed by extension)
    dev: str = ""
    test: str = ""  # "" or an unlabelled file: no test metrics
    text_column: str = "sentence"  # classification/regression: the TSV header's column names
    label_column: str = "label"
    text_pair_column: str = ""  # the second segment's column of sentence pairs ("" = single sentences)
    # GLUE's own files of a task: cola, sst2, mrpc, rte or stsb (its columns, labels and metrics;
    # the collect table's GLUE score); "" = a task of one's own, read with the columns above
    glue: str = ""
    tag_column: int = -1  # tagging: which whitespace-separated column holds the tag (-1 = last)
    max_train: int = 0  # use the first N training examples (lm: lines); 0 = all
    max_dev: int = 0  # the first N dev examples (lm: lines); 0 = all
    max_test: int = 0
    # job keys set for this task only, after the grid: [head.features=reversed_input]
    job_overrides: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Check that the task has its files and every value's range (a ConfigError names the key);
        what depends on the kind (pairs, ``glue``) its class checks (``Kind.check_task``)."""
        if not self.train or not self.dev:
            keys = f"{config_key('train')}, {config_key('dev')}"
            raise ConfigError(f"a task needs train and dev paths ({keys})")
        if self.tag_column == 0:
            raise ConfigError(
                f"{config_key('tag_column')} must not be 0 (the word's column): "
                "a column number from 1, or from the end with -1 = the last"
            )
        for name in ("max_train", "max_dev", "max_test"):
            check_range(name, getattr(self, name), ge=0, note=" (0 = all)")


@dataclass
class HeadConfig:
    pooling: Pooling = Pooling.attentive  # classification and regression
    features: Features = Features.last  # what the head reads: last | reversed_input | elmo
    dropout: float = 0.1  # on the features before the head
    # Removed: head.features=reversed_input is what bidirectional=true was (and has its identity);
    # a config that still sets it is refused with that hint.
    bidirectional: bool | None = None

    def validate(self) -> None:
        """Check the dropout's range; refuse the removed ``bidirectional``."""
        if self.bidirectional is not None:
            value = "reversed_input" if self.bidirectional else "last"
            raise ConfigError(
                f"{config_key('bidirectional')} was removed: use {config_key('features')}={value} "
                f"({config_key('features')}=reversed_input reads each sequence reversed too, as "
                "bidirectional=true did; elmo adds a backward LM)"
            )
        check_range("dropout", self.dropout, ge=0, lt=1)


@dataclass
class FinetuneOptim:
    lr: float = 1e-3  # peak learning rate of the head; backbone layers get lr × layer_decay^depth
    layer_decay: float = 1.0  # layer-wise decay: the top block × decay, the next × decay², ...
    weight_decay: float = 0.01
    warmup_steps: int = 50  # linear warm-up, then linear decay to 0 at max_steps
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    freeze_steps: int = 0  # backbone frozen for the first N steps (gradual unfreezing); -1 = always

    def validate(self) -> None:
        """Check every value's range (a ConfigError names the key)."""
        check_range("lr", self.lr, gt=0)
        check_range("layer_decay", self.layer_decay, gt=0, le=1)
        check_range("weight_decay", self.weight_decay, ge=0)
        check_range("warmup_steps", self.warmup_steps, ge=0, note=" (0 = no warm-up)")
        check_range("grad_clip", self.grad_clip, ge=0, note=" (0 = off)")
        check_range("freeze_steps", self.freeze_steps, ge=-1, note=" (-1 = always frozen)")


@dataclass
class JobSpec:
    """One fine-tuning job before its task is looked up: what a sweep's ``job`` and grid set."""

    task: str = ""  # a key of the sweep's ``tasks``
    init: Init = Init.pretrained
    seed: int = 0
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    batch_size: int = 32  # examples (lm: streams) per step
    max_len: int = 256  # classification/tagging: tokens per example, longer ones are truncated
    seq_len: int = 128  # lm: tokens per truncated-BPTT segment
    max_steps: int = 1000  # the schedule's length; training stops earlier on early stopping
    eval_every: int = 100  # steps between dev evaluations (and checkpoints)
    patience: int = 3  # stop after this many evaluations without a better dev metric (0 = never)
    dropout: float = -1.0  # backbone dropout; -1 = the pretrained config's
    save_model: bool = False  # also write the best weights as model.pt (a state dict) in the job dir
    # GloVe / word2vec vectors into the backbone's embedding (init=PATH, freeze=none|found|all), after
    # it is built or loaded: init=scratch gives the "LSTM with GloVe inputs" baseline, init=pretrained
    # overwrites the found rows. A word-level backbone only; ELMo: both LMs. "" = none.
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    # W&B beside TensorBoard: one run per job (named after the job, grouped by the sweep's
    # directory unless group is set); not part of the job's identity
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        """Check every value's range (a ConfigError names the key)."""
        check_range("seed", self.seed, ge=0, lt=2**32)  # numpy's and torch's seed range
        check_range("batch_size", self.batch_size, ge=1)
        check_range("max_len", self.max_len, ge=2)
        check_range("seq_len", self.seq_len, ge=1)
        check_range("max_steps", self.max_steps, ge=1)
        check_range("eval_every", self.eval_every, ge=1)
        check_range("patience", self.patience, ge=0, note=" (0 = never stop early)")
        if self.dropout != -1:
            check_range("dropout", self.dropout, ge=0, lt=1, note=" (or -1 = the pretrained config's)")


@dataclass
class JobConfig(JobSpec):
    """A job ready to run: its spec, its task's files, the pretrained model and its directory."""

    task_config: TaskConfig = field(default_factory=TaskConfig)
    pretrained: str = ""  # an ``rnnpipe export`` directory
    pretrained_backward: str = ""  # head.features=elmo: the backward LM's export ("" = none)
    out_dir: str = ""  # the job's directory: result.json, checkpoint.pt, tensorboard/
    hparams: dict[str, Any] = field(default_factory=dict)  # the grid values that made this job
