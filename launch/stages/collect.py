"""The collect stage: the sweep's results as one table (:mod:`rnnpipe.pipeline.finetune.collect`).

Stage protocol (:mod:`rnnpipe.launch.stages.stage`). Its input is the grid of the fine-tune stage:
exactly those jobs' results, never a leftover of an earlier grid or backbone. The fingerprint is that of every
result it tabulates; ``results.json`` records it. Complete: every job of the grid is complete and
``results.json`` and ``comparison.json`` record their current fingerprints. On Slurm it is a
one-CPU job after the sweep.

After the table it writes and prints the comparison the pipeline exists for: for each task (and
other hyper-parameters, backbone) run both ways, the pretrained model's figure beside the one
from scratch (``comparison.md``, ``comparison.json``; see :func:`comparison`).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from typing import Any

from rnnpipe.launch.stages.finetune import FinetuneJob, grid_status
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
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.finetune import kinds

NAME = "collect"
COMPARISON = "comparison"  # <out_dir>/comparison.md and comparison.json


@dataclass
class CollectJob:
    """The table of a sweep: its out_dir and the sweep (whose grid names the results)."""

    sweep: FinetuneJob


Job = CollectJob


def _out_dir(job: CollectJob) -> str:
    return fsio.absolute(job.sweep.out_dir)


def _results(job: CollectJob) -> list[dict[str, Any]]:
    """The grid's results, each with its ``dir``; raises when a job is not complete."""
    from rnnpipe.pipeline.finetune.sweep import job_label

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
    from rnnpipe.pipeline.finetune.collect import results_fingerprint

    return results_fingerprint(_results(job))


def is_complete(job: CollectJob) -> bool:
    out = _out_dir(job)
    paths = [fsio.join(out, name) for name in ("results.json", f"{COMPARISON}.json")]
    if not all(
        fsio.exists(p) for p in [*paths, fsio.join(out, "results.md"), fsio.join(out, f"{COMPARISON}.md")]
    ):
        return False
    try:
        fp = fingerprint(job)
        return all(json.loads(fsio.read_text(p)).get("fingerprint") == fp for p in paths)
    except (PipelineError, ValueError):
        return False


def _mean_std(values: list[float]) -> str:
    """``73.39 ± 1.02`` over seeds; one value alone."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def comparison(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pretrained against scratch: one row per (task, other hyper-parameters, backbone) that has
    results of both inits, in task order.

    Each row compares one figure, the same for both: the one the task's kind names
    (:attr:`~rnnpipe.pipeline.finetune.kinds.Kind.figure`: a language model's bits per byte), else
    the task's main metric; on test where every result has it, else on dev (SST-2: GLUE's test
    labels are hidden); the mean over seeds. ``gain`` is pretrained minus scratch, signed so that
    positive is better (the kind says which way is: bits, lower); ``pretrained_better`` says
    whether it is above 0. A result of a kind defined outside rnnpipe needs its module
    (``RNNPIPE_PLUGINS``), as its jobs did.
    """
    from rnnpipe.pipeline.finetune.collect import backbone_label

    groups: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        hp = {k: v for k, v in r.get("hparams", {}).items() if k not in ("task", "init", "seed")}
        others = ", ".join(f"{k}={v}" for k, v in sorted(hp.items())) or "—"
        key = (r["task"], others, backbone_label(r))
        groups.setdefault(key, {}).setdefault(r["init"], []).append(r)
    rows = []
    for (task, others, backbone), by_init in sorted(groups.items()):
        if not {"pretrained", "scratch"} <= set(by_init):
            continue
        both = by_init["pretrained"] + by_init["scratch"]
        kind = kinds.get(both[0]["kind"], f"the results of task {task}: ")
        lower = not kind.higher_is_better
        metric, name = kind.figure or (both[0]["metric"], both[0]["metric"])
        split = "test" if all(metric in (r.get("test") or {}) for r in both) else "dev"
        values = {
            init: [float((r.get(split) or {})[metric]) for r in by_init[init]]
            for init in ("pretrained", "scratch")
        }
        gain = statistics.fmean(values["pretrained"]) - statistics.fmean(values["scratch"])
        gain = -gain if lower else gain
        rows.append(
            {
                "task": task,
                "hparams": others,
                "backbone": backbone,
                "figure": f"{split} {name}",
                "lower_is_better": lower,
                "seeds": {init: len(v) for init, v in values.items()},
                "pretrained": values["pretrained"],
                "scratch": values["scratch"],
                "gain": gain,
                "pretrained_better": gain > 0,
            }
        )
    return rows


def comparison_markdown(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table, after a line saying how to read it (which figures
    are better lower: bits/char, and those of the rows' kinds that are)."""
    lower = ["bits/char"]
    lower += sorted({r["figure"].split(" ", 1)[1] for r in rows if r["lower_is_better"]} - set(lower))
    lines = [
        "Pretrained against scratch (the same architecture and fine-tuning; mean over seeds; gain: "
        f"positive is better; {', '.join(lower)}: lower is better):",
        "",
        "| task | hyper-parameters | figure | scratch | pretrained | gain | pretrained better |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['hparams']} | {r['figure']} | {_mean_std(r['scratch'])} | "
            f"{_mean_std(r['pretrained'])} | {r['gain']:+.2f} | {'yes' if r['pretrained_better'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def write_comparison(job: CollectJob, results: list[dict[str, Any]]) -> str:
    """``comparison.md`` and ``comparison.json`` (its rows and the results' fingerprint) in the
    sweep's out_dir; returns the Markdown ("" when no task ran both ways)."""
    from rnnpipe.pipeline.finetune.collect import results_fingerprint

    rows = comparison(results)
    md = comparison_markdown(rows) if rows else ""
    out = _out_dir(job)
    record = {"fingerprint": results_fingerprint(results), "rows": rows}
    fsio.write_text_atomic(fsio.join(out, f"{COMPARISON}.json"), json.dumps(record, indent=1) + "\n")
    fsio.write_text_atomic(fsio.join(out, f"{COMPARISON}.md"), md)
    return md


def wire(ctx: Wiring) -> CollectJob | None:
    """The table of the pipeline's sweep, where it has one."""
    sweep = ctx.jobs.get("finetune")
    return None if sweep is None else CollectJob(sweep)


def slurm_shape(job: CollectJob, small: Any) -> SlurmShape:
    """A one-task job with the pipeline's ``slurm`` resources (``small``), reading the fine-tune
    stage's config."""
    return SlurmShape("collect.sbatch", small, config_stage="finetune")


def check(job: CollectJob, upstream: Upstream | None = None) -> None:
    """Nothing of its own: its inputs are the fine-tune stage's."""


def plan(job: CollectJob, upstream: Upstream | None = None) -> Decision:
    if any_runs(upstream):
        return Decision(True, "after the fine-tune jobs")
    if is_complete(job):
        return Decision(False, "complete: results.md is the table of the grid's current results")
    return Decision(True, "the table is missing or older than the results")


def run(job: CollectJob, decision: Decision | None = None) -> str:
    """Write and print the table, then the comparison; returns the table."""
    from rnnpipe.pipeline.finetune.collect import collect

    results = _results(job)
    md, _ = collect(_out_dir(job), results)
    print(md, end="")
    print(f"results: {fsio.join(_out_dir(job), 'results.md')}")
    compared = write_comparison(job, results)
    if compared:
        print("\n" + compared, end="")
    return md


def show(job: CollectJob) -> None:
    """Print the table and the comparison as they are."""
    path = fsio.join(_out_dir(job), "results.md")
    print(fsio.read_text(path), end="")
    print(f"results: {path}")
    compared = fsio.join(_out_dir(job), f"{COMPARISON}.md")
    if fsio.exists(compared) and fsio.read_text(compared):
        print("\n" + fsio.read_text(compared), end="")


def slurm_task(job: CollectJob) -> None:
    """The Slurm job: the table (its log shows it)."""
    from rnnpipe.launch.processes.slurm import task_setup

    task_setup()
    run(job)


def submit(job: CollectJob, decision: Decision, ctx: SlurmContext) -> Submitted:
    """A one-CPU job with the pipeline's ``slurm`` resources (``ctx.small``)."""
    from rnnpipe.launch.processes.executors import SlurmExecutor

    executor = SlurmExecutor(slurm_shape(job, ctx.small).resources, ctx.folder, code=ctx.code)
    sjob = executor.submit_job(slurm_task, job, name=NAME, dependency=ctx.after)
    return Submitted(sjob.job_id, [str(sjob.paths.stderr)])
