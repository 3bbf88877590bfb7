"""The stage protocol. Each stage of the pipeline is one module of ``launch/`` with the same small
interface, so that the pipeline is a loop over one list of them (:data:`rnnpipe.launch.chain.workflow.STAGES`:
prepare, pretrain, pretrain-backward, finetune, collect):

    NAME                                    the stage's name: its record entry, Slurm folder, log names
    Job                                     the stage's job: its resolved config, inputs as paths
    wire(ctx: Wiring) -> Job | None         its job in a pipeline: the stage's config with its inputs
                                            and outputs placed in the run dir, from the jobs of the
                                            stages before it; None where the pipeline has no such stage
    check(job, upstream) -> None            preflight, in about a second: raises ConfigError (exit 2)
                                            naming the key or path; ``upstream``: the decisions of
                                            the stages before it ({name: Decision}); where one runs,
                                            this stage's inputs are still to be made
    fingerprint(job) -> str                 what the stage's output would be made from, now
    is_complete(job) -> bool                its output records exactly that fingerprint
    plan(job, upstream) -> Decision         run or skip, and why; refuses (ConfigError) where
                                            running would throw away work it cannot redo cheaply
    run(job, decision) -> None              on this machine
    slurm_shape(job, small) -> SlurmShape   its Slurm job, declared once: what submit asks submitit
                                            for and what ``rnnpipe plan`` gives slurm/pipeline.sh
    submit(job, decision, ctx) -> Submitted on Slurm, after ``ctx.after``, running ``ctx.code``
    stage_in(job, decision) -> None         optional: what a job plain sbatch submits must find
                                            when it starts (pretrain: its config file)

A new stage is one module with these names, added to ``STAGES`` (docs/contributing.md).

A fingerprint is the sha256 of a stage's *identity*: its resolved config without the keys that
cannot change its output (where it lives, how it is run, logged and paced), plus the identities
of its inputs (the dataset's content digest, the exported weights' sha256, each task file's
sha256). Outputs record both, so a mismatch can be explained key by key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rnnpipe.launch.processes.slurm import sbatch_flags
from rnnpipe.pipeline import fsio


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
    code: Any  # the launch.processes.snapshot.Snapshot of the code the jobs run
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


@dataclass
class Wiring:
    """What a stage's ``wire`` gets from the pipeline: where the run lives and what came before.

    ``load(schema, name, extra)`` reads the stage config the pipeline file names for ``name``
    (its overrides, then the command line's ``name.key=value``, then ``extra``), or returns None
    where the pipeline names none; ``jobs`` holds the jobs of the stages before, by name."""

    run_dir: str
    executor: Any  # launch.processes.executors.ExecutorKind: every stage runs on the pipeline's executor
    backward_lm: bool
    jobs: dict[str, Any]
    load: Callable[..., Any]

    def path(self, *parts: str) -> str:
        """A path inside the run dir (``ctx.path("pretrain", "export")``)."""
        return fsio.join(self.run_dir, *parts)


@dataclass
class SlurmShape:
    """A stage's Slurm job, declared once by the stage (``slurm_shape``): the same resources
    whether submitit submits it (``rnnpipe run --executor slurm``) or plain sbatch does
    (``slurm/pipeline.sh``, with the options :meth:`sbatch_options` gives)."""

    script: str  # the slurm/*.sbatch file plain sbatch runs, with the stage's resolved config
    resources: Any  # launch.processes.executors.SlurmConfig: partition, account, cpus, memory, time, setup
    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: int = 0  # 0: as the resources say
    signal: str = ""  # sbatch's --signal ("USR2@90": that long before the time limit)
    requeue: bool = False  # --requeue: a signalled job checkpoints and runs again
    array: bool = False  # one array task per index of the stage's work (the fine-tune grid)
    tasks: list[str] = field(default_factory=list)  # an array's task names, by index
    config_stage: str = ""  # the stage whose resolved config the script takes ("": its own)

    def sbatch_options(self, name: str, logs: str) -> list[str]:
        """sbatch's options for this job (``--job-name=rnnpipe-NAME``, its log in ``logs``)."""
        log = f"{logs}/{name}-%A_%a.out" if self.array else f"{logs}/{name}-%j.out"
        return [
            f"--job-name=rnnpipe-{name}",
            *sbatch_flags(
                self.resources,
                nodes=self.nodes,
                ntasks_per_node=self.ntasks_per_node,
                gpus_per_node=self.gpus_per_node,
                signal=self.signal,
                requeue=self.requeue,
                output=log,
            ),
        ]
