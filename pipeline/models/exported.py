"""What an export directory is, without loading it (no torch): its file names and its identity.

An ``rnnpipe export`` directory holds ``model.safetensors`` (fp32 weights), ``config.json`` (the
model config, the vocabulary, the tokenizer's description and ``source``: where the weights came
from, including their sha256) and ``tokenizer/``. :mod:`pipeline.models.pretrained` loads one.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pipeline import fsio
from pipeline.errors import PipelineError

WEIGHTS, CONFIG = "model.safetensors", "config.json"
BACKWARD = "backward"  # the backward LM's export inside a forward one
DIRECTIONS = ("forward", "backward")


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an rnnpipe export (its config.json has model, source and tokenizer):
    a Hugging Face model directory has a config.json too."""
    try:
        meta = json.loads(fsio.read_text(fsio.join(fsio.absolute(str(path)), CONFIG)))
    except (OSError, ValueError, PipelineError):
        return False
    return isinstance(meta, dict) and "model" in meta and "source" in meta and "tokenizer" in meta


def export_meta(path: str) -> dict[str, Any]:
    """An export's ``config.json``; a clear error when ``path`` is not an export."""
    file = fsio.join(fsio.absolute(path), CONFIG)
    if not fsio.exists(file):
        raise PipelineError(
            f"{path} is not an rnnpipe export: it has no {CONFIG} (make one with rnnpipe export)"
        )
    try:
        return json.loads(fsio.read_text(file))
    except ValueError as e:
        raise PipelineError(f"{file}: not valid JSON ({e})") from e


def backbone_identity(path: str) -> dict[str, Any]:
    """What an export is, for everything made from it: the sha256 of its weights (recorded at
    export, and computed again when the file's size or mtime is not the recorded one), the step and
    fingerprint of the run it came from, and the model and tokenizer it declares."""
    meta = export_meta(path)
    source = meta.get("source", {})
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
    meta = export_meta(str(path))
    direction = (meta.get("source") or {}).get("direction", "forward")
    if direction not in DIRECTIONS:
        raise PipelineError(f"{path}: {CONFIG} says source.direction={direction!r}, not forward or backward")
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
