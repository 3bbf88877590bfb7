"""Evaluation with the state carried through a whole split (as the enwik8 literature does), or
with it reset every ``window`` tokens (``eval.window``: as a fixed-context model reads the split).

A long evaluation (a whole split at the end of training) says how far it is: rank 0 logs a line
every tenth of the split, but no more than one per half minute (a short one logs none).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rnnpipe.pipeline.data.reader import SplitReader
from rnnpipe.pipeline.engine.metrics import duration
from rnnpipe.pipeline.engine.rank import RankContext
from rnnpipe.pipeline.train.data import IGNORE, Batch, eval_batches, stream_bounds

log = logging.getLogger("rnnpipe.train")
PROGRESS_FRACTION = 0.1  # a progress line per this share of the batches ...
PROGRESS_MIN_S = 30.0  # ... and at least this long after the previous one


def eval_batch_count(
    tokens: int, world: int, streams_per_rank: int, seq_len: int, max_tokens: int = 0
) -> int:
    """How many batches :func:`rnnpipe.pipeline.train.data.eval_batches` yields on a split of ``tokens``
    tokens: its arithmetic (the longest of world × streams contiguous streams, in seq_len steps),
    without reading the split."""
    total = tokens if not max_tokens else min(tokens, max_tokens)
    longest = int(np.diff(stream_bounds(total - 1, world * streams_per_rank)).max())
    return math.ceil(longest / seq_len)


def split_name(reader: SplitReader) -> str:
    """The name of the reader's split (``valid``, ``test``), for the progress lines; "evaluation"
    for a reader without one (fine-tuning's in-memory streams)."""
    name = getattr(reader, "split", None)
    return name if isinstance(name, str) else "evaluation"


class _Progress:
    """Rank 0's progress lines over ``total`` batches: one when a further :data:`PROGRESS_FRACTION`
    is done and :data:`PROGRESS_MIN_S` have passed since the last (or the start), with the speed
    (rank 0's targets × world: the streams differ by at most a token each) and the time left."""

    def __init__(self, name: str, total: int, world: int, every_s: float, fraction: float):
        self.name, self.total, self.world = name, total, world
        self.every_s, self.step = every_s, max(1, math.ceil(total * fraction))
        self.start = self.last = time.perf_counter()
        self.next = self.step
        self.targets = 0

    def update(self, done: int, targets: int) -> None:
        self.targets += targets
        if done < self.next or done >= self.total:  # (the last batch: the result's line follows)
            return
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.next = (done // self.step + 1) * self.step
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        log.info(
            "%s: %d/%d batches (%.0f%%) | %s tok/s | eta %s",
            self.name,
            done,
            self.total,
            100 * done / self.total,
            f"{self.targets * self.world / elapsed:,.0f}",
            duration(elapsed / done * (self.total - done)),
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    reader: SplitReader,
    ctx: RankContext,
    streams: int,
    seq_len: int,
    *,
    max_tokens: int = 0,
    should_stop: Callable[[], bool] | None = None,
    check_every: int = 16,
    progress_every_s: float = PROGRESS_MIN_S,
    window: int = 0,
) -> dict[str, float] | None:
    """Loss (nats per token), bits per byte and perplexity of ``model`` on a split, and the number
    of target tokens scored: ``{"loss", "bpb", "ppl", "tokens"}``.

    ``ctx``: this rank (its index ``ctx.rank`` of ``ctx.world`` ranks, and ``ctx.device``, where
    the model runs); :meth:`RankContext.single() <rnnpipe.pipeline.engine.rank.RankContext.single>`
    for one process. ``streams``: the streams per rank (rows of a batch); ``seq_len``: the tokens
    per stream per forward pass, so a batch is ``streams`` × ``seq_len`` tokens. ``max_tokens``:
    only the split's first this many tokens (0: all of it).

    ``window`` > 0 (``eval.window``, in tokens) scores the same targets with the state reset every
    ``window`` tokens instead (:func:`window_batches`: every target predicted from at most
    ``window`` tokens of context, as a fixed-context model of that block size scores them);
    ``streams`` × ``seq_len`` then bounds the tokens per forward pass.

    The split is cut into ``ctx.world`` × ``streams`` contiguous streams; each is read from its
    start with the state carried from segment to segment. Every rank runs the same number of
    forward passes (ZeRO-3 gathers parameters collectively), and the sums are all-reduced when a
    process group is set up. Bits per byte use the split's UTF-8 byte count from the shards, so
    they compare across tokenizers.

    ``should_stop`` is asked every ``check_every`` batches (all ranks agree: :meth:`RankContext.any`):
    when it says yes — a preemption signal arrived — the evaluation is abandoned and ``None``
    returned, so that the job can still checkpoint and requeue within the signal's grace period.

    Rank 0 logs its progress (:class:`_Progress`; ``progress_every_s``: the least time between two
    lines, in seconds); the results do not depend on it.
    """
    rank, world, device = ctx.rank, ctx.world, ctx.device
    was_training = model.training
    model.eval()
    state = None
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # nats, targets
    delay = float(os.environ.get("RNNPIPE_TEST_EVAL_DELAY", "0"))  # tests: a slow evaluation
    progress = None
    if window:
        batches = window_batches(reader, rank, world, streams, seq_len, window, max_tokens)
        total = window_batch_count(reader.tokens, world, streams, seq_len, window, max_tokens)
    else:
        batches = eval_batches(reader, rank, world, streams, seq_len, max_tokens)
        total = eval_batch_count(reader.tokens, world, streams, seq_len, max_tokens)
    if rank == 0:
        progress = _Progress(split_name(reader), total, world, progress_every_s, PROGRESS_FRACTION)
    for i, batch in enumerate(batches):
        if batch.reset and window:  # (carried: StreamBatches' only reset is the first batch)
            state = None
        if should_stop is not None and i % check_every == check_every - 1 and ctx.any(should_stop()):
            model.train(was_training)
            return None
        if delay:
            time.sleep(delay)
        logits, state = model(batch.inputs_BT.to(device), state)
        targets = batch.targets_BT.to(device)
        totals[0] += F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        ).double()
        totals[1] += (targets != IGNORE).sum()
        if progress is not None:  # (batch.targets: counted on the CPU, no wait for the device)
            progress.update(i + 1, batch.targets)
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    nats, targets = totals.tolist()
    return summarize(nats, targets, reader)


def _window_layout(
    tokens: int, world: int, streams: int, seq_len: int, window: int, max_tokens: int
) -> tuple[int, int, int, int]:
    """(target pairs, windows per rank per batch, tokens per forward pass, global batches) of a
    windowed evaluation: see :func:`window_batches`."""
    pairs = (tokens if not max_tokens else min(tokens, max_tokens)) - 1
    chunk = min(window, seq_len)
    rows = max(1, streams * seq_len // chunk)
    windows = math.ceil(pairs / window)
    return pairs, rows, chunk, math.ceil(windows / (world * rows))


def window_batch_count(
    tokens: int, world: int, streams: int, seq_len: int, window: int, max_tokens: int = 0
) -> int:
    """How many batches :func:`window_batches` yields on a split of ``tokens`` tokens (every rank
    the same), without reading the split."""
    pairs, rows, chunk, batches = _window_layout(tokens, world, streams, seq_len, window, max_tokens)
    span = world * rows * window  # pairs per global batch
    return sum(math.ceil(min(window, pairs - g * span) / chunk) for g in range(batches))


def window_batches(
    reader: SplitReader,
    rank: int,
    world: int,
    streams: int,
    seq_len: int,
    window: int,
    max_tokens: int = 0,
) -> Iterator[Batch]:
    """One pass over (the first ``max_tokens`` of) a split in windows of ``window`` (input, target)
    pairs, each read from the zero state: ``eval.window``.

    Window k holds input tokens [k·N, (k + 1)·N) and their targets [k·N + 1, (k + 1)·N + 1)
    (N = ``window``; the last one may be shorter), so every token but the first is a target once,
    predicted from 1 … N tokens of context: nanoGPT's scoring of a block of N inputs, over every
    block of the split rather than a random sample of them. Each batch takes R consecutive
    windows per rank (R = ``streams`` × ``seq_len`` // min(N, ``seq_len``), so a forward pass holds
    about as many tokens as the carried evaluation's), rank r the r-th R of each world × R; a
    window longer than ``seq_len`` is read in ``seq_len`` pieces with the state carried between
    them. The first batch of each group of windows has ``reset`` set: the caller starts it from
    the zero state. Every rank yields the same number of batches (rows past the split's end are
    all padding: IGNORE targets)."""
    pairs, rows, chunk, batches = _window_layout(reader.tokens, world, streams, seq_len, window, max_tokens)
    span = world * rows * window
    for g in range(batches):
        longest = min(window, pairs - g * span)  # the batch's longest window, the same on every rank
        a = min(g * span + rank * rows * window, pairs)  # this rank's first pair
        b = min(a + rows * window, pairs)
        got = reader.read(a, b + 1) if b > a else np.zeros(1, np.int64)
        flat = np.full(rows * window + 1, IGNORE, dtype=np.int64)
        flat[: len(got)] = got
        inputs_RN = np.where(flat[:-1] == IGNORE, 0, flat[:-1]).reshape(rows, window)
        targets_RN = flat[1:].copy()
        targets_RN[b - a :] = IGNORE  # (the pair count: the token after the last pair is no target)
        targets_RN = targets_RN.reshape(rows, window)
        for c in range(0, longest, chunk):
            t = targets_RN[:, c : c + chunk]
            yield Batch(
                torch.from_numpy(np.ascontiguousarray(inputs_RN[:, c : c + chunk])),
                torch.from_numpy(np.ascontiguousarray(t)),
                c == 0,
                int((t != IGNORE).sum()),
            )


def summarize(nats: float, targets: float, reader: SplitReader) -> dict[str, float]:
    """An evaluation's result from the nats summed over its ``targets`` target tokens: loss (nats
    per token), bits per byte (from the split's UTF-8 bytes per token), perplexity, tokens."""
    loss = nats / max(targets, 1)
    bytes_per_token = reader.bytes / reader.tokens
    return {
        "loss": loss,
        "bpb": loss / math.log(2) / bytes_per_token,
        "ppl": math.exp(min(loss, 50.0)),
        "tokens": targets,
    }
