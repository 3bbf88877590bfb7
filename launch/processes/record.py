"""The run record of a pipeline run dir: ``pipeline.json`` (each stage's job ids, states, logs and
the code its jobs run), whether the last Slurm submission is still going, and the lock that keeps
two ``rnnpipe run`` off one run dir at once. ``rnnpipe status`` and the sbatch plan read it.

    {"executor": "slurm", "submitted": "...", "code": {"path": ..., "digest": ...},
     "stages": {"prepare": {"stage": "prepare", "job_id": "4101", "after": "", "logs": [...]},
                "pretrain": {"stage": "pretrain", "state": "SKIPPED", "detail": "complete: ..."}}}
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.locking import exclusive

STATE_FILE = "pipeline.json"
LOCK_FILE = ".rnnpipe.lock"
# How long a job may be missing from sacct and squeue after its submission before it counts as
# gone: accounting records a new job a moment after sbatch returns.
ACCOUNTING_LAG_S = 120


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def read_state(run_dir: str) -> dict[str, Any]:
    """The run dir's record; a clear error when it has none."""
    path = fsio.join(fsio.absolute(run_dir), STATE_FILE)
    if not fsio.exists(path):
        raise PipelineError(
            f"{run_dir} holds no {STATE_FILE}: not a pipeline run dir (rnnpipe run makes one)"
        )
    return json.loads(fsio.read_text(path))


def write_state(run_dir: str, state: dict[str, Any]) -> None:
    fsio.write_text_atomic(fsio.join(run_dir, STATE_FILE), json.dumps(state, indent=1) + "\n")


def begin(run_dir: str, executor: str, **extra: Any) -> dict[str, Any]:
    """A fresh record for a new run or submission (``extra``: the code snapshot, ...)."""
    state = {"executor": executor, "started": now(), "stages": {}, **extra}
    write_state(run_dir, state)
    return state


def record(run_dir: str, stage: str, entry: dict[str, Any], executor: str = "slurm") -> None:
    """Add or replace ``stage``'s entry in the run's record (also what ``slurm/pipeline.sh`` calls,
    through ``rnnpipe status --record``)."""
    path = fsio.join(run_dir, STATE_FILE)
    state = json.loads(fsio.read_text(path)) if fsio.exists(path) else {}
    if state.get("executor") != executor:
        state = {"executor": executor, "stages": {}}
    state.setdefault("stages", {})[stage] = {"stage": stage, **entry}
    write_state(run_dir, state)


def recently_submitted(entry: dict[str, Any]) -> bool:
    """Submitted so recently that accounting may not know the job yet."""
    return time.time() - entry.get("submitted_at", 0) < ACCOUNTING_LAG_S


def active_jobs(state: dict[str, Any]) -> list[str]:
    """'stage (job N, STATE)' for the recorded Slurm jobs that have not ended."""
    from rnnpipe.launch.processes.slurm import job_states, of_job

    if state.get("executor") != "slurm":
        return []
    entries = [e for e in state.get("stages", {}).values() if e.get("job_id")]
    states = job_states([e["job_id"] for e in entries])
    out = []
    for e in entries:
        mine = of_job(states, e["job_id"])
        live = [s.state for s in mine if not s.ended]
        if not mine and recently_submitted(e):
            live = ["SUBMITTED"]
        if live:
            out.append(f"{e['stage']} (job {e['job_id']}, {live[0]})")
    return out


def refuse_if_busy(run_dir: str) -> None:
    """Stop when jobs of the run dir's last Slurm submission are still pending or running."""
    path = fsio.join(run_dir, STATE_FILE)
    if fsio.exists(path):
        busy = active_jobs(json.loads(fsio.read_text(path)))
        if busy:
            raise PipelineError(
                f"{run_dir}: the last submission is still going: {', '.join(busy)}; "
                "wait for it (rnnpipe status) or scancel it, then run again"
            )


def lock(run_dir: str) -> contextlib.AbstractContextManager[None]:
    """Hold the run dir for this process: a second ``rnnpipe run`` (or plan) on the same run dir
    fails at once, naming the holder, instead of interleaving with this one. An advisory lock on
    ``.rnnpipe.lock`` (released by the kernel if this process dies; :mod:`rnnpipe.pipeline.locking`)."""
    return exclusive(run_dir, LOCK_FILE, "rnnpipe run")
