"""What an export directory is, without loading it (no torch): its file names and its identity.

An ``rnnpipe export`` directory holds ``model.safetensors`` (fp32 weights), ``config.json`` (what
any Python with ``transformers`` reads: the model config, the vocabulary, the tokenizer's
description; no absolute path, host name or process id, so the directory can go anywhere),
``rnnpipe.json`` (rnnpipe's header: ``source``, where the weights came from, including their
sha256, and ``model``, the model config as the run had it, paths included), ``README.md`` (the
model card) and ``tokenizer/``. :mod:`rnnpipe.pipeline.models.pretrained` writes and loads one.

Exports written before the header kept ``source`` inside ``config.json``: they are read as before.

An export may come from anyone, so what rnnpipe's loaders read of it is checked before it is
used: :func:`export_config` (config.json a JSON object with ``model``, ``vocab_size`` and
``tokenizer``), :func:`rnnpipe.pipeline.models.export_shapes.check_weights` (the config's sizes
against the shapes in ``model.safetensors``'s header, read without its data, before a model is
built: a config asking for ``d_model=1e9`` is refused, not allocated) and
:func:`export_tokenizer` (a broken tokenizer file named). Its ``.py`` files are code: nothing
here imports them (only ``transformers`` with ``trust_remote_code=True`` does).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.errors import ConfigError, PipelineError

WEIGHTS, CONFIG = "model.safetensors", "config.json"
HEADER = "rnnpipe.json"  # rnnpipe's own record of the export: provenance, the model config as trained
HEADER_FORMAT = "rnnpipe-export"
BACKWARD = "backward"  # the backward LM's export inside a forward one
DIRECTIONS = ("forward", "backward")
# The header's keys that override config.json's in export_meta (its copies there are portable ones).
_HEADER_KEYS = ("source", "model")


def _read_json(url: str) -> dict[str, Any] | None:
    """A JSON object file, or None where it is absent, unreadable or not an object."""
    try:
        value = json.loads(fsio.read_text(url))
    except (OSError, ValueError, PipelineError):
        return None
    return value if isinstance(value, dict) else None


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an rnnpipe export: a config.json with model and tokenizer, and a
    ``source`` in rnnpipe.json (or, as exports before the header had it, in config.json). A
    Hugging Face model directory has a config.json too."""
    root = fsio.absolute(str(path))
    meta = _read_json(fsio.join(root, CONFIG))
    if meta is None or "model" not in meta or "tokenizer" not in meta:
        return False
    header = _read_json(fsio.join(root, HEADER))
    return "source" in (header or meta)


def export_meta(path: str) -> dict[str, Any]:
    """An export's ``config.json`` with its header's ``source`` and ``model`` (the model config
    as trained; config.json's copy has its paths reduced to names); an export without a header
    (written before it, or re-saved by transformers alone) is its config.json as it is.
    PipelineError naming the file when ``path`` is not an export or a file is not valid JSON."""
    root = fsio.absolute(path)
    file = fsio.join(root, CONFIG)
    if not fsio.exists(file):
        raise PipelineError(
            f"{path} is not an rnnpipe export: it has no {CONFIG} (make one with rnnpipe export)"
        )
    meta = _load(file)
    header_file = fsio.join(root, HEADER)
    if fsio.exists(header_file):
        header = _load(header_file)
        meta.update({k: header[k] for k in _HEADER_KEYS if k in header})
    return meta


_REDO = "copy the export again, or export it again (rnnpipe export RUN OUT)"


def _load(file: str) -> dict[str, Any]:
    try:
        value = json.loads(fsio.read_text(file))
    except ValueError as e:  # (a UnicodeDecodeError is a ValueError too)
        raise PipelineError(f"{file}: not valid JSON ({str(e).splitlines()[0]}): {_REDO}") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{file}: not a JSON object: {_REDO}")
    return value


def export_source(path: str | os.PathLike) -> dict[str, Any]:
    """Where an export's weights came from (its header's ``source``: checkpoint, step, dataset,
    fingerprint, direction, the weights' sha256, ...); ``{}`` when it records none."""
    return export_meta(str(path)).get("source") or {}


def backbone_identity(path: str) -> dict[str, Any]:
    """What an export is, for everything made from it: the sha256 of its weights (recorded at
    export, and computed again when the file's size or mtime is not the recorded one), the step and
    fingerprint of the run it came from, and the model and tokenizer it declares."""
    meta = export_meta(path)
    source = meta.get("source") or {}
    weights = fsio.join(fsio.absolute(path), WEIGHTS)
    sha = source.get("weights_sha256")
    if fsio.is_local(weights):  # trust the recorded sha256 only for the file it was recorded for
        st = os.stat(weights)
        if (st.st_size, st.st_mtime_ns) != (source.get("weights_size"), source.get("weights_mtime_ns")):
            sha = None
    sha = sha or fsio.sha256_of(weights)[0]
    return {
        "sha256": sha,
        "step": source.get("step"),
        "fingerprint": source.get("fingerprint"),
        "model": meta.get("model"),
        "tokenizer": meta.get("tokenizer"),
    }


def export_direction(path: str | os.PathLike) -> str:
    """``forward`` or ``backward``: which way the exported model reads text (its run's
    ``data.direction``, recorded in ``source.direction``; forward for an export without it)."""
    direction = export_source(path).get("direction", "forward")
    if direction not in DIRECTIONS:
        raise PipelineError(f"{path}: its source.direction is {direction!r}, not forward or backward")
    return direction


def backward_export(path: str | os.PathLike) -> str | None:
    """``path/backward`` when it holds a valid export of a backward LM (what ``rnnpipe export
    ... --backward`` writes beside the forward one), else None."""
    inner = fsio.join(str(path), BACKWARD)
    if not is_export(inner):
        return None
    try:
        return inner if export_direction(inner) == BACKWARD else None
    except PipelineError:
        return None


def export_config(path: str | os.PathLike) -> dict[str, Any]:
    """An export's ``config.json``, checked before anything is built from it: a JSON object with
    ``model`` (an object), ``vocab_size`` (a positive integer) and ``tokenizer`` (an object).
    PipelineError naming the file and what to do otherwise."""
    file = fsio.join(fsio.absolute(str(path)), CONFIG)
    if not fsio.exists(file):
        raise PipelineError(
            f"{path} is not an rnnpipe export: it has no {CONFIG} (make one with rnnpipe export)"
        )
    meta = _load(file)
    wanted = (("model", dict, "an object"), ("vocab_size", int, "a positive integer"))
    for key, kind, what in (*wanted, ("tokenizer", dict, "an object")):
        value = meta.get(key)
        if key not in meta:
            raise PipelineError(f"{file}: no {key!r} key, so it is not an rnnpipe export's config: {_REDO}")
        if not isinstance(value, kind) or isinstance(value, bool) or (key == "vocab_size" and value < 1):
            raise PipelineError(f"{file}: {key} is {value!r:.60}, not {what}: {_REDO}")
    return meta


# Bytes per element of the safetensors dtypes an export may hold (others are not sized here).
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_HEADER_LIMIT = 100 << 20  # safetensors' own bound on a header's size


def weights_shapes(file: str) -> dict[str, list[int]]:
    """Each tensor's shape in a safetensors file, from its header alone (8 bytes and the JSON
    header: no tensor data is read); PipelineError naming the file when it is not a whole
    safetensors file (a header that does not parse, entries outside the file: truncated)."""
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 2 <= n <= min(_HEADER_LIMIT, size - 8):
                raise PipelineError(f"{file}: not a safetensors file (its header size reads {n}): {_REDO}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise PipelineError(f"{file}: cannot read it ({e.strerror or e}): {_REDO}") from None
    except ValueError as e:
        raise PipelineError(f"{file}: its safetensors header is not valid JSON ({e}): {_REDO}") from None
    if not isinstance(header, dict):
        raise PipelineError(f"{file}: its safetensors header is not a JSON object: {_REDO}")
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        span = entry.get("data_offsets") if isinstance(entry, dict) else None
        ints = [*(shape or []), *(span or [])]
        if (
            shape is None
            or span is None
            or len(span) != 2
            or not all(type(i) is int and i >= 0 for i in ints)
        ):
            raise PipelineError(f"{file}: its header's entry {name!r} is not a tensor's: {_REDO}")
        width = _DTYPE_BYTES.get(entry.get("dtype"))
        if width is not None and math.prod(shape) * width != span[1] - span[0]:
            raise PipelineError(f"{file}: {name}'s shape {shape} and its bytes disagree: {_REDO}")
        shapes[name], end = list(shape), max(end, span[1])
    if 8 + n + end > size:
        raise PipelineError(f"{file}: truncated ({size} bytes, its header describes {8 + n + end}): {_REDO}")
    return shapes


def export_tokenizer(path: str | os.PathLike, meta: dict[str, Any] | None = None) -> Any:
    """The tokenizer an export describes (``meta``: its checked config, read when None), from its
    own files; PipelineError naming the file when it is missing or broken, or when its vocabulary
    is not the model's."""
    from rnnpipe.pipeline.data.tokenizers import tokenizer_from_manifest

    root = fsio.absolute(str(path))
    meta = meta if meta is not None else export_config(path)
    entry = meta["tokenizer"]
    file = fsio.join(root, str(entry.get("model_file") or CONFIG))

    def read(rel: str) -> bytes:  # (tokenizer_from_manifest checks rel is inside the export first)
        try:
            return fsio.read_bytes(fsio.join(root, rel))
        except OSError as e:
            raise PipelineError(
                f"{file}: cannot read the export's tokenizer file ({e.strerror or e}): {_REDO}"
            ) from None

    try:
        tok = tokenizer_from_manifest({"tokenizer": entry}, read)
    except PipelineError as e:
        raise PipelineError(f"{file}: {e}" if not str(e).startswith(file) else str(e)) from None
    except Exception as e:  # a parser's own error on a damaged file: JSON, protobuf, tokenizers
        reason = (str(e).splitlines() or [""])[0][:200]
        raise PipelineError(
            f"{file}: not a valid {entry.get('kind')} tokenizer file ({reason}): {_REDO}"
        ) from None
    if tok.vocab_size != meta["vocab_size"]:
        raise PipelineError(
            f"{file}: a tokenizer of {tok.vocab_size} ids, but {CONFIG}'s vocab_size is "
            f"{meta['vocab_size']}: {_REDO}"
        )
    return tok


def walk(root: Path, rel: str = "") -> Iterator[tuple[str, os.DirEntry]]:
    """Every entry under ``root`` as (relative path, entry), parents first; links not followed."""
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        r = f"{rel}/{e.name}" if rel else e.name
        yield r, e
        if e.is_dir(follow_symlinks=False):
            yield from walk(root, r)


def check_regular(root: Path, what: str) -> None:
    """ConfigError naming the first entry under ``root`` that is not a regular file or directory
    (a symbolic link, a device, a pipe): rnnpipe copies regular files only."""
    for rel, e in walk(root):
        if not (e.is_dir(follow_symlinks=False) or e.is_file(follow_symlinks=False)):
            kind = f"a symbolic link (to {os.readlink(e.path)})" if e.is_symlink() else "not a regular file"
            raise ConfigError(
                f"{what}: {root / rel} is {kind}: an export holds regular files only, and rnnpipe "
                "copies no link; remove it (or put the file it names in its place, if you trust it)"
            )


def copy_export(src: Path, dst: Path) -> None:
    """A copy of the export ``src`` in ``dst``, regular files only (:func:`check_regular`; a file
    opened without following a link, so one that became a link since is refused too), their
    mtimes kept (the recorded sha256 of the weights is trusted by size and mtime). Its ``.py``
    files are code from elsewhere: this rnnpipe's own are written instead. Not its ``backward/``."""
    from rnnpipe.pipeline.models.hf.files import code_files

    check_regular(src, f"--backward {src}")
    dst.mkdir(parents=True)
    for rel, e in walk(src):
        if rel == BACKWARD or rel.startswith(f"{BACKWARD}/") or ("/" not in rel and rel.endswith(".py")):
            continue
        if e.is_dir(follow_symlinks=False):
            (dst / rel).mkdir()
            continue
        try:
            fd = os.open(e.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # (a pipe: no wait)
        except OSError as err:
            if err.errno == errno.ELOOP:
                check_regular(src, f"--backward {src}")
            raise
        with os.fdopen(fd, "rb") as f, open(dst / rel, "wb") as g:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(
                    f"--backward {src}: {src / rel} is not a regular file: rnnpipe copies no other"
                )
            shutil.copyfileobj(f, g, 1 << 22)
        os.utime(dst / rel, ns=(st.st_atime_ns, st.st_mtime_ns))
    for name, data in code_files().items():
        (dst / name).write_bytes(data)
