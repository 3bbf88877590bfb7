"""What an export directory is, without loading it (no torch): its file names and its identity.

An ``rnnpipe export`` directory holds ``model.safetensors`` (fp32 weights), ``config.json`` (the
model config, the vocabulary, the tokenizer's description and ``source``: where the weights came
from, including their sha256) and ``tokenizer/``. :mod:`pipeline.models.pretrained` loads one.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import fsio
from pipeline.errors import PipelineError

WEIGHTS, CONFIG = "model.safetensors", "config.json"


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
    export; computed for exports that did not record it), the step and fingerprint of the run it
    came from, and the model and tokenizer it declares."""
    meta = export_meta(path)
    source = meta.get("source", {})
    sha = source.get("weights_sha256") or fsio.sha256_of(fsio.join(fsio.absolute(path), WEIGHTS))[0]
    return {
        "sha256": sha,
        "step": source.get("step"),
        "fingerprint": source.get("fingerprint"),
        "model": meta.get("model"),
        "tokenizer": meta.get("tokenizer"),
    }
