"""The shard format: webdataset tars of contiguous token runs. See docs/data-format.md.

A sample is ``<key>.npy`` (a 1-D array of token ids, the dataset's unsigned dtype) and
``<key>.json`` (where the run sits in the split's stream, how many UTF-8 bytes it decodes to,
which documents it spans). Keys are ``<split>-<sample index, 9 digits>`` and sort in stream order.
Tars are written with fixed metadata so the same samples give byte-identical shards.

Beside a split's shards, its sample index (``{split}/{split}-index.npy``) says where each
sample's tokens sit: one row per sample, (shard, byte offset of the ``.npy`` data, tokens), so a
reader seeks straight to a sample without reading every tar header first.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from rnnpipe.pipeline import fsio

TAR_MTIME = 946684800  # 2000-01-01: a fixed mtime makes shards reproducible
KEY_DIGITS = 9
_KEY = re.compile(r"^(train|valid|test)-(\d{9})$")


def shard_path(split: str, index: int) -> str:
    """Path of a shard relative to the dataset root: ``{split}/{split}-{index:06d}.tar``."""
    return f"{split}/{split}-{index:06d}.tar"


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:0{KEY_DIGITS}d}"


def index_path(split: str) -> str:
    """Path of a split's sample index relative to the dataset root: ``{split}/{split}-index.npy``."""
    return f"{split}/{split}-index.npy"


INDEX_COLUMNS = ("shard", "offset", "tokens")  # per sample; int64, little-endian


def index_bytes(rows: np.ndarray) -> bytes:
    """The index file of ``rows`` [samples, 3] (shard, data offset in bytes, tokens): a ``.npy``
    of little-endian int64, the same bytes for the same rows."""
    rows = np.ascontiguousarray(rows, dtype="<i8")
    if rows.ndim != 2 or rows.shape[1] != len(INDEX_COLUMNS):
        raise ValueError(f"an index has rows of {len(INDEX_COLUMNS)} values, not shape {rows.shape}")
    return _npy_bytes(rows)


def parse_index(data: bytes) -> np.ndarray:
    """The rows [samples, 3] of an index file's bytes; ValueError when it is not one."""
    try:
        rows = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy parses the header with ast: a broken one raises anything
        raise ValueError(f"not an index ({type(e).__name__}: {e})") from None
    if rows.dtype != np.dtype("<i8") or rows.ndim != 2 or rows.shape[1] != len(INDEX_COLUMNS):
        raise ValueError(f"holds {rows.dtype}{list(rows.shape)}, expected int64 [samples, 3]")
    return rows


def read_npy_header(f: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the ``.npy`` whose header starts at ``f``'s position; leaves ``f`` at
    its data. ValueError on a broken header."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as e:  # numpy parses the header with ast: a broken one raises anything
        raise ValueError(f"broken .npy header ({type(e).__name__}: {e})") from None
    return shape, dtype


def scan_offsets(url: str) -> list[tuple[int, int]]:
    """(data offset, tokens) of every sample of the shard at ``url``, from its tar and ``.npy``
    headers (what a split's index holds for it). ValueError (or a tar/OS error) on a bad shard."""
    fs, path = fsio.filesystem(url)
    out = []
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for m in tar.getmembers():
            if m.name.endswith(".npy"):
                f.seek(m.offset_data)
                shape, _ = read_npy_header(f)
                out.append((f.tell(), int(shape[0]) if shape else 1))
    return out


def _npy_bytes(tokens: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    return buf.getvalue()


def write_shard(
    url: str,
    samples: Iterable[tuple[str, np.ndarray, dict[str, Any]]],
    offsets: list[tuple[int, int]] | None = None,
) -> tuple[str, int]:
    """Write ``(key, tokens, meta)`` samples as a tar at ``url`` (atomically); returns (sha256, size).

    The layout is webdataset's (``key.json`` then ``key.npy``, members in key order) and what its
    ``TarWriter`` writes, with fixed owner, mode and mtime; written with ``tarfile`` directly
    because importing webdataset imports torch, a second and a half in every task. ``offsets``,
    when given, gets (byte offset of the tokens in the shard, tokens) of each sample appended.
    """
    # The tar closes (writing its end blocks) before the writer renames the file into place.
    with (
        fsio.atomic_writer(url) as out,
        tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for key, tokens, meta in samples:
            json_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
            for ext, data in (("json", json_bytes), ("npy", _npy_bytes(tokens))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
                info.uname = info.gname = "rnnpipe"
                tar.addfile(info, io.BytesIO(data))
                if ext == "npy" and offsets is not None:
                    # tar.offset is past the member's data, padded to whole 512-byte blocks.
                    start = tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                    offsets.append((start + len(data) - tokens.nbytes, len(tokens)))
    return out.sha256.hexdigest(), out.size


def iter_shard(url: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """The ``(key, tokens, meta)`` samples of one shard, in order. Raises ValueError on a bad shard."""
    for key, tokens, meta, _ in _iter_samples(url):
        yield key, tokens, meta


def _iter_samples(url: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any], int]]:
    """:func:`iter_shard`'s samples, each with the byte offset of its tokens in the shard."""
    fs, path = fsio.filesystem(url)
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        pending: dict[str, Any] = {}
        key = None
        offset = -1
        for member in tar:
            name = member.name
            stem, _, ext = name.rpartition(".")
            data = tar.extractfile(member).read() if member.isfile() else b""
            if key is not None and stem != key:
                raise ValueError(f"sample {key} is incomplete (has only {sorted(pending)})")
            key = stem
            if ext == "json":
                pending["json"] = json.loads(data)
            elif ext == "npy":
                pending["npy"] = arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
                offset = member.offset_data + len(data) - arr.nbytes  # past the .npy header
            else:
                raise ValueError(f"unexpected member {name}")
            if len(pending) == 2:
                yield key, pending["npy"], pending["json"], offset
                pending, key = {}, None
        if pending:
            raise ValueError(f"sample {key} is incomplete (has only {sorted(pending)})")


def check_shard(
    url: str,
    split: str,
    dtype: str,
    expected: dict[str, Any],
    first_sample: int,
    token_offset: int,
    offsets: list[tuple[int, int]] | None = None,
) -> list[str]:
    """Problems found by reading every sample of a shard against its manifest entry (empty = fine).
    ``offsets``, when given, gets (byte offset of the tokens, tokens) of each sample read appended."""
    problems: list[str] = []
    samples = tokens = nbytes = 0
    try:
        for key, arr, meta, offset in _iter_samples(url):
            if offsets is not None:
                offsets.append((offset, len(arr)))
            m = _KEY.match(key)
            index = first_sample + samples
            if not m or m.group(1) != split or int(m.group(2)) != index:
                problems.append(f"sample {samples}: key {key!r}, expected {sample_key(split, index)!r}")
                break
            if arr.dtype != np.dtype(dtype) or arr.ndim != 1:
                problems.append(f"sample {key}: tokens are {arr.dtype}[{arr.ndim}-d], expected 1-d {dtype}")
                break
            if meta.get("tokens") != len(arr) or meta.get("token_offset") != token_offset + tokens:
                problems.append(
                    f"sample {key}: json says {meta.get('tokens')} tokens at offset "
                    f"{meta.get('token_offset')}, the array has {len(arr)} at {token_offset + tokens}"
                )
                break
            samples += 1
            tokens += len(arr)
            nbytes += int(meta.get("bytes", -1))
    except (ValueError, tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"unreadable after {samples} samples ({type(e).__name__}: {e}): truncated or corrupt")
        return problems
    for name, got in (("samples", samples), ("tokens", tokens), ("bytes", nbytes)):
        if got != expected[name]:
            problems.append(f"holds {got} {name}, the manifest says {expected[name]}")
    return problems
