"""The stage protocol. Each stage of the pipeline is one module of ``launch/`` with the same small
interface, so that the pipeline is a loop over one list of them (:data:`rnnpipe.launch.workflow.STAGES`):

    NAME                                    "prepare" | "pretrain" | "finetune" | "collect"
    Job                                     the stage's job: its resolved config, inputs as paths
    check(job, upstream) -> None            preflight, in about a second: raises ConfigError (exit 2)
                                            naming the key or path; ``upstream``: the decisions of
                                            the stages before it ({name: Decision}); where one runs,
                                            this stage's inputs are still to be made
    fingerprint(job) -> str                 what the stage's output would be made from, now
    is_complete(job) -> bool                its output records exactly that fingerprint
    plan(job, upstream) -> Decision         run or skip, and why; refuses (ConfigError) where
                                            running would throw away work it cannot redo cheaply
    run(job, decision) -> None              on this machine
    submit(job, decision, ctx) -> Submitted on Slurm, after ``ctx.after``, running ``ctx.code``

A fingerprint is the sha256 of a stage's *identity*: its resolved config without the keys that
cannot change its output (where it lives, how it is run, logged and paced), plus the identities
of its inputs (the dataset's content digest, the exported weights' sha256, each task file's
sha256). Outputs record both, so a mismatch can be explained key by key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Decision:
    """What a stage will do on this run of the pipeline, and why."""

    run: bool
    reason: str
    todo: list[int] = field(default_factory=list)  # finetune: grid indices of the jobs to run
    details: list[str] = field(default_factory=list)  # a line per job for --dry-run
    clear: bool = False  # overwrite=true: the stage's old outputs are removed before it runs
    output: str = ""  # the fingerprint its output will record, where known before it runs

    def line(self, name: str) -> str:
        """``pretrain  run   resumes from step 200: train.steps: 200 → 400``."""
        return f"{name:<9} {'run' if self.run else 'skip':<5} {self.reason}"


# The decisions of the stages before a stage, by name, in order.
Upstream = dict[str, Decision]


def any_runs(upstream: Upstream | None) -> bool:
    """Whether a stage before this one runs (so this one's inputs will change)."""
    return any(d.run for d in (upstream or {}).values())


@dataclass
class SlurmContext:
    """Where and after what a stage's Slurm job is submitted, and the code it runs."""

    folder: str  # this submission's folder: submitit's scripts and logs
    after: str  # an sbatch dependency ("afterok:123"), or ""
    code: Any  # the launch.snapshot.Snapshot of the code the jobs run
    small: Any = None  # the SlurmConfig of the pipeline's one-CPU jobs (prepare driver, collect)


@dataclass
class Submitted:
    """A job (or job array) a stage submitted: what the run record keeps of it."""

    job_id: str
    logs: list[str]
    detail: str = ""
    tasks: list[str] = field(default_factory=list)  # an array's task names, in index order

    def entry(self, after: str, submitted_at: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "job_id": self.job_id,
            "after": after,
            "logs": self.logs,
            "submitted_at": submitted_at,
        }
        if self.detail:
            out["detail"] = self.detail
        if self.tasks:
            out["tasks"] = self.tasks
        return out


def short(fp: str | None) -> str:
    """A fingerprint or sha256 for messages: its first 12 hex digits."""
    return (fp or "none")[:12]
