"""Checkpoints of a run: DeepSpeed's files plus each rank's own state, made visible atomically.

    <run_dir>/checkpoints/step00000500/   DeepSpeed model and optimizer states (any ZeRO stage)
                          rank00000.pt    this rank's data position, hidden state and RNG states
                          COMPLETE        written last, by rank 0, after every rank finished
    <run_dir>/checkpoints/latest          the newest complete tag, replaced atomically

A checkpoint killed while being written has no COMPLETE and never becomes ``latest``; the next
save removes it. The last ``keep`` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import PipelineError

COMPLETE = "COMPLETE"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(
    engine: Any, run_dir: Path, step: int, client: dict[str, Any], rank_state: dict[str, Any], keep: int
) -> Path:
    """Save a checkpoint at ``step`` on every rank (a collective); returns its directory."""
    root = run_dir / "checkpoints"
    tag = tag_of(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = root / tag / f"rank{rank:05d}.pt"
    torch.save(rank_state, str(path) + ".partial")
    os.replace(str(path) + ".partial", path)
    delay = float(os.environ.get("RNNPIPE_TEST_CHECKPOINT_DELAY", "0"))  # tests: a window to kill in
    if delay:
        time.sleep(delay)
    _barrier()
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        (root / tag / COMPLETE).write_text(json.dumps({"step": step, "world": world}))
        tmp = root / "latest.partial"
        tmp.write_text(tag)
        os.replace(tmp, root / "latest")
        _prune(root, keep, tag)
    _barrier()
    return root / tag


def _prune(root: Path, keep: int, current: str) -> None:
    complete = sorted(p for p in root.glob("step*") if (p / COMPLETE).exists())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob("step*"):  # killed while being written
        if partial.name != current and not (partial / COMPLETE).exists():
            shutil.rmtree(partial, ignore_errors=True)


def find_latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = run_dir / "checkpoints"
    latest = root / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if (root / tag / COMPLETE).exists():
            return root / tag
    complete = sorted(p for p in root.glob("step*") if (p / COMPLETE).exists())
    return complete[-1] if complete else None


def resolve(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint ``train.resume`` asks for: auto (latest, if any), none, or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_latest(run_dir)
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run directory
        found = find_latest(path)
        if found is None:
            raise PipelineError(f"train.resume={resume}: that run has no complete checkpoint")
        return found
    if not (path / COMPLETE).exists():
        raise PipelineError(f"train.resume={resume} is not a complete checkpoint (no {COMPLETE} marker)")
    return path


def load(engine: Any, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a checkpoint into ``engine`` (a collective); returns (client state, this rank's state)."""
    marker = json.loads((path / COMPLETE).read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if marker["world"] != world:
        raise PipelineError(
            f"{path} was written by {marker['world']} rank(s); this run has {world}. Resume with the same "
            "number of processes (the optimizer states are partitioned per rank, and stream mode keeps "
            "each stream's hidden state on its rank)."
        )
    _, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    if client is None:
        raise PipelineError(f"DeepSpeed could not load {path}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_state = torch.load(path / f"rank{rank:05d}.pt", weights_only=False)
    return client, rank_state
