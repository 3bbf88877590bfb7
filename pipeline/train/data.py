"""Training data from a prepared dataset: contiguous streams (stateful TBPTT) or shuffled windows.

Both loaders yield :class:`Batch` es of ``inputs_BT`` and ``targets_BT`` (−100 where padded) and
keep their position in a small ``state_dict`` that goes into every checkpoint, so a resumed run
reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.data.manifest import inside, read_index, read_manifest
from rnnpipe.pipeline.data.shards import read_npy_header
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.train.config import VERIFY_LEVELS, Direction  # data.verify: what the reader checks

log = logging.getLogger(__name__)
IGNORE = -100  # target id that the loss skips
_TOLD: set[str] = set()  # datasets whose missing sample index this process has logged


@dataclass
class Batch:
    inputs_BT: torch.Tensor  # int64
    targets_BT: torch.Tensor  # int64, IGNORE where padded
    reset: bool  # start every sequence from the zero state
    targets: int  # non-padded targets in the batch


def _damaged(url: str, root: str, what: str) -> PipelineError:
    """The one error every damaged shard gives: the shard, what is wrong, and the way out."""
    return PipelineError(
        f"{url}: {what}. The shard is damaged: rnnpipe verify {root} lists every problem, and "
        "running the same rnnpipe prepare again rebuilds the damaged shards"
    )


class SplitReader:
    """Random access to one split's token stream: ``read(a, b)`` returns tokens [a, b).

    The tars are uncompressed, so a sample's ``.npy`` data sits at a fixed offset in its shard.
    Where each one sits comes from the split's sample index, written by prepare beside the shards
    (one read, checked against the manifest's sha256 and counts); a dataset without one, or a
    shard modified after its index was written, is indexed from its tar headers (one small read
    per sample). Opening checks every shard against the manifest: its file size always, and for a
    shard indexed from its headers its sample and token counts and each ``.npy`` header (a broken
    tar header makes ``tarfile`` stop early without an error: the counts catch it); with
    ``verify="full"`` its sha256 too (``data.verify``: a flipped byte keeps every size). Any damage
    raises :class:`PipelineError` naming the shard.

    Samples read are kept in an LRU cache of ``cache_samples`` (at least): :meth:`cache_for_streams`
    grows it to what a number of contiguous streams needs. Reads are thread-safe (one lock).
    """

    def __init__(self, root: str, split: str, cache_samples: int = 64, verify: str = "sizes"):
        if verify not in VERIFY_LEVELS:
            raise ConfigError(f"data.verify={verify!r}: expected one of {', '.join(VERIFY_LEVELS)}")
        root = fsio.absolute(root)
        manifest = read_manifest(root)
        if split not in manifest["splits"]:
            raise PipelineError(f"{root} has no {split} split (it has {', '.join(manifest['splits'])})")
        self.split = split  # its name: valid, test, train (evaluation's progress lines say it)
        info = manifest["splits"][split]
        self.root = root
        self.manifest = manifest
        self.verify = verify
        self.tokens = int(info["tokens"])
        self.bytes = int(info["bytes"])
        self.dtype = np.dtype(manifest["dtype"])
        self.sample_tokens = int(manifest["sample_tokens"])
        # The shards' urls, and per sample [samples, 3]: (shard, data offset in bytes, tokens).
        self._urls, self._places = self._locate(info)
        if int(self._places[:, 2].sum()) != self.tokens:
            raise PipelineError(
                f"{root}: the {split} shards hold a different number of tokens than the "
                "manifest says; run rnnpipe verify"
            )
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_size = cache_samples
        self._lock = threading.Lock()  # the prefetch thread and the loop share the cache

    def __getstate__(self) -> dict[str, Any]:  # (shuffle mode's spawned workers get a copy)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _locate(self, info: dict[str, Any]) -> tuple[list[str], np.ndarray]:
        """(the shards' urls, [samples, 3] int64: each sample's shard, data offset and tokens): from
        the split's index where it has a sound one, else (and for a shard modified after it) from
        the tar headers."""
        rows, written = self._load_index()
        urls: list[str] = []
        parts: list[np.ndarray] = []
        starts = np.searchsorted(rows[:, 0], np.arange(len(info["shards"]) + 1)) if rows is not None else None
        for i, shard in enumerate(info["shards"]):
            urls.append(inside(self.root, shard["path"], f"splits.{self.split}.shards[{i}].path"))
            mtime = self._check_file(urls[i], shard)
            if starts is None or (written is not None and mtime is not None and mtime > written):
                found = np.asarray(self._index(urls[i], shard), np.int64).reshape(-1, 2)  # (checked there)
                parts.append(np.column_stack([np.full(len(found), i, np.int64), found]))
            else:
                parts.append(rows[starts[i] : starts[i + 1]])
        return urls, np.concatenate(parts) if parts else np.zeros((0, 3), np.int64)

    def _load_index(self) -> tuple[np.ndarray | None, int | None]:
        """(the split's index rows, its mtime in ns or None) or (None, None) where there is no sound
        one; says once per dataset how to add a missing one, and warns of a damaged one."""
        info = self.manifest["splits"][self.split]
        try:
            return read_index(self.root, self.manifest, self.split)
        except ValueError as e:
            if "index" in info:
                log.warning(
                    "%s: %s; reading the %s shards' tar headers instead (running the same rnnpipe "
                    "prepare again rewrites the index)",
                    self.root,
                    e,
                    self.split,
                )
            elif self.root not in _TOLD:
                _TOLD.add(self.root)
                log.info(
                    "%s has no sample index (prepared before rnnpipe wrote them): every start reads "
                    "each shard's tar headers. To add one, run the same rnnpipe prepare again "
                    "(rnnpipe prepare %s/config.yaml output=%s): it checks the shards, reads their "
                    "headers once and writes the index; the shards and the fingerprint stay as they are",
                    self.root,
                    self.root,
                    self.root,
                )
            return None, None

    def _check_file(self, url: str, shard: dict[str, Any]) -> int | None:
        """Check the shard at ``url`` against its manifest entry: size, and sha256 with
        ``verify="full"``; returns its mtime in ns (None where the dataset is not local)."""
        fs, path = fsio.filesystem(url)
        local = fsio.is_local(url)
        try:
            st = os.stat(url) if local else None
            size = st.st_size if st is not None else int(fs.size(path))
        except FileNotFoundError:
            raise _damaged(url, self.root, "missing") from None
        if size != shard["size"]:
            cut = " (truncated)" if size < shard["size"] else ""
            raise _damaged(url, self.root, f"{size} bytes, the manifest says {shard['size']}{cut}")
        if self.verify == "full":
            sha = fsio.sha256_of(url)[0]
            if sha != shard["sha256"]:
                raise _damaged(
                    url, self.root, f"sha256 {sha[:16]}… differs from the manifest's {shard['sha256'][:16]}…"
                )
        return st.st_mtime_ns if st is not None else None

    def _index(self, url: str, shard: dict[str, Any]) -> list[tuple[int, int]]:
        """(data offset, tokens) of each sample of the shard at ``url``, from its tar headers,
        checked against its manifest entry ``shard``."""
        fs, path = fsio.filesystem(url)
        out: list[tuple[int, int]] = []
        try:
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".npy"):
                        out.append(self._npy_data(f, m, url))
        except PipelineError:
            raise
        except (tarfile.TarError, EOFError, ValueError, OSError) as e:
            what = f"unreadable after {len(out)} samples ({type(e).__name__}: {e}): truncated or corrupt"
            raise _damaged(url, self.root, what) from None
        tokens = sum(n for _, n in out)
        if len(out) != shard["samples"] or tokens != shard["tokens"]:
            # tarfile ends its listing at a broken header (after the first) without an error.
            raise _damaged(
                url,
                self.root,
                f"its tar index lists {len(out)} samples and {tokens} tokens, the manifest says "
                f"{shard['samples']} and {shard['tokens']} (a broken tar header?)",
            )
        return out

    def _npy_data(self, f: Any, m: tarfile.TarInfo, url: str) -> tuple[int, int]:
        """(offset of the array data in the shard, tokens) of the ``.npy`` member ``m``."""
        f.seek(m.offset_data)
        try:
            shape, dtype = read_npy_header(f)
        except ValueError as e:
            raise ValueError(f"sample {m.name}: {e}") from None
        if dtype != self.dtype:
            raise _damaged(url, self.root, f"sample {m.name} is {dtype}, the manifest says {self.dtype}")
        if len(shape) != 1:
            raise _damaged(url, self.root, f"sample {m.name} has shape {shape}, expected a 1-d array")
        offset = f.tell()
        if offset - m.offset_data + shape[0] * dtype.itemsize != m.size:
            raise _damaged(
                url,
                self.root,
                f"sample {m.name}: its .npy header says {shape[0]} tokens, the member holds "
                f"{m.size - (offset - m.offset_data)} bytes of data",
            )
        return offset, int(shape[0])

    def cache_for_streams(self, streams: int, seq_len: int) -> None:
        """Grow the cache to what ``streams`` contiguous streams read ``seq_len`` (+1) tokens at a
        time, each in turn, need to read every sample once: (streams + 1) × the samples one read
        can touch (ceil(seq_len / sample_tokens) + 1; 2 when a sample holds a step). An LRU
        smaller than the streams' working set evicts each sample just before its next use (at 64
        streams and 64 samples, 30 re-reads a step instead of 0.5). Never more than the split's
        samples; never shrinks."""
        per_read = -(-seq_len // self.sample_tokens) + 1
        need = min((streams + 1) * per_read, len(self._places))
        with self._lock:
            self._cache_size = max(self._cache_size, need)

    def _sample(self, i: int) -> np.ndarray:
        """Sample ``i``'s tokens (the split's dtype): from the cache, or read and cached."""
        with self._lock:  # the prefetch thread and the loop (evaluating this split) share the cache
            arr = self._cache.get(i)
            if arr is not None:
                self._cache.move_to_end(i)
                return arr
            arr = self._read_sample(i)
            self._cache[i] = arr
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return arr

    def _read_sample(self, i: int) -> np.ndarray:
        """Sample ``i`` from its shard: one open, one seek, one read of its tokens."""
        shard, offset, n = (int(x) for x in self._places[i])
        url = self._urls[shard]
        fs, path = fsio.filesystem(url)
        want = n * self.dtype.itemsize
        try:
            with fs.open(path, "rb") as f:
                f.seek(offset)
                data = f.read(want)
        except OSError as e:
            raise _damaged(url, self.root, f"cannot read sample {i} ({type(e).__name__}: {e})") from None
        if len(data) != want:  # the file shrank after it was indexed
            raise _damaged(
                url, self.root, f"sample {i}: read {len(data)} of {want} bytes at byte {offset} (truncated)"
            )
        return np.frombuffer(data, dtype=self.dtype)

    def read(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the split as int64."""
        n = self.sample_tokens
        parts = []
        while a < b:
            i, off = divmod(a, n)
            take = min(b - a, n - off)
            parts.append(self._sample(i)[off : off + take])
            a += take
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def sample_count(self) -> int:
        """Samples in the split."""
        return len(self._places)

    def sample_length(self, i: int) -> int:
        """Tokens in sample ``i``."""
        return int(self._places[i, 2])

    def shard_samples(self) -> list[list[int]]:
        """Sample indices grouped by shard, in order."""
        bounds = np.searchsorted(self._places[:, 0], np.arange(len(self._urls) + 1))
        return [
            list(range(a, b)) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True) if b > a
        ]


class ReversedReader:
    """A split read backwards (``data.direction=backward``): token i is the inner reader's token
    N − 1 − i, over the whole stream (every shard, in the order :class:`SplitReader` presents it).

    Its ``tokens`` and ``bytes`` are the inner reader's, so bits per byte compare with a forward
    run's. Its samples are the inner ones in reverse order, each reversed (sample i is inner sample
    S − 1 − i), and its shards the inner ones in reverse order: shuffle mode cuts its windows inside
    samples as it does forward. Any other attribute (``split``, ``manifest``, ``root``...) is the
    inner reader's. Stream batching is unchanged: the state is carried backwards through the text.
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self.tokens, self.bytes = int(inner.tokens), int(inner.bytes)

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # (unpickling: before __dict__ is restored)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def read(self, a: int, b: int) -> np.ndarray:
        """Tokens [a, b) of the reversed stream: the inner [N − b, N − a), reversed."""
        n = self.tokens
        if not 0 <= a <= b <= n:
            raise IndexError(f"read({a}, {b}) outside the split's {n} tokens")
        return np.ascontiguousarray(self.inner.read(n - b, n - a)[::-1])

    def sample_count(self) -> int:
        return self.inner.sample_count()

    def sample_length(self, i: int) -> int:
        return self.inner.sample_length(self.inner.sample_count() - 1 - i)

    def shard_samples(self) -> list[list[int]]:
        last = self.inner.sample_count() - 1
        return [[last - i for i in reversed(group)] for group in reversed(self.inner.shard_samples())]


def open_split(
    path: str, split: str, verify: str = "sizes", direction: Direction | str = Direction.forward
) -> SplitReader | ReversedReader:
    """A prepared dataset's split as a run with ``data.direction`` reads it: a :class:`SplitReader`,
    wrapped in a :class:`ReversedReader` for ``backward``."""
    reader = SplitReader(path, split, verify=verify)
    return ReversedReader(reader) if Direction(direction) is Direction.backward else reader


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
            raise PipelineError(
                f"the training split has {reader.tokens} tokens: too few for {world} ranks × {batch} streams"
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


class _ShuffleWorkerData(torch.utils.data.IterableDataset):
    """One epoch of one rank's windows; each DataLoader worker takes its own shards."""

    def __init__(self, owner: ShuffleBatches, epoch: int, skip: int):
        super().__init__()
        self.owner, self.epoch, self.skip = owner, epoch, skip

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
        inputs, targets = next(self._it)
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

    def read(self, a: int, b: int) -> np.ndarray:
        return self.reader.read(a, b)

    def cache_for_streams(self, streams: int, seq_len: int) -> None:
        grow = getattr(self.reader, "cache_for_streams", None)
        if grow is not None:
            grow(streams, seq_len)
