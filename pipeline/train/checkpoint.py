"""Checkpoints of a run: DeepSpeed's files plus each rank's train state, made visible atomically.

    <run_dir>/checkpoints/step00000500/   DeepSpeed model and optimizer states (any ZeRO stage)
                          rank00000.pt    this rank's TrainState (counters, hidden state, data, RNG)
                          COMPLETE        written last, by rank 0, after every rank finished: JSON
                                          with the step, world size, config, dataset digest,
                                          fingerprint and provenance (the checkpoint's header)
    <run_dir>/checkpoints/latest          the newest complete tag, replaced atomically

A checkpoint killed while being written has no COMPLETE (and an unreadable COMPLETE counts as none)
and never becomes ``latest``; the next save removes it. A save that fails (a full disk) removes
its partial directory and raises :class:`CheckpointError` on every rank: one line naming the file
that could not be written, why in plain words (torch's "unexpected pos" is a write cut short),
the space left on that disk, the last complete checkpoint and what to do. The last ``keep``
complete checkpoints are kept, and past them the newest one saved before a loss spike
(:mod:`rnnpipe.pipeline.train.divergence`): the last good one if the run diverges.

Trust: DeepSpeed's files are pickles, loaded with ``torch.load(weights_only=False)`` by DeepSpeed
itself; a checkpoint directory is code. Load only checkpoints you or your colleagues wrote.

Whether a checkpoint may be resumed under a new config is decided in one place,
:func:`check_resume`, from its header alone: nothing is loaded before that check passes. Finding
and checking checkpoints needs no torch (a preflight stays fast); saving and loading import it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import describe_diff
from rnnpipe.pipeline.engine.statefile import load_state, save_state
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.train.config import resume_changes, run_view

if TYPE_CHECKING:
    from rnnpipe.pipeline.engine.state import TrainState

log = logging.getLogger("rnnpipe.train")
COMPLETE = "COMPLETE"
RUN_LOCK = ".rnnpipe-pretrain.lock"  # held by rank 0 while a run trains (pipeline.locking)


class CheckpointError(PipelineError):
    """A checkpoint could not be written; the run stops (nothing partial is left looking complete)."""


_SPACE = {errno.ENOSPC, errno.EDQUOT}
_ACCESS = {errno.EACCES, errno.EPERM, errno.EROFS}
# torch.save's zip writer (DeepSpeed saves to a path: torch's C++ stream writes it) reports a write
# cut short by a full disk without the errno: "[enforce fail at inline_container.cc:672] .
# unexpected pos 96000 vs 95892", "basic_ios::clear: iostream error" (a small file, at its close),
# or "file write failed" (other torch versions).
_SHORT_WRITE = re.compile(r"unexpected pos|file write failed|failed writing file|iostream error")


def _free(path: Path) -> str:
    """The space left on the filesystem holding ``path`` (or its nearest existing parent), as text."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    return f"{free / 2**30:.1f} GiB free there" if free >= 2**30 else f"{free / 2**20:.1f} MiB free there"


def write_failure(path: Path, exc: BaseException) -> tuple[str, str]:
    """(one line: the file ``path`` that could not be written, why, and the space left on its disk;
    what to do first) for ``exc``, the error a checkpoint write raised."""
    code = getattr(exc, "errno", None)
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    space = f"({_free(path)})"
    if code in _SPACE:
        return f"{path}: {os.strerror(code).lower()} {space}", "free space on that disk"
    if code == errno.EFBIG:
        return (
            f"{path}: file too large for a file-size limit {space}",
            "raise the file-size limit (ulimit -f)",
        )
    if code in _ACCESS:
        return f"{path}: {os.strerror(code).lower()}", f"make {path.parent} writable"
    if _SHORT_WRITE.search(first):
        return (
            f"{path}: the write stopped short, as on a full disk, over a quota or past a file-size "
            f"limit (torch: {first.split('] ')[-1].strip(' .')}) {space}",
            "free space on that disk",
        )
    return f"{path}: {type(exc).__name__}: {first} {space}", "check that disk"


def tag_of(step: int) -> str:
    return f"step{step:08d}"


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _barrier() -> None:
    dist = _dist()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _agree(ok: bool, device: Any) -> bool:
    """True only if ``ok`` on every rank (a collective: every rank must call it)."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return ok
    import torch

    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def save(engine: Any, run_dir: Path, state: TrainState, header: dict[str, Any], keep: int) -> Path:
    """Save a checkpoint at ``state.step`` on every rank (a collective); returns its directory.
    ``header`` (config, dataset digest, fingerprint, provenance, ``diverging_since``) goes into the
    COMPLETE marker. Raises :class:`CheckpointError` on every rank if any rank's part failed."""
    root = run_dir / "checkpoints"
    tag = tag_of(state.step)
    dist = _dist()
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = getattr(engine, "device", "cpu")
    failed: list[tuple[Path, BaseException]] = []  # (the file, its error), first first
    writer = engine.checkpoint_engine
    write = writer.save

    def guarded(state_dict: Any, path: str) -> None:
        # A failed write (ENOSPC on one rank only, say) must not leave DeepSpeed's own collectives
        # (its closing barrier) waiting for this rank: note it, go on, and agree below.
        try:
            write(state_dict, path)
        except Exception as e:
            failed.append((Path(path), e))

    own = "save" in vars(writer)
    writer.save = guarded
    # Rank 0 also copies DeepSpeed's recovery script (ZeRO >= 1) with a plain file copy: guarded too.
    copy_script = getattr(engine, "_copy_recovery_script", None)
    if copy_script is not None:

        def guarded_copy(*args: Any, **kwargs: Any) -> None:
            try:
                copy_script(*args, **kwargs)
            except Exception as e:
                failed.append((root / "zero_to_fp32.py", e))

        engine._copy_recovery_script = guarded_copy
    writing = root / tag  # what an error raised below was writing
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"step": state.step}, save_latest=False)
        if not failed:
            writing = root / tag / f"rank{rank:05d}.pt"
            save_state(writing, state.state_dict())
        delay = float(os.environ.get("RNNPIPE_TEST_CHECKPOINT_DELAY", "0"))  # tests: a window to kill in
        if delay:
            time.sleep(delay)
    except Exception as e:  # ENOSPC, EFBIG, EIO, a quota: all end the same way
        failed.append((writing, e))
    finally:
        if own:
            writer.save = write
        else:
            del writer.save  # DeepSpeed's own method again
        if copy_script is not None:
            del engine._copy_recovery_script
    reason = ("", "")
    if failed:
        reason = write_failure(*failed[0])
    ok = _agree(not failed, device)
    if ok and rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        marker = {"step": state.step, "world": world, **header}
        target = root / tag / COMPLETE
        try:
            fsio.write_text_atomic(str(target), json.dumps(marker, indent=1) + "\n")
            target = root / "latest"
            fsio.write_text_atomic(str(target), tag)
        except Exception as e:
            reason = write_failure(target, e)
            (root / tag / COMPLETE).unlink(missing_ok=True)
    ok = _agree(ok and not reason[0], device)
    if not ok:
        if rank == 0:
            shutil.rmtree(root / tag, ignore_errors=True)  # frees the space; nothing half-written stays
        raise CheckpointError(_not_written(state.step, rank, reason, find_latest(run_dir)))
    if rank == 0:
        _prune(root, keep, tag)
    _barrier()
    return root / tag


def _not_written(step: int, rank: int, reason: tuple[str, str], last: Path | None) -> str:
    """The one line a failed save raises with: what failed on which rank (``reason``:
    :func:`write_failure`'s, or empty where another rank failed), the last complete checkpoint,
    and what to do."""
    what, todo = reason
    todo = todo or "see that rank's message"
    who = f"rank {rank} could not write {what}" if what else "another rank could not write its part"
    return (
        f"checkpoint at step {step} not written: {who}; "
        + (f"the last complete one is {last}" if last else "no complete checkpoint exists")
        + f". {todo[0].upper()}{todo[1:]} and run the same command again "
        + ("to resume from it" if last else "(it starts again from step 0)")
        + ", or start over in another run_dir"
    )


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a complete checkpoint: its COMPLETE marker reads as a header."""
    try:
        header = json.loads((Path(path) / COMPLETE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(header, dict) and isinstance(header.get("step"), int) and "world" in header


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step*") if is_complete(p))


def last_good(root: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint saved before the current loss spike (or the newest of all
    when there is none), and the complete ones after it that may already hold diverged weights.
    A spike at step k condemns the checkpoint of step k - 1 as well: step k's loss was computed
    with its weights."""
    complete = _complete(root)
    suspect: list[Path] = []
    since = None
    while complete and read_header(complete[-1]).get("diverging_since") is not None:
        since = read_header(complete[-1])["diverging_since"]
        suspect.insert(0, complete.pop())
    while since is not None and complete and read_header(complete[-1])["step"] >= since - 1:
        suspect.insert(0, complete.pop())
    return (complete[-1] if complete else None), suspect


def _prune(root: Path, keep: int, current: str) -> None:
    complete = _complete(root)
    good, _ = last_good(root)
    for old in complete[:-keep]:
        if old != good:  # kept past `keep` while later ones may have diverged
            shutil.rmtree(old, ignore_errors=True)
    for partial in root.glob("step*"):  # killed while being written
        if partial.name != current and not is_complete(partial):
            shutil.rmtree(partial, ignore_errors=True)


def find_latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    latest = root / "latest"
    try:
        tag = latest.read_text().strip()
    except OSError:
        tag = ""
    if tag and is_complete(root / tag):
        return root / tag
    complete = _complete(root)
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
    if not is_complete(path):
        raise PipelineError(
            f"train.resume={resume} is not a complete checkpoint (no readable {COMPLETE} marker)"
        )
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
    saved_world: int = 1  # the ranks that wrote it
    saved_batch: int = 1  # their data.batch_size

    def describe(self) -> str:
        return describe_diff(self.allowed) if self.allowed else "no config change"


def check_resume(
    path: Path, cfg: dict[str, Any], dataset: str, world_size: int, backbone: str = ""
) -> ResumeCheck:
    """Whether the checkpoint at ``path`` may continue under ``cfg`` (a PretrainConfig as plain
    values) on ``dataset`` (its content digest) with ``world_size`` ranks (and a huggingface-kind
    model's ``backbone``, its content digest). Raises
    :class:`ConfigError` listing every key that forbids it, before anything is loaded."""
    header = read_header(path)
    if "config" not in header:
        raise ConfigError(
            f"{path} was written by an older rnnpipe that did not record its config: it cannot be "
            "checked against this one. Use a new run_dir, train.resume=none with a new run_dir, or "
            "overwrite=true to start afresh"
        )
    saved_backbone = (header.get("hf_backbone") or {}).get("source", {}).get("sha256", "")
    saved = run_view(header["config"], header.get("dataset", "?"), int(header["world"]), saved_backbone)
    refused, allowed = resume_changes(saved, run_view(cfg, dataset, world_size, backbone))
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
    return ResumeCheck(
        Path(path),
        int(header["step"]),
        allowed,
        int(header["world"]),
        int(header["config"]["data"]["batch_size"]),
    )


def load(
    engine: Any, path: Path, state: TrainState, device: Any, plan: Any, layer_kinds: list[str]
) -> dict[str, Any]:
    """Load a checkpoint into ``engine`` and ``state`` (a collective, after :func:`check_resume`);
    returns its header. ``plan``: :func:`rnnpipe.pipeline.train.elastic.plan`'s, how DeepSpeed loads it.
    Written by another number of ranks or with another data.batch_size, every old rank's train
    state is re-mapped onto this run's
    (:func:`rnnpipe.pipeline.train.elastic.resume_state`; ``layer_kinds`` say where each hidden state's
    batch dimension is) and the log says how."""
    from rnnpipe.pipeline.train import elastic  # (elastic builds on this module)

    dist = _dist()
    header = read_header(path)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    elastic.load_engine(engine, plan)
    saved_batch = int(header["config"]["data"]["batch_size"])
    if header["world"] == world and saved_batch == state.loader.batch:
        state.load_state_dict(load_state(path / f"rank{rank:05d}.pt"), device)
    else:  # the streams (or windows) are cut for another world size or batch: re-map them
        mine, message = elastic.resume_state(
            path, header["world"], saved_batch, rank, state.loader, layer_kinds
        )
        state.load_state_dict(mine, device)
        if rank == 0:
            log.warning("%s", message)
    if state.step != engine.global_steps:
        raise PipelineError(
            f"{path}: the train state is at step {state.step}, DeepSpeed's at {engine.global_steps}"
        )
    return header
