"""Sentence-task metrics (numpy only): accuracy, F1 of the positive class, Matthews correlation,
Pearson and Spearman correlation, mean squared error.

Every score but the mean squared error is scaled by 100, as GLUE reports them, so that the GLUE
score (:mod:`rnnpipe.pipeline.finetune.glue`) averages numbers of one scale. Degenerate cases give 0 rather
than NaN (a constant prediction has no correlation with anything; F1 with no positive predicted
nor gold is 0), so a result is always valid JSON and early stopping always compares numbers; the
tests check each against scikit-learn or scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def accuracy(pred: Sequence[int] | np.ndarray, gold: Sequence[int] | np.ndarray) -> float:
    """Share of exact matches, in % (0 for no examples)."""
    p, g = np.asarray(pred), np.asarray(gold)
    return 100.0 * float((p == g).sum()) / len(g) if len(g) else 0.0


def f1(pred: Sequence[int] | np.ndarray, gold: Sequence[int] | np.ndarray, positive: int = 1) -> float:
    """F1 of class ``positive`` (2·TP / (2·TP + FP + FN)), in %; 0 when neither the predictions
    nor the gold labels hold the class (scikit-learn's ``zero_division=0``)."""
    p, g = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp = float((p & g).sum())
    denom = 2 * tp + float((p & ~g).sum()) + float((~p & g).sum())
    return 100.0 * 2 * tp / denom if denom else 0.0


def matthews(pred: Sequence[int] | np.ndarray, gold: Sequence[int] | np.ndarray) -> float:
    """Matthews correlation coefficient × 100, for two classes or more (Gorodkin's R_K, the
    formula scikit-learn uses); 0 when the predictions or the gold labels are one class only."""
    p, g = np.asarray(pred), np.asarray(gold)
    classes, inv = np.unique(np.concatenate([p, g]), return_inverse=True)
    k = len(classes)
    pi, gi = inv[: len(p)], inv[len(p) :]
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (gi, pi), 1.0)
    t_k, p_k = conf.sum(axis=1), conf.sum(axis=0)  # gold and predicted counts per class
    c, s = float(np.trace(conf)), float(conf.sum())
    cov_tp = c * s - float(t_k @ p_k)
    cov_pp, cov_tt = s * s - float(p_k @ p_k), s * s - float(t_k @ t_k)
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return 100.0 * cov_tp / math.sqrt(cov_pp * cov_tt)


def pearson(pred: Sequence[float] | np.ndarray, gold: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation × 100; 0 when either side is constant (scipy gives NaN there)."""
    x = np.asarray(pred, dtype=np.float64)
    y = np.asarray(gold, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    if denom == 0:
        return 0.0
    return 100.0 * max(-1.0, min(1.0, float(x @ y) / denom))


def ranks(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata``'s default)."""
    _, inv, counts = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the rank of the last member of each group of equal values
    return (last - (counts - 1) / 2.0)[inv]


def spearman(pred: Sequence[float] | np.ndarray, gold: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation × 100: Pearson's of the average ranks; 0 when either is constant."""
    return pearson(ranks(pred), ranks(gold))


def mse(pred: Sequence[float] | np.ndarray, gold: Sequence[float] | np.ndarray) -> float:
    """Mean squared error, in the label's units squared (not scaled)."""
    d = np.asarray(pred, dtype=np.float64) - np.asarray(gold, dtype=np.float64)
    return float(d @ d) / len(d) if len(d) else 0.0


# name -> fn(pred, gold, positive class index) for classification; fn(pred, gold) for regression
CLASSIFICATION: dict[str, Callable[[np.ndarray, np.ndarray, int], float]] = {
    "accuracy": lambda p, g, _pos: accuracy(p, g),
    "f1": lambda p, g, pos: f1(p, g, pos),
    "mcc": lambda p, g, _pos: matthews(p, g),
}
REGRESSION: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "pearson": pearson,
    "spearman": spearman,
    "mse": mse,
}
