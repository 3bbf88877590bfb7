"""The fine-tune sweep's job config: the sweep plus how its jobs are run (the executor).

Jobs fan out through the executor layer: one process per job on this machine (local), one Slurm
array task per job through submitit (slurm; tasks are requeued on preemption or timeout and resume
from their checkpoint), or one after another in this process (inline).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from launch.executors import ExecutorConfig, ExecutorKind, TasksFailed, make_executor
from pipeline import fsio
from pipeline.config import base_config, to_yaml
from pipeline.errors import PipelineError
from pipeline.finetune.sweep import SweepConfig


@dataclass
class FinetuneJob(SweepConfig):
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


def stage_config(job: FinetuneJob) -> SweepConfig:
    return base_config(job, SweepConfig)


def sweep_config(job: FinetuneJob) -> SweepConfig:
    """The sweep part of ``job``, its ``out_dir`` made absolute (jobs run from elsewhere)."""
    sweep = stage_config(job)
    sweep.out_dir = fsio.absolute(sweep.out_dir)
    return sweep


def _prepared(job: FinetuneJob, write_config: bool = True) -> SweepConfig:
    sweep = sweep_config(job)
    fsio.makedirs(sweep.out_dir)
    if write_config:
        fsio.write_text_atomic(fsio.join(sweep.out_dir, "config.yaml"), to_yaml(job))
    return sweep


def run(job: FinetuneJob, table: bool = True) -> None:
    """Run every job of the sweep not yet complete, then write the table (and print it, with
    ``table``). Raises :class:`TasksFailed` (after the table of what did finish) when some failed."""
    from pipeline.finetune.collect import collect
    from pipeline.finetune.sweep import run_sweep

    sweep = _prepared(job)
    if job.executor.kind is ExecutorKind.local and "OMP_NUM_THREADS" not in os.environ:
        # Each worker process trains one job: share the cores instead of oversubscribing them.
        workers = job.executor.workers or len(os.sched_getaffinity(0))
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))
    failed: TasksFailed | None = None
    with make_executor(job.executor, fsio.join(sweep.out_dir, "slurm"), requeue=True) as executor:
        try:
            results, skipped = run_sweep(sweep, executor)
            print(f"finetune: {len(results) - skipped} job(s) run, {skipped} already complete")
        except TasksFailed as e:
            failed = e
    try:
        md, _ = collect(sweep.out_dir)
        if table:
            print(md, end="")
            print(f"results: {fsio.join(sweep.out_dir, 'results.md')}")
    except PipelineError:
        if failed is None:
            raise
    if failed is not None:
        raise failed


def run_only(job: FinetuneJob, index: int) -> None:
    """Run job ``index`` of the grid in this process (skipped when already complete)."""
    from launch.slurm import task_setup
    from pipeline.finetune.sweep import LabelledJob, expand, job_label, pending, resolve_pretrained, run_one

    task_setup()
    sweep = _prepared(job, write_config=False)  # the array's tasks would all write it at once
    jobs = expand(sweep, resolve_pretrained(sweep))
    if not 0 <= index < len(jobs):
        raise PipelineError(f"--only {index}: the grid has {len(jobs)} job(s), numbered 0 to {len(jobs) - 1}")
    done, _ = pending([jobs[index]])
    name = job_label(jobs[index])
    if done:
        print(f"finetune: job {index} ({name}) is already complete")
        return
    run_one(LabelledJob(jobs[index], name), lambda n: None)
    print(f"finetune: job {index} ({name}) done: {fsio.join(jobs[index].out_dir, 'result.json')}")


def grid_jobs(job: FinetuneJob) -> tuple[list[str], list[int]]:
    """(every job's name in grid order, the indices of those not yet complete)."""
    from pipeline.finetune.sweep import expand, job_label, pending

    sweep = sweep_config(job)
    jobs = expand(sweep, fsio.absolute(sweep.pretrained))
    _, todo = pending(jobs)
    todo_dirs = {j.out_dir for j in todo}
    return [job_label(j) for j in jobs], [i for i, j in enumerate(jobs) if j.out_dir in todo_dirs]
