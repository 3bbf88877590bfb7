"""What an export directory is, without loading it (no torch): its file names and its identity.

An ``rnnpipe export`` directory holds ``model.safetensors`` (fp32 weights), ``config.json`` (what
any Python with ``transformers`` reads: the model config, the vocabulary, the tokenizer's
description; no absolute path, host name or process id, so the directory can go anywhere),
``rnnpipe.json`` (rnnpipe's header: ``source``, where the weights came from, including their
sha256, and ``model``, the model config as the run had it, paths included), ``README.md`` (the
model card) and ``tokenizer/``. :mod:`rnnpipe.pipeline.models.pretrained` writes and loads one.

Exports written before the header kept ``source`` inside ``config.json``: they are read as before.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.errors import PipelineError

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


def _load(file: str) -> dict[str, Any]:
    try:
        value = json.loads(fsio.read_text(file))
    except ValueError as e:
        raise PipelineError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise PipelineError(f"{file}: not a JSON object")
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
