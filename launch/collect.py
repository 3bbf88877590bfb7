"""The collect stage: the sweep's results as one table (:mod:`pipeline.finetune.collect`).

Stage protocol (:mod:`launch.stage`). Its input is the grid of the fine-tune stage: exactly those
jobs' results, never a leftover of an earlier grid or backbone. The fingerprint is that of every
result it tabulates; ``results.json`` records it. Complete: every job of the grid is complete and
``results.json`` records their current fingerprints. On Slurm it is a one-CPU job after the sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launch.finetune import FinetuneJob, grid_status
from launch.stage import Decision, SlurmContext, Submitted, Upstream, any_runs
from pipeline import fsio
from pipeline.errors import PipelineError

NAME = "collect"


@dataclass
class CollectJob:
    """The table of a sweep: its out_dir and the sweep (whose grid names the results)."""

    sweep: FinetuneJob


Job = CollectJob


def _out_dir(job: CollectJob) -> str:
    return fsio.absolute(job.sweep.out_dir)


def _results(job: CollectJob) -> list[dict[str, Any]]:
    """The grid's results, each with its ``dir``; raises when a job is not complete."""
    from pipeline.finetune.sweep import job_label

    jobs, todo, why, done = grid_status(job.sweep)
    if todo:
        first = job_label(jobs[todo[0]])
        reason = next(iter(why.values()))
        raise PipelineError(
            f"collect: {len(todo)} job(s) of the sweep are not complete (the first, {first}: {reason})"
        )
    for r in done:
        r.setdefault("dir", r["config"]["out_dir"])
    return done


def fingerprint(job: CollectJob) -> str:
    from pipeline.finetune.collect import results_fingerprint

    return results_fingerprint(_results(job))


def is_complete(job: CollectJob) -> bool:
    import json

    path = fsio.join(_out_dir(job), "results.json")
    if not fsio.exists(path) or not fsio.exists(fsio.join(_out_dir(job), "results.md")):
        return False
    try:
        return json.loads(fsio.read_text(path)).get("fingerprint") == fingerprint(job)
    except (PipelineError, ValueError):
        return False


def check(job: CollectJob, upstream: Upstream | None = None) -> None:
    """Nothing of its own: its inputs are the fine-tune stage's."""


def plan(job: CollectJob, upstream: Upstream | None = None) -> Decision:
    if any_runs(upstream):
        return Decision(True, "after the fine-tune jobs")
    if is_complete(job):
        return Decision(False, "complete: results.md is the table of the grid's current results")
    return Decision(True, "the table is missing or older than the results")


def run(job: CollectJob, decision: Decision | None = None) -> str:
    """Write and print the table; returns it."""
    from pipeline.finetune.collect import collect

    md, _ = collect(_out_dir(job), _results(job))
    print(md, end="")
    print(f"results: {fsio.join(_out_dir(job), 'results.md')}")
    return md


def show(job: CollectJob) -> None:
    """Print the table as it is."""
    path = fsio.join(_out_dir(job), "results.md")
    print(fsio.read_text(path), end="")
    print(f"results: {path}")


def slurm_task(job: CollectJob) -> None:
    """The Slurm job: the table (its log shows it)."""
    from launch.slurm import task_setup

    task_setup()
    run(job)


def submit(job: CollectJob, decision: Decision, ctx: SlurmContext) -> Submitted:
    """A one-CPU job with the pipeline's ``slurm`` resources (``ctx.small``)."""
    from launch.executors import SlurmExecutor

    executor = SlurmExecutor(ctx.small, ctx.folder, code=ctx.code)
    sjob = executor.submit_job(slurm_task, job, name=NAME, dependency=ctx.after)
    return Submitted(sjob.job_id, [str(sjob.paths.stderr)])
