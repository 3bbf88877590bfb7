"""Divergence watch: which checkpoint is really the last good one when a run blows up.

A run whose learning rate is far too high does not turn non-finite at once: the loss first shoots
up while the weights explode, checkpoints keep being written, and only later does the loss become
inf or NaN. The checkpoint saved last before the non-finite loss then holds exploded weights. So
the loop watches every step's loss against its running mean and spread; from the first step far
above them (a *spike*) until the loss is back, every checkpoint is marked in its header as
``diverging_since: <step>``, and the newest checkpoint saved before the spike is kept past
``train.keep_checkpoints`` (see :func:`rnnpipe.pipeline.train.checkpoint.save`) and named as the one to
resume from.

    stats = [0.0, 0.0, 0]                     # running mean, variance, steps seen (in the TrainState)
    spike = watch(stats, step_loss, ceiling)  # True: far above the running mean (stats unchanged)

A spike is a step's loss far above the running statistics (after a few steps of them), or above
``ceiling`` at any time: twice the loss of a uniform guess, ln(vocabulary size), which no sane
model reaches. The loss of step k is computed with the weights of step k - 1, so a spike at step
k condemns the checkpoint of step k - 1 too.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("rnnpipe.train")

WARMUP_STEPS = 10  # steps of statistics before a spike can be called from them
ALPHA = 0.05  # weight of a new step in the running mean (a window of about 20 steps)
SIGMAS = 6.0  # a spike is this many running standard deviations above the mean ...
RELATIVE = 0.25  # ... and at least this fraction of the mean above it


def ceiling(vocab_size: int) -> float:
    """The loss no sane model reaches: twice a uniform guess's, 2 ln(vocab_size) nats per token."""
    return 2 * math.log(max(vocab_size, 2))


def threshold(stats: list[float], cap: float = math.inf) -> float:
    """The loss above which a step is a spike, given ``stats`` = [mean, variance, count]."""
    mean, var, count = stats
    if count < WARMUP_STEPS:
        return cap
    return min(cap, mean + max(SIGMAS * math.sqrt(max(var, 0.0)), RELATIVE * abs(mean)))


def watch(stats: list[float], loss: float, cap: float = math.inf) -> bool:
    """Whether a step's mean ``loss`` (nats per token) is a spike; if not, fold it into ``stats``
    (exponential mean and variance, updated in place). Spikes do not move the statistics, so a
    loss that keeps exploding stays a spike. ``cap``: :func:`ceiling` of the vocabulary."""
    if not math.isfinite(loss) or loss > threshold(stats, cap):
        return True
    mean, var, count = stats
    if count == 0:
        stats[:] = [loss, 0.0, 1]
        return False
    delta = loss - mean
    mean += ALPHA * delta
    var = (1 - ALPHA) * (var + ALPHA * delta * delta)
    stats[:] = [mean, var, count + 1]
    return False


def follow(state: Any, loss: float, step: int, logs: bool, cap: float) -> None:
    """After every step: update ``state.loss_stats`` with the step's mean ``loss`` and set or clear
    ``state.diverging_since`` (a TrainState's fields), logging where a spike starts and ends when
    ``logs`` (rank 0)."""
    spike = watch(state.loss_stats, loss, cap)
    if spike and state.diverging_since is None:
        state.diverging_since = step
        if logs:
            log.warning(
                "loss spike at step %d: %.4g against a running mean of %.4g; checkpoints from now on "
                "are marked as possibly diverged, and the last one before is kept",
                step,
                loss,
                state.loss_stats[0],
            )
    elif not spike and state.diverging_since is not None:
        if logs:
            log.info("loss back to %.4g at step %d (spike since step %d)", loss, step, state.diverging_since)
        state.diverging_since = None


def advice(root: Path) -> str:
    """Which checkpoint under ``root`` (a run's ``checkpoints/``) to resume from after a divergence,
    and which may already hold diverged weights."""
    from rnnpipe.pipeline.train import checkpoint

    good, suspect = checkpoint.last_good(root)
    if good is None and not suspect:
        return "no checkpoint was written"
    parts = []
    if good is not None:
        parts.append(
            f"the last good checkpoint is {good} (resume from it: train.resume={good}, "
            + "e.g. with a lower optim.lr)"
        )
    if suspect:
        since = checkpoint.read_header(suspect[0]).get("diverging_since")
        parts.append(
            f"{', '.join(p.name for p in suspect)} were saved after the loss spiked at step {since} "
            "and may already hold diverged weights"
        )
    return "; ".join(parts)
