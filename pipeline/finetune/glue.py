"""Sentence and sentence-pair tasks: GLUE's files, any GLUE-style TSV, their metrics and scores.

A ``classification`` or ``regression`` task reads one text column, or two (a sentence pair, joined
by the tokenizer's :class:`~rnnpipe.pipeline.finetune.tasks.Separator`), and a label column. ``glue: NAME``
reads GLUE's own file of that task as it is distributed (CoLA without a header, MRPC's header with
a byte-order mark, ...) and scores it as GLUE does:

| glue | kind | input | labels | metrics | the task's GLUE score |
|---|---|---|---|---|---|
| cola | classification | sentence | 0, 1 | mcc, accuracy | mcc |
| sst2 | classification | sentence | 0, 1 | accuracy | accuracy |
| mrpc | classification | #1 String, #2 String | 0, 1 | f1 (of 1), accuracy | mean_f1_accuracy |
| rte | classification | sentence1, sentence2 | entailment, not_entailment | accuracy | accuracy |
| stsb | regression | sentence1, sentence2 | score (0-5) | pearson, spearman, mse | mean_pearson_spearman |

A job's main metric (early stopping, the collect table) is the task's GLUE score; the collect
table's GLUE score averages them over the GLUE tasks run (:mod:`rnnpipe.pipeline.finetune.collect`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnnpipe.pipeline.data.tokenizer_base import Tokenizer
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.finetune import metrics, tasks
from rnnpipe.pipeline.finetune.config import TaskConfig


@dataclass(frozen=True)
class SentenceTask:
    """How a classification or regression task's files are read and scored."""

    kind: str  # its task kind: classification or regression
    text: str  # the (first) text column
    pair: str  # the second segment's column; "" = single sentences
    label: str
    columns: tuple[str, ...] = ()  # a file without a header: its column names; () = a header row
    labels: tuple[str, ...] = ()  # the label vocabulary; () = the training labels, sorted
    positive: str = "1"  # F1's positive class
    metrics: tuple[str, ...] = ("accuracy",)
    glue: str = ""  # the GLUE task, or "" for a task of one's own
    glue_metrics: tuple[str, ...] = ()  # averaged into the task's GLUE score

    @property
    def regression(self) -> bool:
        """Scores (floats) rather than label indices."""
        return self.kind == _REG

    @property
    def primary(self) -> str:
        """The metric early stopping and the table use: the GLUE score, else the first metric."""
        if len(self.glue_metrics) > 1:
            return "mean_" + "_".join(self.glue_metrics)
        return self.glue_metrics[0] if self.glue_metrics else self.metrics[0]

    @property
    def reported(self) -> tuple[str, ...]:
        """Every metric an evaluation returns (the metrics, then a two-metric GLUE score)."""
        return self.metrics + ((self.primary,) if self.primary not in self.metrics else ())


_CLS, _REG = "classification", "regression"
GLUE_TASKS: dict[str, SentenceTask] = {
    "cola": SentenceTask(
        _CLS,
        "sentence",
        "",
        "label",
        columns=("source", "label", "original_label", "sentence"),
        labels=("0", "1"),
        metrics=("mcc", "accuracy"),
        glue="cola",
        glue_metrics=("mcc",),
    ),
    "sst2": SentenceTask(
        _CLS, "sentence", "", "label", labels=("0", "1"), glue="sst2", glue_metrics=("accuracy",)
    ),
    "mrpc": SentenceTask(
        _CLS,
        "#1 String",
        "#2 String",
        "Quality",
        labels=("0", "1"),
        metrics=("f1", "accuracy"),
        glue="mrpc",
        glue_metrics=("f1", "accuracy"),
    ),
    "rte": SentenceTask(
        _CLS,
        "sentence1",
        "sentence2",
        "label",
        labels=("entailment", "not_entailment"),
        glue="rte",
        glue_metrics=("accuracy",),
    ),
    "stsb": SentenceTask(
        _REG,
        "sentence1",
        "sentence2",
        "score",
        metrics=("pearson", "spearman", "mse"),
        glue="stsb",
        glue_metrics=("pearson", "spearman"),
    ),
}
# What a task of one's own (no ``glue``) reports, per kind: the sentence kinds' ``metrics``.
DEFAULT_METRICS = {_CLS: ("accuracy",), _REG: ("pearson", "spearman", "mse")}


def sentence_task(t: TaskConfig) -> SentenceTask:
    """The reader and metrics of a classification or regression task config."""
    if t.glue:
        return GLUE_TASKS[t.glue]
    return SentenceTask(
        t.kind, t.text_column, t.text_pair_column, t.label_column, metrics=DEFAULT_METRICS[t.kind]
    )


def check_glue(t: TaskConfig, where: str = "") -> None:
    """A task's ``glue``: a known GLUE task, of its kind, its columns left to it (``where``: the
    task's dotted key, ``tasks.cola.``, for the error)."""
    if t.glue not in GLUE_TASKS:
        raise ConfigError(f"{where}glue must be {' or '.join(GLUE_TASKS)} (or unset), got {t.glue!r}")
    kind = GLUE_TASKS[t.glue].kind
    if t.kind != kind:
        raise ConfigError(f"{where}kind must be {kind} for glue={t.glue}, got {t.kind}")
    for name in ("text_column", "text_pair_column", "label_column"):
        if getattr(t, name) != TaskConfig.__dataclass_fields__[name].default:
            raise ConfigError(
                f"{where}{name}={getattr(t, name)!r}: glue={t.glue} reads the columns of GLUE's own file; "
                "leave it unset"
            )


# ---------------------------------------------------------------------------------- reading


@dataclass
class SentenceData:
    """A sentence task's splits: ``[(ids, label)]`` (a label index, or a float for regression)."""

    spec: SentenceTask
    labels: list[str]  # the label vocabulary; empty for regression
    train: list[tuple[np.ndarray, Any]]
    dev: list[tuple[np.ndarray, Any]]
    test: list[tuple[np.ndarray, Any]] | None  # None: no test file, or an unlabelled one
    separator: str  # what joins a pair's segments ("" for single sentences)


def read_split(
    spec: SentenceTask, path: str, limit: int
) -> tuple[list[str], list[str] | None, list[str] | None, list[int]]:
    """(texts, second segments or None, labels or None when the file has no label column, line
    numbers) of one split."""
    wanted = [spec.text, spec.pair, spec.label] if spec.pair else [spec.text, spec.label]
    required = wanted[:-1]
    try:
        cols, lines = tasks.read_table(path, wanted, spec.columns, limit, required, [spec.label])
    except PipelineError as e:
        if spec.glue and "no column" in str(e):
            raise PipelineError(f"{e} (glue={spec.glue} reads GLUE's own {spec.glue} files)") from e
        raise
    return cols[spec.text], cols.get(spec.pair) if spec.pair else None, cols.get(spec.label), lines


def _targets(
    spec: SentenceTask, path: str, labels: list[str], values: list[str], lines: list[int], train: str
) -> list:
    """Label indices (classification) or floats (regression) of one split's label column; ``train``:
    the training file (for a label vocabulary made from it)."""
    if spec.regression:
        out = []
        for value, n in zip(values, lines, strict=True):
            try:
                x = float(value)
            except ValueError:
                x = math.nan
            if not math.isfinite(x):
                raise PipelineError(f"{path}:{n}: {spec.label} {value!r} is not a finite number")
            out.append(x)
        return out
    unknown = sorted(set(values) - set(labels))
    if unknown:
        where = f"among {spec.glue}'s labels {', '.join(labels)}" if spec.labels else f"in {train}"
        raise PipelineError(f"{path}: label(s) {unknown} are not {where}")
    return [labels.index(v) for v in values]


def load_sentences(t: TaskConfig, tok: Tokenizer, max_len: int) -> SentenceData:
    """Read and tokenize a classification or regression task's splits (the first ``max_*`` rows)."""
    spec = sentence_task(t)
    sep = tasks.separator(tok) if spec.pair else None

    def split(path: str, limit: int) -> tuple[list, list[str] | None, list[int]]:
        texts, pairs, labels, lines = read_split(spec, path, limit)
        if pairs is None:
            ids = [tasks.encode_text(tok, x, max_len) for x in texts]
        else:
            assert sep is not None
            ids = [tasks.encode_pair(tok, a, b, max_len, sep) for a, b in zip(texts, pairs, strict=True)]
        return ids, labels, lines

    train_ids, train_labels, train_lines = split(t.train, t.max_train)
    if train_labels is None:
        raise PipelineError(f"{t.train}: no {spec.label!r} column: training data must be labelled")
    vocab = [] if spec.regression else list(spec.labels) or sorted(set(train_labels))

    def labelled(path: str, ids: list, labels: list[str] | None, lines: list[int]) -> list | None:
        if labels is None:
            return None
        return list(zip(ids, _targets(spec, path, vocab, labels, lines, t.train), strict=True))

    train = labelled(t.train, train_ids, train_labels, train_lines)
    assert train is not None
    dev = labelled(t.dev, *split(t.dev, t.max_dev))
    if dev is None:
        raise PipelineError(f"{t.dev}: no {spec.label!r} column: dev data must be labelled")
    test = labelled(t.test, *split(t.test, t.max_test)) if t.test else None
    return SentenceData(spec, vocab, train, dev, test, sep.what if sep else "")


# ---------------------------------------------------------------------------------- scoring


def score(spec: SentenceTask, labels: list[str], pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """The task's metrics (:attr:`SentenceTask.reported`) of predictions ``pred`` (label indices,
    or scores for regression) against ``gold``."""
    if spec.regression:
        out = {name: metrics.REGRESSION[name](pred, gold) for name in spec.metrics}
    else:
        positive = labels.index(spec.positive) if spec.positive in labels else 1
        out = {name: metrics.CLASSIFICATION[name](pred, gold, positive) for name in spec.metrics}
    if spec.primary not in out:
        out[spec.primary] = sum(out[m] for m in spec.glue_metrics) / len(spec.glue_metrics)
    return out
