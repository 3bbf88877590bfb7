"""State files: a run's or a job's small state (counters, data positions, RNG states, early
stopping), written atomically and read without running code. Pretrain's per-rank checkpoint files
and fine-tune's ``checkpoint.pt`` are both state files.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.errors import PipelineError


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a state dict (plain values and tensors) atomically, readable with ``weights_only``."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    fsio.write_bytes_atomic(str(path), buf.getvalue())


def load_state(path: str | Path, device: Any = "cpu") -> dict[str, Any]:
    """Read what :func:`save_state` wrote. ``weights_only``: a state file holds numbers, strings,
    lists, dicts and tensors, never code, so a crafted file cannot run anything."""
    import torch

    try:
        return torch.load(io.BytesIO(fsio.read_bytes(str(path))), map_location=device, weights_only=True)
    except Exception as e:  # the unpickler raises many kinds; all mean the same here
        raise PipelineError(f"{path}: not a readable rnnpipe state file ({type(e).__name__}: {e})") from e
