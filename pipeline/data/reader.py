"""The shard reader: a prepared split read as one token stream, beside the writer of its shards
(:mod:`rnnpipe.pipeline.data.shards`, :mod:`rnnpipe.pipeline.data.manifest`).

:func:`open_split` opens a split as a run reads it (``data.direction``): a :class:`SplitReader`
(random access to the concatenated tokens of its shards, each shard checked against the manifest
as ``data.verify`` says: its sizes when opened, by default its sha256 when first read; a small
cache of decoded samples) or, read backwards, a :class:`ReversedReader` over one. The training
loaders (:mod:`rnnpipe.pipeline.train.data`), evaluation and sampling read through it.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import tarfile
import threading
from typing import Any

import numpy as np

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.data.config import DEFAULT_VERIFY, VERIFY_LEVELS, Direction  # data.verify
from rnnpipe.pipeline.data.manifest import inside, read_index, read_manifest
from rnnpipe.pipeline.data.shards import read_npy_header
from rnnpipe.pipeline.errors import ConfigError, PipelineError

log = logging.getLogger(__name__)
_TOLD: set[str] = set()  # datasets whose missing sample index this process has logged
_CHUNK = 1 << 22  # bytes a shard is hashed in (4 MiB)


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
    tar header makes ``tarfile`` stop early without an error: the counts catch it). A flipped byte
    keeps every size, so by default (``verify="read"``, ``data.verify``) each shard's sha256 is
    checked against the manifest the first time this reader reads a sample of it, in the pass that
    reads the sample: no token of a damaged shard is returned. ``verify="full"`` hashes every shard
    when opening instead (damage stops a run before its first step); ``verify="sizes"`` never
    hashes. Any damage raises :class:`PipelineError` naming the shard and the way out.

    Samples read are kept in an LRU cache of ``cache_samples`` (at least): :meth:`cache_for_streams`
    grows it to what a number of contiguous streams needs. Reads are thread-safe (one lock).
    """

    def __init__(self, root: str, split: str, cache_samples: int = 64, verify: str = DEFAULT_VERIFY):
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
        self._hashed: set[int] = set()  # shards whose sha256 matched (pickled: workers inherit it)
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
            if self.verify == "full":
                self._hashed.add(i)
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
        """Sample ``i`` from its shard: one open, one seek, one read of its tokens; the first read
        of a shard with ``verify="read"`` reads the whole shard instead, hashing it
        (:meth:`_read_hashed`)."""
        shard, offset, n = (int(x) for x in self._places[i])
        url = self._urls[shard]
        fs, path = fsio.filesystem(url)
        want = n * self.dtype.itemsize
        try:
            if self.verify == "read" and shard not in self._hashed:
                data = self._read_hashed(shard, i, offset, want)
            else:
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

    def _read_hashed(self, shard: int, i: int, offset: int, want: int) -> bytes:
        """Sample ``i``'s ``want`` bytes at ``offset`` of ``shard``, taken from one pass over the
        whole shard (4 MiB reads) that checks its size and sha256 against the manifest: what is
        returned is what was hashed. Then the shard counts as checked for this reader."""
        url = self._urls[shard]
        entry = self.manifest["splits"][self.split]["shards"][shard]
        fs, path = fsio.filesystem(url)
        digest = hashlib.sha256()
        data = bytearray()
        pos = 0
        with fs.open(path, "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
                lo, hi = max(offset - pos, 0), min(offset + want - pos, len(block))
                if lo < hi:
                    data += memoryview(block)[lo:hi]
                pos += len(block)
        if len(data) != want:  # the shard ends inside the sample: the caller names it (truncated)
            return bytes(data)
        if pos != entry["size"]:
            cut = " (truncated)" if pos < entry["size"] else ""
            raise _damaged(url, self.root, f"{pos} bytes, the manifest says {entry['size']}{cut}")
        if (sha := digest.hexdigest()) != entry["sha256"]:
            raise _damaged(
                url,
                self.root,
                f"sha256 {sha[:16]}… differs from the manifest's {entry['sha256'][:16]}… (checked as "
                f"sample {i} was first read from it, before any of its tokens were used)",
            )
        self._hashed.add(shard)
        return bytes(data)

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
    path: str, split: str, verify: str = DEFAULT_VERIFY, direction: Direction | str = Direction.forward
) -> SplitReader | ReversedReader:
    """A prepared dataset's split as a run with ``data.direction`` reads it: a :class:`SplitReader`,
    wrapped in a :class:`ReversedReader` for ``backward``."""
    reader = SplitReader(path, split, verify=verify)
    return ReversedReader(reader) if Direction(direction) is Direction.backward else reader
