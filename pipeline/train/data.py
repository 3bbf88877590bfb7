"""Training data from a prepared dataset: contiguous streams (stateful TBPTT) or shuffled windows.

Both loaders yield :class:`Batch` es of ``inputs_BT`` and ``targets_BT`` (−100 where padded) and
keep their position in a small ``state_dict`` that goes into every checkpoint, so a resumed run
reads exactly the batches an uninterrupted run would have read.
"""

from __future__ import annotations

import collections
import math
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.data.manifest import inside, read_manifest
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.train.config import VERIFY_LEVELS, Direction  # data.verify: what the reader checks

IGNORE = -100  # target id that the loss skips


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

    The tars are uncompressed, so a sample's ``.npy`` data sits at a fixed offset in its shard:
    the index (built once from the tar headers) lets a read seek straight to it. Opening checks
    every shard against the manifest: its file size, and its sample and token counts from the
    index, always (a broken tar header makes ``tarfile`` stop early without an error: the counts
    catch it); with ``verify="full"`` its sha256 too (``data.verify``: a flipped byte keeps every
    size). Any damage raises :class:`PipelineError` naming the shard.
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
        self._where: list[tuple[str, int, int]] = []  # per sample: (shard url, data offset, tokens)
        for i, shard in enumerate(info["shards"]):
            url = inside(root, shard["path"], f"splits.{split}.shards[{i}].path")
            self._where += self._index(url, shard)
        if sum(n for _, _, n in self._where) != self.tokens:
            raise PipelineError(
                f"{root}: the {split} shards hold a different number of tokens than the "
                "manifest says; run rnnpipe verify"
            )
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._cache_size = cache_samples

    def _index(self, url: str, shard: dict[str, Any]) -> list[tuple[str, int, int]]:
        """(url, data offset, tokens) of each sample of the shard at ``url``, checked against its
        manifest entry ``shard``."""
        fs, path = fsio.filesystem(url)
        try:
            size = int(fs.size(path))
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
        out: list[tuple[str, int, int]] = []
        try:
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".npy"):
                        out.append((url, *self._npy_data(f, m, url)))
        except PipelineError:
            raise
        except (tarfile.TarError, EOFError, ValueError, OSError) as e:
            what = f"unreadable after {len(out)} samples ({type(e).__name__}: {e}): truncated or corrupt"
            raise _damaged(url, self.root, what) from None
        tokens = sum(n for _, _, n in out)
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
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except Exception as e:  # numpy parses the header with ast: a broken one raises anything
            raise ValueError(f"sample {m.name}: broken .npy header ({type(e).__name__}: {e})") from None
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

    def _sample(self, i: int) -> np.ndarray:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        url, offset, n = self._where[i]
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
        arr = np.frombuffer(data, dtype=self.dtype)
        self._cache[i] = arr
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return arr

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
        return len(self._where)

    def sample_length(self, i: int) -> int:
        """Tokens in sample ``i``."""
        return self._where[i][2]

    def shard_samples(self) -> list[list[int]]:
        """Sample indices grouped by shard, in order."""
        groups: dict[str, list[int]] = {}
        for i, (url, _, _) in enumerate(self._where):
            groups.setdefault(url, []).append(i)
        return list(groups.values())


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
    A new epoch starts every stream again from its beginning (and the state from zero)."""

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

    def __next__(self) -> Batch:
        T = self.seq_len
        inputs = np.zeros((self.batch, T), dtype=np.int64)
        targets = np.full((self.batch, T), IGNORE, dtype=np.int64)
        for row, j in enumerate(range(self.rank * self.batch, (self.rank + 1) * self.batch)):
            a = int(self.bounds[j]) + self.step_in_epoch * T
            b = min(a + T, int(self.bounds[j + 1]))
            if b > a:
                tokens = self.reader.read(a, b + 1)
                inputs[row, : b - a] = tokens[:-1]
                targets[row, : b - a] = tokens[1:]
        batch = Batch(
            torch.from_numpy(inputs),
            torch.from_numpy(targets),
            self.step_in_epoch == 0,
            int((targets != IGNORE).sum()),
        )
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
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
