"""Checkpoints of a run: DeepSpeed's files plus each rank's train state, made visible atomically.

    <run_dir>/checkpoints/step00000500/   DeepSpeed model and optimizer states (any ZeRO stage)
                          rank00000.pt    this rank's TrainState (counters, hidden state, data, RNG)
                          COMPLETE        written last, by rank 0, after every rank finished: JSON
                                          with the step, world size, config, dataset digest,
                                          fingerprint and provenance (the checkpoint's header)
    <run_dir>/checkpoints/latest          the newest complete tag, replaced atomically

A checkpoint killed while being written has no COMPLETE and never becomes ``latest``; the next
save removes it. The last ``keep`` complete checkpoints are kept. Whether a checkpoint may be
resumed under a new config is decided in one place, :func:`check_resume`, from its header alone:
nothing is loaded before that check passes. Finding and checking checkpoints needs no torch (a
preflight stays fast); saving and loading import it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import fsio
from pipeline.config import describe_diff
from pipeline.errors import ConfigError, PipelineError
from pipeline.train.config import resume_changes, run_view

if TYPE_CHECKING:
    from pipeline.train.state import TrainState

COMPLETE = "COMPLETE"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


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


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _barrier() -> None:
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine: Any, run_dir: Path, state: TrainState, header: dict[str, Any], keep: int) -> Path:
    """Save a checkpoint at ``state.step`` on every rank (a collective); returns its directory.
    ``header`` (config, dataset digest, fingerprint, provenance) goes into the COMPLETE marker."""
    root = run_dir / "checkpoints"
    tag = tag_of(state.step)
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": state.step}, save_latest=False)
    dist = _dist()
    rank = dist.get_rank() if dist.is_initialized() else 0
    save_state(root / tag / f"rank{rank:05d}.pt", state.state_dict())
    delay = float(os.environ.get("RNNPIPE_TEST_CHECKPOINT_DELAY", "0"))  # tests: a window to kill in
    if delay:
        time.sleep(delay)
    _barrier()
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        marker = {"step": state.step, "world": world, **header}
        fsio.write_text_atomic(str(root / tag / COMPLETE), json.dumps(marker, indent=1) + "\n")
        fsio.write_text_atomic(str(root / "latest"), tag)
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
    root = Path(run_dir) / "checkpoints"
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


def read_header(path: Path) -> dict[str, Any]:
    """A checkpoint's COMPLETE marker: step, world, config, dataset, fingerprint, provenance."""
    try:
        return json.loads((Path(path) / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{Path(path) / COMPLETE}: unreadable checkpoint marker ({e})") from e


@dataclass
class ResumeCheck:
    """What resuming a checkpoint under a new config changes (``{dotted key: (old, new)}``)."""

    checkpoint: Path
    step: int
    allowed: dict[str, tuple[Any, Any]]

    def describe(self) -> str:
        return describe_diff(self.allowed) if self.allowed else "no config change"


def check_resume(path: Path, cfg: dict[str, Any], dataset: str, world_size: int) -> ResumeCheck:
    """Whether the checkpoint at ``path`` may continue under ``cfg`` (a PretrainConfig as plain
    values) on ``dataset`` (its content digest) with ``world_size`` ranks. Raises
    :class:`ConfigError` listing every key that forbids it, before anything is loaded."""
    header = read_header(path)
    if "config" not in header:
        raise ConfigError(
            f"{path} was written by an older rnnpipe that did not record its config: it cannot be "
            "checked against this one. Use a new run_dir, train.resume=none with a new run_dir, or "
            "overwrite=true to start afresh"
        )
    saved = run_view(header["config"], header.get("dataset", "?"), int(header["world"]))
    refused, allowed = resume_changes(saved, run_view(cfg, dataset, world_size))
    new_steps = cfg["train"]["steps"]
    if new_steps < header["step"]:
        refused["train.steps"] = (header["config"]["train"]["steps"], new_steps)
    if refused:
        why = describe_diff(refused, limit=12)
        if set(refused) == {"train.steps"}:
            what = f"the checkpoint is at step {header['step']}, past train.steps"
        else:
            what = "these change the model, the optimizer's state or the data stream"
        raise ConfigError(
            f"{path} cannot be resumed with this config: {why} ({what}). Ways out: a new run_dir for "
            "the new config, or overwrite=true (pretrain.overwrite=true in a pipeline) to replace this "
            "run: its checkpoints are deleted"
        )
    return ResumeCheck(Path(path), int(header["step"]), allowed)


def load(engine: Any, path: Path, state: TrainState, device: Any) -> dict[str, Any]:
    """Load a checkpoint into ``engine`` and ``state`` (a collective, after :func:`check_resume`);
    returns its header."""
    dist = _dist()
    header = read_header(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if header["world"] != world:  # check_resume refuses this first; the loaders below would hang
        raise PipelineError(f"{path} was written by {header['world']} rank(s); this run has {world}")
    _, client = engine.load_checkpoint(str(path.parent), tag=path.name)
    if client is None:
        raise PipelineError(f"DeepSpeed could not load {path}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    state.load_state_dict(load_state(path / f"rank{rank:05d}.pt"), device)
    if state.step != engine.global_steps:
        raise PipelineError(
            f"{path}: the train state is at step {state.step}, DeepSpeed's at {engine.global_steps}"
        )
    return header
