"""ELMo's backward LM: whether an export can serve as the backward LM of a forward one (no torch).

A sweep checks it before any job starts (when both exports exist), and a job again before it
reads the two (:mod:`rnnpipe.pipeline.finetune.job`).
"""

from __future__ import annotations

from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.models import exported


def _tokenizer_id(export: str) -> tuple[Any, ...]:
    """(kind, vocabulary size, the sha256 of its file or None) of an export's tokenizer."""
    t = exported.export_meta(export).get("tokenizer", {})
    rel = t.get("model_file")
    sha = fsio.sha256_of(fsio.join(fsio.absolute(export), rel))[0] if rel else None
    return t.get("kind"), t.get("vocab_size"), sha


_checked: set[tuple[str, str]] = set()


def check_backward(forward: str, backward: str) -> None:
    """ConfigError unless the export ``backward`` is of a backward LM (where its export records
    a direction) with the forward one's tokenizer (its kind, its vocabulary size and the sha256 of
    its file): ELMo reads one token sequence with both."""
    if (forward, backward) in _checked:
        return
    if exported.export_direction(backward) != "backward":
        raise ConfigError(
            f"pretrained_backward={backward} is an export of a forward LM (its {exported.CONFIG} "
            "records source.direction=forward, or none): name the export of a model pretrained "
            "with data.direction=backward"
        )
    fwd, bwd = _tokenizer_id(forward), _tokenizer_id(backward)
    if fwd != bwd:

        def show(t: tuple[Any, ...]) -> str:
            return f"{t[0]}, {t[1]} ids" + (f", file sha256 {t[2][:12]}" if t[2] else "")

        raise ConfigError(
            f"pretrained_backward={backward}: its tokenizer ({show(bwd)}) is not the forward LM's "
            f"({show(fwd)}, {forward}): pretrain the backward LM on the same dataset, read backward"
        )
    _checked.add((forward, backward))
