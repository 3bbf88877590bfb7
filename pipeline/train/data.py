"""Training data from a prepared dataset: contiguous streams (stateful TBPTT) or shuffled windows.

Both loaders yield :class:`Batch` es of ``inputs_BT`` and ``targets_BT`` (−100 where padded) and
keep their position in a small ``state_dict`` that goes into every checkpoint, so a resumed run
reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rnnpipe.pipeline.data.reader import SplitReader
from rnnpipe.pipeline.errors import PipelineError

log = logging.getLogger(__name__)
IGNORE = -100  # target id that the loss skips


@dataclass
class Batch:
    inputs_BT: torch.Tensor  # int64
    targets_BT: torch.Tensor  # int64, IGNORE where padded
    reset: bool  # start every sequence from the zero state
    targets: int  # non-padded targets in the batch


def stream_bounds(pairs: int, streams: int) -> np.ndarray:
    """Boundaries of ``streams`` contiguous runs of the split's (input, target) pairs: [streams + 1].

    Pair i is input token i and target token i + 1, so every token but the first is a target in
    exactly one stream; runs differ in length by at most one.
    """
    return np.array([j * pairs // streams for j in range(streams + 1)], dtype=np.int64)


class StreamBatches:
    """Stateful truncated BPTT: the split is cut into world × batch contiguous streams; rank r owns
    streams [r·batch, (r + 1)·batch); each step feeds the next ``seq_len`` pairs of each of them.
    A new epoch starts every stream again from its beginning (and the state from zero).

    It asks the reader (where it can, :meth:`SplitReader.cache_for_streams`) to cache what its
    ``batch`` streams need, so each sample is read once per epoch."""

    def __init__(self, reader: SplitReader, rank: int, world: int, batch: int, seq_len: int):
        self.reader, self.rank, self.world, self.batch, self.seq_len = reader, rank, world, batch, seq_len
        self.streams = world * batch
        if reader.tokens - 1 < self.streams:
            split = getattr(reader, "split", None)  # (a fine-tune task's text has none)
            raise PipelineError(
                f"the {split or 'training'} split has {reader.tokens} tokens: too few for {world} "
                f"rank(s) × {batch} streams"
            )
        self.bounds = stream_bounds(reader.tokens - 1, self.streams)
        self.steps_per_epoch = math.ceil(int(np.diff(self.bounds).max()) / seq_len)
        self.epoch = 0
        self.step_in_epoch = 0
        grow = getattr(reader, "cache_for_streams", None)  # (in-memory readers have no cache)
        if grow is not None:
            grow(batch, seq_len)

    def batch_at(self, step_in_epoch: int) -> Batch:
        """The batch of step ``step_in_epoch`` of any epoch (every epoch reads the same), without
        moving the position: inputs and targets [batch, seq_len]."""
        T = self.seq_len
        inputs = np.zeros((self.batch, T), dtype=np.int64)
        targets = np.full((self.batch, T), IGNORE, dtype=np.int64)
        for row, j in enumerate(range(self.rank * self.batch, (self.rank + 1) * self.batch)):
            a = int(self.bounds[j]) + step_in_epoch * T
            b = min(a + T, int(self.bounds[j + 1]))
            if b > a:
                tokens = self.reader.read(a, b + 1)
                inputs[row, : b - a] = tokens[:-1]
                targets[row, : b - a] = tokens[1:]
        return Batch(
            torch.from_numpy(inputs),
            torch.from_numpy(targets),
            step_in_epoch == 0,
            int((targets != IGNORE).sum()),
        )

    def advance(self) -> None:
        """Move the position one step on (into the next epoch after its last step)."""
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def __next__(self) -> Batch:
        batch = self.batch_at(self.step_in_epoch)
        self.advance()
        return batch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": "stream",
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "streams": self.streams,
            "world": self.world,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != "stream":
            raise PipelineError(f"the checkpoint's data position is for data.mode={state.get('mode')}")
        if state["streams"] != self.streams or state["world"] != self.world:
            was = f"{state['world']} rank(s) × {state['streams'] // state['world']} stream(s)"
            raise PipelineError(
                f"the checkpoint was written by {was}; this run has {self.world} × {self.batch}. Stream mode "
                "resumes only with the same world size and data.batch_size: each stream's hidden state "
                "belongs to one rank."
            )
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]


class PrefetchedBatches:
    """A :class:`StreamBatches` whose next batch is read in a background thread while the caller
    works on the current one (stream mode's training loop: the reads overlap the step instead of
    idling the GPU between steps).

    What it yields is exactly what the wrapped loader yields, step for step. Its position
    (``state_dict``) is the consumer's: the wrapped loader moves only when a batch is handed out,
    and the thread reads by step number (:meth:`StreamBatches.batch_at`) without moving it; a
    prefetched batch is used only for the step it was read for (after ``load_state_dict`` it is
    dropped). An error in the thread (a damaged shard) is raised by the ``next()`` that would have
    read that batch, unchanged. Every other attribute (``batch``, ``reader``, ``steps_per_epoch``,
    ...) is the wrapped loader's. The thread is started by the first ``next()`` and ends with
    :meth:`close` or when this object is collected.
    """

    def __init__(self, batches: StreamBatches):
        self.batches = batches
        self._todo: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[int, Batch | None, BaseException | None]] = queue.SimpleQueue()
        self._in_flight = False
        self._thread: threading.Thread | None = None

    def __getattr__(self, name: str) -> Any:
        if name in ("batches", "_thread"):  # (before __init__ has set them)
            raise AttributeError(name)
        return getattr(self.batches, name)

    def _request(self, step: int) -> None:
        if self._thread is None:
            # One thread for the run: starting a thread per step made the loop wait 0.4 ms on its
            # start-up. It holds the loader and the queues, not this object (see close).
            self._thread = threading.Thread(
                target=_prefetch,
                args=(self.batches, self._todo, self._done),
                name="rnnpipe-prefetch",
                daemon=True,
            )
            self._thread.start()
        self._todo.put(step)
        self._in_flight = True

    def _take(self) -> tuple[int, Batch | None, BaseException | None] | None:
        """The read in flight, waited for: (its step, its batch, its error); None when none is."""
        if not self._in_flight:
            return None
        self._in_flight = False
        return self._done.get()

    def __next__(self) -> Batch:
        step = self.batches.step_in_epoch
        done = self._take()
        if done is not None and done[0] == step:
            if done[2] is not None:
                raise done[2]
            batch = done[1]
        else:
            batch = self.batches.batch_at(step)
        assert batch is not None
        self.batches.advance()
        self._request(self.batches.step_in_epoch)
        return batch

    def __iter__(self) -> Iterator[Batch]:
        return self

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._take()  # read for the old position: dropped
        self.batches.load_state_dict(state)

    def close(self, wait: bool = True) -> None:
        """End the thread after the read in flight, waiting for it (``wait``); a later ``next()``
        starts another.

        Waiting matters at exit: a daemon thread still inside a tensor operation when the
        interpreter shuts down aborts the process ("terminate called without an active exception",
        exit -6), which turned a clean error exit (status 1) into a crash."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._todo.put(None)
            if wait and thread is not threading.current_thread():
                thread.join()

    def __del__(self) -> None:
        if "_thread" in self.__dict__:
            self.close(wait=False)


def _prefetch(
    batches: StreamBatches,
    todo: queue.SimpleQueue[int | None],
    done: queue.SimpleQueue[tuple[int, Batch | None, BaseException | None]],
) -> None:
    """:class:`PrefetchedBatches`' thread: reads the batch of each step asked for, until None."""
    while (step := todo.get()) is not None:
        try:
            done.put((step, batches.batch_at(step), None))
        except BaseException as e:  # handed to the consumer as it is: the same error, the same message
            done.put((step, None, e))


@dataclass
class _WorkerFailure:
    """A DataLoader worker's PipelineError (a damaged shard), handed over as an item: raised in
    the worker, torch would re-raise it with the worker's traceback in its message."""

    message: str


class _ShuffleWorkerData(torch.utils.data.IterableDataset):
    """One epoch of one rank's windows; each DataLoader worker takes its own shards."""

    def __init__(self, owner: ShuffleBatches, epoch: int, skip: int):
        super().__init__()
        self.owner, self.epoch, self.skip = owner, epoch, skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | _WorkerFailure]:
        if torch.utils.data.get_worker_info() is None:
            yield from self._windows()
            return
        try:
            yield from self._windows()
        except PipelineError as e:  # the one-line message, not torch's wrapper
            yield _WorkerFailure(str(e))

    def _windows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        o = self.owner
        # The DataLoader takes batches round-robin from physical worker 0; after `skip` batches the
        # next one belongs to logical worker skip % W, so physical worker p plays (p + skip) % W.
        w = ((0 if info is None else info.id) + self.skip) % o.workers
        done = self.skip // o.workers + (1 if w < self.skip % o.workers else 0)
        order = o.windows(self.epoch, o.rank, w)
        T1 = o.seq_len + 1
        for k in range(done, o.batches_per_worker(self.epoch)):
            rows = [o.reader.read(s + off, s + off + T1) for s, off in order[k * o.batch : (k + 1) * o.batch]]
            arr = np.stack(rows)
            yield torch.from_numpy(arr[:, :-1].copy()), torch.from_numpy(arr[:, 1:].copy())


class ShuffleBatches:
    """Independent windows of seq_len + 1 tokens inside samples, shuffled per epoch.

    Each epoch the shards are permuted (seeded) and dealt to ranks × workers; each worker's windows
    are permuted again (seeded by epoch, rank and worker). Every worker yields the same number of
    batches, so all ranks take the same number of steps. Resume skips consumed batches without
    reading them.
    """

    def __init__(
        self, reader: SplitReader, rank: int, world: int, batch: int, seq_len: int, seed: int, workers: int
    ):
        self.reader, self.rank, self.world, self.batch, self.seq_len = reader, rank, world, batch, seq_len
        self.seed, self.workers = seed, max(1, workers)
        self.loader_workers = workers
        self.shards = reader.shard_samples()
        slots = world * self.workers
        if len(self.shards) < slots:
            raise PipelineError(
                f"data.mode=shuffle deals whole shards to ranks × workers: the training split has "
                f"{len(self.shards)} shard(s), fewer than {world} rank(s) × {self.workers} worker(s). Use "
                "fewer data.workers, prepare smaller shards (shards.samples_per_shard), or data.mode=stream."
            )
        starts = np.concatenate(
            [[0], np.cumsum([reader.sample_length(i) for i in range(reader.sample_count())])]
        )
        self.sample_start = starts[:-1]
        self._per_worker: dict[int, int] = {}
        self.epoch = 0
        self.consumed = 0
        self._it: Iterator | None = None
        self.batches_per_worker(0)  # fail now, not mid-run, if a worker would get no batch

    def batches_per_worker(self, epoch: int) -> int:
        """Batches every (rank, worker) yields in ``epoch``: the smallest share, so ranks keep step."""
        if epoch not in self._per_worker:
            n = min(
                len(self.windows(epoch, r, w)) // self.batch
                for r in range(self.world)
                for w in range(self.workers)
            )
            if n < 1:
                raise PipelineError(
                    f"data.mode=shuffle: some rank/worker has fewer than data.batch_size="
                    f"{self.batch} windows of {self.seq_len + 1} tokens"
                )
            self._per_worker = {epoch: n}  # keep one epoch: the window lists are recomputed per epoch
        return self._per_worker[epoch]

    def steps_per_epoch(self, epoch: int) -> int:
        return self.batches_per_worker(epoch) * self.workers

    def windows(self, epoch: int, rank: int, worker: int) -> list[tuple[int, int]]:
        """(sample start token, offset) of every window of (rank, worker) in ``epoch``, in order."""
        shard_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        slot = rank * self.workers + worker
        mine = [self.shards[s] for s in shard_order[slot :: self.world * self.workers]]
        T1 = self.seq_len + 1
        wins = [
            (int(self.sample_start[i]), k * T1)
            for shard in mine
            for i in shard
            for k in range(self.reader.sample_length(i) // T1)
        ]
        order = np.random.default_rng([self.seed, epoch, rank, worker]).permutation(len(wins))
        return [wins[i] for i in order]

    def _start_epoch(self) -> None:
        data = _ShuffleWorkerData(self, self.epoch, self.consumed)
        if self.loader_workers:
            # Its own generator: a DataLoader draws its workers' seed from the global RNG otherwise,
            # which would shift the training's random stream (dropout) after a resume.
            gen = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            loader = torch.utils.data.DataLoader(
                data,
                batch_size=None,
                num_workers=self.loader_workers,
                multiprocessing_context="spawn",
                generator=gen,
            )
            self._it = iter(loader)
        else:
            self._it = iter(data)

    def __next__(self) -> Batch:
        if self._it is None:
            self._start_epoch()
        item = next(self._it)
        if isinstance(item, _WorkerFailure):
            raise PipelineError(item.message)
        inputs, targets = item
        self.consumed += 1
        if self.consumed == self.steps_per_epoch(self.epoch):
            self.epoch, self.consumed, self._it = self.epoch + 1, 0, None
        return Batch(inputs, targets, True, int(targets.numel()))

    def __iter__(self) -> Iterator[Batch]:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": "shuffle",
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "world": self.world,
            "workers": self.workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode") != "shuffle":
            raise PipelineError(f"the checkpoint's data position is for data.mode={state.get('mode')}")
        if (state["world"], state["workers"], state["seed"]) != (self.world, self.workers, self.seed):
            raise PipelineError(
                f"the checkpoint's shuffle order was for {state['world']} rank(s) × "
                f"{state['workers']} worker(s), seed {state['seed']}; this run has {self.world} × "
                f"{self.workers}, seed {self.seed}"
            )
        self.epoch, self.consumed, self._it = state["epoch"], state["consumed"], None


def eval_batches(
    reader: SplitReader, rank: int, world: int, streams_per_rank: int, seq_len: int, max_tokens: int = 0
) -> Iterator[Batch]:
    """One pass over (the first ``max_tokens`` of) a split as world × streams contiguous streams,
    for evaluation with the state carried through each stream."""
    total = reader.tokens if not max_tokens else min(reader.tokens, max_tokens)
    view = _Prefix(reader, total)
    streams = StreamBatches(view, rank, world, streams_per_rank, seq_len)  # type: ignore[arg-type]
    for _ in range(streams.steps_per_epoch):
        yield next(streams)


class _Prefix:
    """The first ``tokens`` tokens of a reader."""

    def __init__(self, reader: SplitReader, tokens: int):
        self.reader, self.tokens = reader, tokens
        self.split = getattr(reader, "split", None)  # (named in StreamBatches' errors)

    def read(self, a: int, b: int) -> np.ndarray:
        return self.reader.read(a, b)

    def cache_for_streams(self, streams: int, seq_len: int) -> None:
        grow = getattr(self.reader, "cache_for_streams", None)
        if grow is not None:
            grow(streams, seq_len)
