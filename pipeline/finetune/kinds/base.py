"""What a fine-tune task kind is: one class that declares itself, and the registry of them.

A kind says what a sweep, a job and the table need to know about its tasks:

- how a task's files are read and tokenized (:meth:`Kind.load` → :class:`TaskData`);
- its head (:class:`Head`): the model's output for it; its loss (:meth:`Kind.loss`) and its
  predictions (:meth:`Kind.predict`) of that output, the head's own unless the kind says otherwise;
- its training batches: examples in a seeded order, a new order each epoch, collated by the kind
  (:meth:`ExampleKind.collate`: token ids and targets), or, for the ``lm`` head, the token stream;
- its metrics (:meth:`Kind.score` of the predictions), which one is primary (early stopping, the
  table), which way is better, and what the comparison of pretrained against scratch shows.

A subclass that sets ``name`` registers itself when its module is imported; a task of it says
``kind: NAME``. rnnpipe's own kinds are this package's other modules; a kind defined anywhere else
is found through ``RNNPIPE_PLUGINS`` (:mod:`rnnpipe.pipeline.plugins`). No torch here:
the sweep's checks and the table look kinds up without paying for its import; a job runs them
through :mod:`rnnpipe.pipeline.finetune.feeds` and :class:`~rnnpipe.pipeline.finetune.model.FinetuneModel`,
which implement the heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import numpy as np

from rnnpipe.pipeline.data.tokenizer_base import Tokenizer
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.finetune import glue, tasks
from rnnpipe.pipeline.finetune.config import JobConfig, JobSpec, TaskConfig
from rnnpipe.pipeline.plugins import ENV, load_plugins

# A target that is not scored (a tagging example's tokens other than each word's first):
# cross-entropy's default ignore_index, the value pipeline.train.data.IGNORE has too.
IGNORE = -100


class Head(Enum):
    """What the model puts on the backbone's features for a kind (:class:`FinetuneModel` builds
    it, with its loss and its predictions)."""

    # pooled over the tokens (head.pooling), a linear layer: logits [B, C], cross-entropy;
    # predicts a label index per example
    classes = "classes"
    # pooled, one output: a score [B], mean squared error; predicts the score
    score = "score"
    # a linear layer on every token: logits [B, T, C], cross-entropy where the target is not
    # IGNORE; predicts a label index per token
    tokens = "tokens"
    # no head: the LM itself (its tied output layer) on the token stream, its state carried
    lm = "lm"


@dataclass
class TaskData:
    """A task's splits as its kind reads them (:meth:`Kind.load`). A split's form is the kind's:
    classification ``[(ids, label index)]``; regression ``[(ids, score)]``; tagging ``[(ids, first,
    tag ids)]`` for train and ``[(ids, first, gold tags)]`` for dev and test; lm one ``LMText``."""

    kind: str  # the kind's name
    labels: list[str]  # the label vocabulary (sorted from train, or GLUE's); empty without labels
    train: Any
    dev: Any
    test: Any  # None when the test file is absent or unlabelled
    spec: Any = None  # what else the kind scores with (sentence tasks: their glue.SentenceTask)


_KINDS: dict[str, type[Kind]] = {}


class Kind:
    """A kind of fine-tuning task (the module docstring says what it declares); an instance is one
    task of it, made from its config. A subclass that sets ``name`` registers itself."""

    name: ClassVar[str] = ""  # what a task's ``kind:`` says; "" for a base of other kinds
    head: ClassVar[Head]
    metrics: ClassVar[tuple[str, ...]]  # what its evaluation returns, the primary metric first
    higher_is_better: ClassVar[bool] = True  # for its metrics: early stopping, the comparison's gain
    # the comparison of pretrained against scratch: (the metric it compares, its name there);
    # None: the primary metric under its own name
    figure: ClassVar[tuple[str, str] | None] = None
    pairs: ClassVar[bool] = False  # it reads sentence pairs (a task's text_pair_column)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            register(cls)

    def __init__(self, task: TaskConfig) -> None:
        self.task = task

    @property
    def reported(self) -> tuple[str, ...]:
        """What this task's evaluation returns (a GLUE task's score besides its kind's metrics)."""
        return self.metrics

    @property
    def primary(self) -> str:
        """The metric early stopping watches and the table shows."""
        return self.reported[0]

    @classmethod
    def improves(cls, score: float, best: float | None) -> bool:
        """Whether ``score`` beats ``best`` (None: nothing yet), in the kind's direction."""
        return best is None or (score > best if cls.higher_is_better else score < best)

    def check_task(self, where: str = "") -> None:
        """ConfigError for options the task sets that its kind does not read (``where``: the task's
        dotted key, ``tasks.conll.``, for the message)."""
        t = self.task
        if t.text_pair_column and not self.pairs:
            raise ConfigError(f"{where}text_pair_column is for {described(lambda k: k.pairs)} tasks")
        if t.glue:
            glue.check_glue(t, where)

    @classmethod
    def check_job(cls, task: str, spec: JobSpec) -> None:
        """ConfigError for a job of task ``task`` that this kind cannot run (none here)."""

    def load(self, cfg: JobConfig, tok: Tokenizer) -> TaskData:
        """The task's splits (``self.task``'s files), read and tokenized with ``tok``; examples of
        at most ``cfg.max_len`` tokens."""
        raise NotImplementedError

    def train_size(self, data: TaskData) -> int:
        """What a result records as ``train_examples``: the training examples (lm: tokens)."""
        return len(data.train)

    @classmethod
    def initial_bias(cls, data: TaskData) -> float | None:
        """Where the head's bias starts; None: where the linear layer's initialisation puts it."""
        return None

    def loss(self, model: Any, out: Any, targets: Any) -> Any:
        """The training loss (a scalar tensor) of a batch: ``model``'s outputs ``out`` (logits [B, C],
        scores [B], logits [B, T, C]; the lm head: the LM's logits [B, T, V]) against ``targets``
        ([B] or [B, T], ``IGNORE`` where not scored). Here the head's own
        (:meth:`~rnnpipe.pipeline.finetune.model.FinetuneModel.loss`: cross-entropy, or the mean
        squared error of scores); a kind of another loss overrides it."""
        return model.loss(out, targets)

    def predict(self, model: Any, out: Any) -> np.ndarray:
        """What :meth:`score` reads of an evaluation batch's outputs ``out``: here the head's
        (:meth:`~rnnpipe.pipeline.finetune.model.FinetuneModel.predict`: label indices [B] or
        [B, T], or scores [B]). Not for the lm head, which evaluates the stream."""
        return model.predict(out)

    def score(self, data: TaskData, examples: Any, predictions: Any) -> dict[str, float]:
        """Its metrics (:attr:`reported`) of the predictions on the split ``examples``. Example
        heads: one prediction per example (a label index, a score, or a label index per token
        [T]); the lm head: the stream evaluation's ``loss`` (nats per token) and ``tokens``."""
        raise NotImplementedError


class ExampleKind(Kind):
    """A kind whose splits are lists of examples, each a tuple with its token ids [n] first:
    trained in batches of examples, a new seeded order each epoch."""

    def collate(self, data: TaskData, chosen: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [B, T] right-padded, lengths [B], targets) of training examples. Here for ``(ids,
        target)`` examples: targets [B], label indices (int64) or scores (float32)."""
        ids, lengths = tasks.pad([c[0] for c in chosen])
        dtype = np.float32 if self.head is Head.score else np.int64
        return ids, lengths, np.array([c[1] for c in chosen], dtype=dtype)


# ---------------------------------------------------------------------------------- the registry


def register(cls: type[Kind]) -> None:
    """Add a kind to the registry (subclassing :class:`Kind` with a ``name`` does). A name is one
    class's; the same class again (its module imported twice) replaces itself."""
    held = _KINDS.get(cls.name)
    if held is not None and (held.__module__, held.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ConfigError(
            f"task kind {cls.name!r} of {cls.__module__}.{cls.__qualname__}: the name is taken by "
            f"{held.__module__}.{held.__qualname__}"
        )
    _KINDS[cls.name] = cls


def get(name: str, where: str = "") -> type[Kind]:
    """The kind called ``name``; when none is, after importing ``RNNPIPE_PLUGINS``'s modules. A
    ConfigError names the kinds there are (``where``: the task's dotted key)."""
    key = str(name)
    if key not in _KINDS:
        load_plugins()
    if key not in _KINDS:
        raise ConfigError(
            f"{where}kind={key!r} is not a task kind: {', '.join(sorted(_KINDS))} (a kind of one's own: "
            f"name the module that defines it in {ENV})"
        )
    return _KINDS[key]


def of(task: TaskConfig, where: str = "") -> Kind:
    """The kind of a task config, as that task."""
    return get(task.kind, where)(task)


def check_task(task: TaskConfig, where: str = "") -> Kind:
    """A task config checked against its kind (:meth:`Kind.check_task`); returns the kind's task."""
    kind = of(task, where)
    kind.check_task(where)
    return kind


def registered() -> list[type[Kind]]:
    """Every registered kind, by name."""
    return [_KINDS[name] for name in sorted(_KINDS)]


def described(which: Callable[[type[Kind]], bool]) -> str:
    """The names of the kinds ``which`` holds for, sorted, as a sentence says them: ``a, b and c``."""
    names = sorted(k.name for k in _KINDS.values() if which(k))
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)
