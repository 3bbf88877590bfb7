"""Sentence and sentence-pair task kinds: ``classification`` and ``regression``.

A GLUE-style TSV (a text column, or two for a pair, and a label column) or GLUE's own file of a
task (``glue: NAME``); :mod:`rnnpipe.pipeline.finetune.glue` reads, encodes and scores them.
"""

from __future__ import annotations

import logging
from functools import cached_property

import numpy as np

from rnnpipe.pipeline.data.tokenizer_base import Tokenizer
from rnnpipe.pipeline.finetune import glue
from rnnpipe.pipeline.finetune.config import JobConfig
from rnnpipe.pipeline.finetune.kinds.base import ExampleKind, Head, TaskData

log = logging.getLogger("rnnpipe.finetune")


class Classification(ExampleKind):
    """A label per sentence (or pair): accuracy, or a GLUE task's own metrics and score (MCC for
    CoLA, the mean of F1 and accuracy for MRPC), which is then its primary metric."""

    name = "classification"
    head = Head.classes
    metrics = glue.DEFAULT_METRICS["classification"]
    pairs = True

    @cached_property
    def spec(self) -> glue.SentenceTask:
        """Its columns, labels and metrics (GLUE's own for a GLUE task)."""
        return glue.sentence_task(self.task)

    @property
    def reported(self) -> tuple[str, ...]:
        return self.spec.reported

    @property
    def primary(self) -> str:
        return self.spec.primary

    def load(self, cfg: JobConfig, tok: Tokenizer) -> TaskData:
        d = glue.load_sentences(self.task, tok, cfg.max_len)
        if d.separator:
            log.info("sentence pairs: the segments are joined by the %s", d.separator)
        return TaskData(self.name, d.labels, d.train, d.dev, d.test, d.spec)

    def score(self, data: TaskData, examples: list, predictions: list) -> dict[str, float]:
        """:func:`glue.score` of the predicted label indices (regression: scores)."""
        preds = np.asarray(predictions, dtype=np.float64 if self.head is Head.score else np.int64)
        gold = np.array([e[1] for e in examples], dtype=preds.dtype)
        return glue.score(data.spec, data.labels, preds, gold)


class Regression(Classification):
    """A score per sentence (or pair), STS-B's similarity: Pearson and Spearman correlation (× 100)
    and the mean squared error; STS-B's score is the mean of the two correlations."""

    name = "regression"
    head = Head.score
    metrics = glue.DEFAULT_METRICS["regression"]

    @classmethod
    def initial_bias(cls, data: TaskData) -> float | None:
        """The training scores' mean: the first steps do not go to learning the offset."""
        return float(np.mean([y for _, y in data.train]))
