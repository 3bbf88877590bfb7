"""The fine-tune stage: a sweep's jobs on an executor (:mod:`rnnpipe.pipeline.finetune.sweep`).

Stage protocol (:mod:`rnnpipe.launch.stages.stage`). Each job's fingerprint covers its config, the exported
weights' sha256 and every task file's sha256 (:mod:`rnnpipe.pipeline.finetune.identity`); the stage's
fingerprint is that of all its jobs. Complete: every job's ``result.json`` records its current
fingerprint; a re-run runs exactly the jobs that are missing or stale, and on Slurm submits only
those array tasks. Jobs fan out to worker processes, one job at a time each (local:
:class:`~rnnpipe.launch.processes.job_processes.JobProcesses`, so a job whose worker is killed
fails alone), one Slurm array task per job through submitit (requeued on preemption or timeout,
resuming from their checkpoint), or one after
another in this process (inline).

One writer per sweep directory: a sweep holds ``<out_dir>/.rnnpipe-finetune.lock``
(:func:`rnnpipe.pipeline.locking.exclusive`, as pretraining holds its run dir) from before it
writes anything to its end; a second ``rnnpipe finetune`` of the directory (or an ``--only`` task
while a sweep runs there) is refused at once, naming the holder.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

from rnnpipe.launch.processes.executors import (
    Executor,
    ExecutorConfig,
    ExecutorKind,
    TasksFailed,
    make_executor,
)
from rnnpipe.launch.processes.job_processes import JobProcesses
from rnnpipe.launch.stages.stage import (
    Decision,
    SlurmContext,
    SlurmShape,
    Submitted,
    Upstream,
    Wiring,
    any_runs,
)
from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import base_config, to_yaml
from rnnpipe.pipeline.config import fingerprint as config_fingerprint
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.finetune.sweep import SweepConfig

NAME = "finetune"
FINETUNE_SIGNAL_S = 90  # Slurm array tasks: USR2 this long before the limit (submitit's default)
SWEEP_LOCK = ".rnnpipe-finetune.lock"  # <out_dir>/: one writer per sweep directory


@dataclass
class FinetuneJob(SweepConfig):
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


Job = FinetuneJob


def stage_config(job: FinetuneJob) -> SweepConfig:
    return base_config(job, SweepConfig)


def sweep_config(job: FinetuneJob) -> SweepConfig:
    """The sweep part of ``job``, its ``out_dir`` made absolute (jobs run from elsewhere)."""
    sweep = stage_config(job)
    sweep.out_dir = fsio.absolute(sweep.out_dir)
    return sweep


# The grids expanded in this process, by (sweep, export, backward export): a command asks for
# the grid of one sweep many times (load, check, plan, fingerprint, collect's plan, the sbatch
# plan), and an 84-job grid takes about a second to expand.
_GRIDS: dict[tuple[str, str, str], list[Any]] = {}


def grid(job: FinetuneJob) -> list[Any]:
    """Every JobConfig of the grid, in grid order, with the export it fine-tunes: ``pretrained``
    itself, or for a pretrain run dir the export the sweep makes of it (``<out_dir>/pretrained``).
    Expanded once per process and sweep (a copy each call: callers may change their jobs)."""
    from rnnpipe.pipeline.finetune.sweep import backward_of, expand, export_of

    sweep = sweep_config(job)
    export = export_of(sweep)
    backward = backward_of(sweep, export) or ""  # (where it is, or none yet: part of the key)
    key = (repr(sweep), export, backward)
    if key not in _GRIDS:
        if len(_GRIDS) > 16:
            _GRIDS.clear()
        _GRIDS[key] = expand(sweep, export, backward)
    return copy.deepcopy(_GRIDS[key])


def wire(ctx: Wiring) -> FinetuneJob | None:
    """The pipeline's sweep, where the pipeline names one: into ``<run_dir>/finetune``, on the
    pretrain stage's export (and the backward LM's, with ``backward_lm``); its grid is expanded
    now, so that a bad grid key names this stage before anything runs."""
    job: FinetuneJob | None = ctx.load(FinetuneJob, NAME)
    if job is None:
        return None
    job.out_dir = ctx.path("finetune")
    job.pretrained = fsio.join(ctx.jobs["pretrain"].run_dir, "export")
    backward = ctx.jobs.get("pretrain-backward")
    if backward is not None:
        job.pretrained_backward = fsio.join(backward.run_dir, "export")
    job.executor.kind = ctx.executor
    try:
        grid(job)
    except ConfigError as e:
        raise ConfigError(f"finetune stage: {e}") from e
    return job


def slurm_shape(job: FinetuneJob, small: Any = None) -> SlurmShape:
    """One array task per job of the grid, with ``executor.slurm``'s resources, requeued after a
    USR2 (to the batch shell, which passes it on) ``FINETUNE_SIGNAL_S`` before the limit."""
    from rnnpipe.pipeline.finetune.sweep import job_label

    return SlurmShape(
        "finetune.sbatch",
        job.executor.slurm,
        signal=f"B:USR2@{FINETUNE_SIGNAL_S}",
        requeue=True,
        array=True,
        tasks=[job_label(j) for j in grid(job)],
    )


def grid_status(job: FinetuneJob) -> tuple[list[Any], list[int], dict[str, str], list[dict[str, Any]]]:
    """(the grid's jobs, the indices of those not complete, why each is not (by out_dir), the
    results of those that are)."""
    from rnnpipe.pipeline.finetune.sweep import pending

    jobs = grid(job)
    done, todo, why = pending(jobs)
    dirs = {j.out_dir for j in todo}
    return jobs, [i for i, j in enumerate(jobs) if j.out_dir in dirs], why, done


def fingerprint(job: FinetuneJob) -> str:
    """The fingerprint of every job of the grid (needs the export)."""
    from rnnpipe.pipeline.finetune.identity import job_identity
    from rnnpipe.pipeline.models.exported import backbone_identity

    jobs = grid(job)
    backbone = backbone_identity(jobs[0].pretrained) if jobs else {}
    return config_fingerprint({j.out_dir: config_fingerprint(job_identity(j, backbone)) for j in jobs})


def is_complete(job: FinetuneJob) -> bool:
    try:
        return not grid_status(job)[1]
    except PipelineError:  # no export yet
        return False


def check(job: FinetuneJob, upstream: Upstream | None = None) -> None:
    """Preflight: every task file exists, the grid expands, the export exists unless pretrain runs
    first, and the Slurm partition exists."""
    for name, task in job.tasks.items():
        for split in ("train", "dev", "test"):
            path = getattr(task, split)
            if path and not fsio.exists(path):
                raise ConfigError(f"tasks.{name}.{split}={path}: no such file")
    grid(job)  # unknown grid keys, duplicate job directories
    if not any_runs(upstream):
        from rnnpipe.pipeline.models.exported import WEIGHTS, export_meta, is_export

        try:
            export_meta(job.pretrained)
        except PipelineError as e:
            raise ConfigError(f"pretrained={job.pretrained}: {e}") from e
        for key in ("pretrained", "pretrained_backward"):
            path = getattr(job, key)
            if path and is_export(path) and fsio.is_local(fsio.absolute(path)):
                _check_weights(key, path, fsio.join(fsio.absolute(path), WEIGHTS))
    if job.executor.kind is ExecutorKind.slurm:
        from rnnpipe.launch.processes.slurm import check_partition

        check_partition(job.executor.slurm.partition, "finetune.executor.slurm.partition")


def _check_weights(key: str, path: str, weights: str) -> None:
    """ConfigError naming ``key`` and the file unless an export's weights are a complete
    safetensors file (its header read and checked against its size: no tensor loaded)."""
    from rnnpipe.pipeline.models.backbone import check_safetensors

    try:
        check_safetensors(weights, "export it again (or copy it again from where it was made)")
    except PipelineError as e:
        raise ConfigError(f"{key}={path}: {e}") from None


def plan(job: FinetuneJob, upstream: Upstream | None = None) -> Decision:
    if any_runs(upstream):
        n = len(grid(job))
        return Decision(True, f"all {n} job(s): the backbone is (re)made first", todo=list(range(n)))
    from rnnpipe.pipeline.finetune.sweep import job_label

    jobs, todo, why, _ = grid_status(job)
    if not todo:
        return Decision(False, f"complete: all {len(jobs)} job(s) match their backbone, files and config")
    details = [f"{job_label(jobs[i])}: {why[jobs[i].out_dir]}" for i in todo]
    return Decision(True, f"{len(todo)} of {len(jobs)} job(s)", todo=todo, details=details)


def _prepared(job: FinetuneJob, write_config: bool = True) -> SweepConfig:
    sweep = sweep_config(job)
    fsio.makedirs(sweep.out_dir)
    if write_config:
        fsio.write_text_atomic(fsio.join(sweep.out_dir, "config.yaml"), to_yaml(job))
    return sweep


def run_sweep(job: FinetuneJob, table: bool = True) -> None:
    """Run every job of the sweep not yet complete; with ``table``, then write and print the table
    of the grid's results. Raises :class:`TasksFailed` (after the table of what did finish) when
    some failed, and PipelineError at once when another process holds the sweep directory."""
    from rnnpipe.pipeline.locking import exclusive

    with exclusive(fsio.absolute(job.out_dir), SWEEP_LOCK, "finetune"):
        _run_sweep(job, table)


def _run_sweep(job: FinetuneJob, table: bool) -> None:
    from rnnpipe.pipeline.finetune.collect import collect
    from rnnpipe.pipeline.finetune.sweep import expand, pending, resolve_pretrained
    from rnnpipe.pipeline.finetune.sweep import run_sweep as run_jobs

    sweep = _prepared(job)
    sweep.pretrained = resolve_pretrained(sweep)  # a pretrain run dir is exported first
    if job.executor.kind is ExecutorKind.local and "OMP_NUM_THREADS" not in os.environ:
        # Each worker process trains one job: share the cores instead of oversubscribing them.
        workers = job.executor.workers or len(os.sched_getaffinity(0))
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))
    failed: TasksFailed | None = None
    results: list[dict[str, Any]] = []
    if job.executor.kind is ExecutorKind.local:
        executor: Executor = JobProcesses(job.executor.workers)
    else:
        executor = make_executor(job.executor, fsio.join(sweep.out_dir, "slurm"), requeue=True)
    with executor:
        try:
            results, skipped = run_jobs(sweep, executor)
            print(f"finetune: {len(results) - skipped} job(s) run, {skipped} already complete")
        except TasksFailed as e:
            failed = e
    if failed is not None:  # the table of those that did finish
        results = pending(expand(sweep, sweep.pretrained))[0]
    for r in results:
        r.setdefault("dir", r["config"]["out_dir"])
    if results and table:
        md, _ = collect(sweep.out_dir, results)
        print(md, end="")
        print(f"results: {fsio.join(sweep.out_dir, 'results.md')}")
    if failed is not None:
        raise failed


def run(job: FinetuneJob, decision: Decision | None = None) -> None:
    """The pipeline's fine-tune stage on this machine (the collect stage writes the table)."""
    run_sweep(job, table=False)


def run_only(job: FinetuneJob, index: int) -> None:
    """Run job ``index`` of the grid in this process (skipped when already complete)."""
    from rnnpipe.launch.processes.slurm import task_setup
    from rnnpipe.pipeline.finetune.identity import status
    from rnnpipe.pipeline.finetune.sweep import LabelledJob, expand, job_label, resolve_pretrained, run_one
    from rnnpipe.pipeline.locking import holder

    task_setup()
    who = holder(fsio.absolute(job.out_dir), SWEEP_LOCK)
    if who is not None:  # (array tasks share the directory with each other, not with a sweep)
        raise PipelineError(
            f"{fsio.absolute(job.out_dir)} is in use by {who}: wait for that sweep to finish (or stop it)"
        )
    sweep = _prepared(job, write_config=False)  # the array's tasks would all write it at once
    jobs = expand(sweep, resolve_pretrained(sweep))
    if not 0 <= index < len(jobs):
        raise PipelineError(f"--only {index}: the grid has {len(jobs)} job(s), numbered 0 to {len(jobs) - 1}")
    name = job_label(jobs[index])
    if status(jobs[index])[0] is not None:
        print(f"finetune: job {index} ({name}) is already complete")
        return
    run_one(LabelledJob(jobs[index], name), lambda n: None)
    print(f"finetune: job {index} ({name}) done: {fsio.join(jobs[index].out_dir, 'result.json')}")


def submit(job: FinetuneJob, decision: Decision, ctx: SlurmContext) -> Submitted:
    """One array of the jobs the decision lists, each task requeueable."""
    from rnnpipe.launch.processes.executors import SlurmExecutor
    from rnnpipe.pipeline.finetune.sweep import LabelledJob, job_label, run_one

    jobs = grid(job)
    items = [LabelledJob(jobs[i], job_label(jobs[i])) for i in decision.todo]
    shape = slurm_shape(job)
    executor = SlurmExecutor(shape.resources, ctx.folder, requeue=shape.requeue, code=ctx.code)
    array = executor.submit(run_one, items, name=NAME, dependency=ctx.after)
    return Submitted(
        array.job_id,
        [str(j.paths.stderr) for j in array.jobs],
        tasks=[", ".join(items[i].label for i in c) for c in array.chunks],
    )
