"""Paths through fsspec: every file rnnpipe reads or writes is a URL (a plain path is a local URL).

Outputs are written under a temporary name and renamed when complete, so a reader never sees a
half-written file under its final name, and a killed writer leaves only ``*.partial`` files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

PARTIAL_SUFFIX = ".partial"


def absolute(url: str) -> str:
    """A local path made absolute (jobs on other nodes have other working directories); URLs as given."""
    if "://" in url or "::" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    """``url/part/...`` keeping the protocol."""
    out = url.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path within it."""
    return fsspec.core.url_to_fs(url)


def is_local(url: str) -> bool:
    """True where ``url`` is a plain local file (seekable, memory-mappable)."""
    if "::" in url:
        return False
    fs, _ = filesystem(url)
    return isinstance(fs, LocalFileSystem)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


class _HashingWriter:
    """A write-only file wrapper that feeds every byte to sha256 and counts them."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self.size


@contextlib.contextmanager
def atomic_writer(url: str) -> Iterator[_HashingWriter]:
    """Open ``url`` for writing under ``url.partial``; rename to ``url`` only on success.

    The yielded object has ``.sha256`` and ``.size`` of everything written. On an exception the
    partial file is removed; after a kill it stays as ``*.partial`` and is overwritten next time.
    """
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = path + PARTIAL_SUFFIX
    try:
        with fs.open(tmp, "wb") as raw:
            writer = _HashingWriter(raw)
            yield writer
            raw.flush()
            if isinstance(fs, LocalFileSystem):
                os.fsync(raw.fileno())
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise
    if isinstance(fs, LocalFileSystem):
        os.replace(tmp, path)  # atomic on POSIX, also over an existing file
    else:
        fs.mv(tmp, path)


def write_bytes_atomic(url: str, data: bytes) -> str:
    """Write ``data`` to ``url`` atomically; returns its sha256 (hex)."""
    with atomic_writer(url) as w:
        w.write(data)
    return w.sha256.hexdigest()


def write_text_atomic(url: str, text: str) -> str:
    return write_bytes_atomic(url, text.encode("utf-8"))


def sha256_of(url: str, chunk: int = 1 << 22) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of the file at ``url``, read in 4 MiB chunks."""
    h = hashlib.sha256()
    n = 0
    with fsspec.open(url, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
            n += len(block)
    return h.hexdigest(), n


def path_problem(rel: Any) -> str | None:
    """What is wrong with ``rel`` as a path inside a dataset (None: nothing): it must be a
    non-empty relative POSIX path, normalised, without ``..`` components or a URL scheme."""
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    if "\0" in rel or "\\" in rel:
        return "holds a NUL or a backslash"
    if rel.startswith("/") or "://" in rel or "::" in rel or rel.startswith("~"):
        return "is absolute (or a URL)"
    if ".." in rel.split("/"):
        return "has a '..' component"
    if posixpath.normpath(rel) != rel or rel == ".":
        return f"is not normalised (it would be {posixpath.normpath(rel)!r})"
    return None
