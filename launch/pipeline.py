"""``rnnpipe run PIPELINE.yaml``: the stages chained — prepare → pretrain → finetune → collect.

A pipeline config names each stage's own YAML (the same files ``rnnpipe prepare|pretrain|finetune``
take) with overrides, and one run dir that the pipeline lays out itself:

    <run_dir>/pipeline.yaml      the resolved pipeline config
    <run_dir>/stages/*.yaml      each stage's resolved config: what its jobs run
    <run_dir>/pipeline.json      each stage's job id(s), state and logs (``rnnpipe status``)
    <run_dir>/data/              the dataset (prepare)
    <run_dir>/pretrain/          the pretrain run: checkpoints/, tensorboard/, export/
    <run_dir>/finetune/          the sweep: jobs/, results.md, results.csv
    <run_dir>/slurm/<time>/      submitit's scripts and logs, one folder per submission

``--executor local`` runs the stages one after another on this machine. ``--executor slurm``
submits them as jobs chained with ``afterok`` dependencies and ``--kill-on-invalid-dep`` (a failed
stage cancels the ones after it) and returns: prepare is a small driver job that fans its work out
as job arrays (how many pack tasks there are is only known once encoding has run), pretrain one job
of nodes × tasks through srun, the fine-tune sweep one job array, collect a small job. Re-running
skips stages whose outputs are complete and resumes the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from launch.executors import ExecutorKind, SlurmConfig
from launch.finetune import FinetuneJob
from launch.prepare import PrepareJob
from launch.pretrain import PretrainJob
from pipeline import fsio
from pipeline.config import load_config, to_yaml
from pipeline.errors import ConfigError, PipelineError

STAGES = ("prepare", "pretrain", "finetune")
STATE_FILE = "pipeline.json"


@dataclass
class StageRef:
    config: str = ""  # the stage's YAML, relative to the pipeline file ("" for finetune: no sweep)
    overrides: list[str] = field(default_factory=list)  # key.sub=value, applied after it


def _small_job() -> SlurmConfig:
    return SlurmConfig(cpus_per_task=1, mem_gb=4.0, time_min=24 * 60, poll_s=10.0)


@dataclass
class PipelineConfig:
    run_dir: str = "runs/pipeline"
    executor: ExecutorKind = ExecutorKind.local  # local | slurm (--executor)
    prepare: StageRef = field(default_factory=StageRef)
    pretrain: StageRef = field(default_factory=StageRef)
    finetune: StageRef = field(default_factory=StageRef)
    # The prepare driver and the collect job: one CPU each; the driver lives as long as the arrays.
    slurm: SlurmConfig = field(default_factory=_small_job)

    def validate(self) -> None:
        if self.executor is ExecutorKind.inline:
            raise ConfigError("executor: a pipeline runs on local or slurm, not inline")
        for name in ("prepare", "pretrain"):
            if not getattr(self, name).config:
                raise ConfigError(f"{name}.config: name the {name} stage's YAML file")


@dataclass
class Pipeline:
    """A loaded pipeline: its config and every stage's resolved job config."""

    cfg: PipelineConfig
    run_dir: str
    prepare: PrepareJob
    pretrain: PretrainJob
    finetune: FinetuneJob | None

    def stage_file(self, stage: str) -> str:
        return fsio.join(self.run_dir, "stages", f"{stage}.yaml")


def load(path: str, overrides: list[str], executor: str | None = None) -> Pipeline:
    """The pipeline in ``path`` with overrides. ``stage.key=value`` (``pretrain.train.steps=50``)
    goes to that stage's config; other keys are the pipeline's own (``run_dir=...``)."""
    own: list[str] = []
    routed: dict[str, list[str]] = {s: [] for s in STAGES}
    for item in overrides:
        head, _, rest = item.partition(".")
        if head in STAGES and rest.split("=", 1)[0].split(".")[0] not in ("config", "overrides"):
            routed[head].append(rest)
        else:
            own.append(item)
    if executor:
        own.append(f"executor={executor}")
    cfg = load_config(PipelineConfig, path, own)
    base = os.path.dirname(os.path.abspath(path)) if fsio.is_local(path) else ""
    run_dir = fsio.absolute(cfg.run_dir)

    def stage(schema: type, name: str) -> Any:
        ref: StageRef = getattr(cfg, name)
        file = ref.config if not base or os.path.isabs(ref.config) else os.path.join(base, ref.config)
        try:
            return load_config(schema, file, [*ref.overrides, *routed[name]])
        except ConfigError as e:
            raise ConfigError(f"{name} stage ({file}): {e}") from e

    prepare = stage(PrepareJob, "prepare")
    pretrain = stage(PretrainJob, "pretrain")
    finetune = stage(FinetuneJob, "finetune") if cfg.finetune.config else None
    # The pipeline owns where each stage reads and writes; the stage files' own paths are replaced.
    prepare.output = fsio.join(run_dir, "data")
    prepare.executor.kind = cfg.executor
    pretrain.run_dir = fsio.join(run_dir, "pretrain")
    pretrain.data.path = prepare.output
    pretrain.executor.kind = cfg.executor
    if finetune is not None:
        finetune.out_dir = fsio.join(run_dir, "finetune")
        finetune.pretrained = fsio.join(pretrain.run_dir, "export")
        finetune.executor.kind = cfg.executor
        from launch.finetune import sweep_config
        from pipeline.finetune.sweep import expand

        try:  # the grid's keys are checked when it is expanded: do it now, before any stage runs
            expand(sweep_config(finetune), finetune.pretrained)
        except ConfigError as e:
            raise ConfigError(f"finetune stage ({cfg.finetune.config}): {e}") from e
    return Pipeline(cfg, run_dir, prepare, pretrain, finetune)


def write_stage_files(p: Pipeline) -> None:
    """``pipeline.yaml`` and ``stages/<stage>.yaml``: what the jobs run, and a record of the run."""
    fsio.makedirs(fsio.join(p.run_dir, "stages"))
    fsio.write_text_atomic(fsio.join(p.run_dir, "pipeline.yaml"), to_yaml(p.cfg))
    for name in STAGES:
        job = getattr(p, name)
        if job is not None:
            fsio.write_text_atomic(p.stage_file(name), to_yaml(job))


# ------------------------------------------------------------------------------------ completion


def pretrain_complete(job: PretrainJob) -> bool:
    """The run has trained ``train.steps`` steps, evaluated, and exported its final model."""
    from launch.pretrain import export_dir
    from pipeline.models.pretrained import CONFIG

    meta_path = fsio.join(export_dir(job), CONFIG)
    if not fsio.exists(meta_path):
        return False
    return json.loads(fsio.read_text(meta_path)).get("source", {}).get("step") == job.train.steps


def completeness(p: Pipeline) -> dict[str, Any]:
    """{prepare: bool, pretrain: bool, finetune: [indices of grid jobs still to run]}."""
    from launch.finetune import grid_jobs
    from launch.prepare import is_complete

    todo = grid_jobs(p.finetune)[1] if p.finetune is not None else []
    return {"prepare": is_complete(p.prepare), "pretrain": pretrain_complete(p.pretrain), "finetune": todo}


# ------------------------------------------------------------------------------------- the record


def read_state(run_dir: str) -> dict[str, Any]:
    path = fsio.join(fsio.absolute(run_dir), STATE_FILE)
    if not fsio.exists(path):
        raise PipelineError(
            f"{run_dir} holds no {STATE_FILE}: not a pipeline run dir (rnnpipe run makes one)"
        )
    return json.loads(fsio.read_text(path))


def write_state(run_dir: str, state: dict[str, Any]) -> None:
    fsio.write_text_atomic(fsio.join(run_dir, STATE_FILE), json.dumps(state, indent=1) + "\n")


def record(run_dir: str, stage: str, entry: dict[str, Any], executor: str = "slurm") -> None:
    """Add or replace ``stage``'s entry in the run's record (also what ``slurm/pipeline.sh`` calls,
    through ``rnnpipe status --record``)."""
    path = fsio.join(run_dir, STATE_FILE)
    state = json.loads(fsio.read_text(path)) if fsio.exists(path) else {}
    if state.get("executor") != executor:
        state = {"executor": executor, "stages": {}}
    state.setdefault("stages", {})[stage] = {"stage": stage, **entry}
    write_state(run_dir, state)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


# ------------------------------------------------------------------------------------------ local


def run_local(p: Pipeline) -> int:
    """Every stage, one after another, on this machine; a failed stage stops the ones after it."""
    from launch import finetune, prepare, pretrain

    refuse_if_busy(p.run_dir)
    write_stage_files(p)
    write_state(p.run_dir, {"executor": "local", "started": _now(), "stages": {}})
    done = completeness(p)
    steps: list[tuple[str, Any]] = [
        ("prepare", None if done["prepare"] else lambda: prepare.run(p.prepare)),
        (
            "pretrain",
            None
            if done["pretrain"]
            else lambda: _check_code(
                pretrain.run(p.pretrain, ["pretrain", p.stage_file("pretrain")], export=True)
            ),
        ),
    ]
    if p.finetune is not None:
        ft = p.finetune
        steps.append(("finetune", None if not done["finetune"] else lambda: finetune.run(ft, table=False)))
        steps.append(("collect", lambda: _print_table(ft.out_dir)))
    for i, (stage, fn) in enumerate(steps):
        if fn is None:
            print(f"== {stage}: complete, skipped", flush=True)
            record(p.run_dir, stage, {"state": "SKIPPED", "detail": "complete"}, "local")
            continue
        print(f"== {stage}", flush=True)
        record(p.run_dir, stage, {"state": "RUNNING", "started": _now()}, "local")
        t0 = time.time()
        try:
            fn()
        except (PipelineError, KeyboardInterrupt) as e:
            error = str(e) or type(e).__name__
            record(
                p.run_dir, stage, {"state": "FAILED", "error": error, "seconds": time.time() - t0}, "local"
            )
            for later, _ in steps[i + 1 :]:
                record(p.run_dir, later, {"state": "CANCELLED", "detail": f"{stage} failed"}, "local")
            raise
        record(p.run_dir, stage, {"state": "COMPLETED", "seconds": round(time.time() - t0, 1)}, "local")
    print(f"pipeline complete: {p.run_dir}")
    print(f"watch it: tensorboard --logdir {p.run_dir}")
    return 0


def _print_table(out_dir: str) -> None:
    from pipeline.finetune.collect import collect

    md, _ = collect(out_dir)
    print(md, end="")
    print(f"results: {fsio.join(out_dir, 'results.md')}")


def _check_code(code: int) -> None:
    if code:
        raise PipelineError(
            f"pretrain stopped on a signal (exit status {code}); run the pipeline again to resume"
        )


# ------------------------------------------------------------------------------------------ slurm


def _cli_task(argv: list[str]) -> None:
    """A Slurm job that runs ``rnnpipe ARGV`` (the prepare driver, collect); fails if it fails."""
    from launch.cli import main
    from launch.slurm import task_setup

    task_setup()
    code = main(argv)
    if code:
        raise PipelineError(f"rnnpipe {' '.join(argv)} exited with status {code}")


def _small_executor(p: Pipeline, folder: str, name: str, dependency: str) -> Any:
    from launch.executors import SlurmExecutor
    from launch.slurm import with_dependency

    return with_dependency(SlurmExecutor(p.cfg.slurm, folder).submitit_executor(name), dependency)


# How long a job may be missing from sacct and squeue after its submission before it counts as
# gone: accounting records a new job a moment after sbatch returns.
ACCOUNTING_LAG_S = 120


def recently_submitted(entry: dict[str, Any]) -> bool:
    """Submitted so recently that accounting may not know the job yet."""
    return time.time() - entry.get("submitted_at", 0) < ACCOUNTING_LAG_S


def active_jobs(state: dict[str, Any]) -> list[str]:
    """'stage (job N, STATE)' for the recorded Slurm jobs that have not ended."""
    from launch.slurm import job_states, of_job

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


def begin_submission(p: Pipeline) -> dict[str, Any]:
    """Refuse while the last submission's jobs are still going; write the stage files and a fresh
    record; returns :func:`completeness`."""
    refuse_if_busy(p.run_dir)
    write_stage_files(p)
    done = completeness(p)
    write_state(p.run_dir, {"executor": "slurm", "submitted": _now(), "stages": {}})
    return done


def submit_slurm(p: Pipeline, wait: bool) -> int:
    """Submit the stages not yet complete, chained with afterok; with ``wait``, wait for them."""
    done = begin_submission(p)
    state = read_state(p.run_dir)
    folder = fsio.join(p.run_dir, "slurm", time.strftime("%Y%m%d-%H%M%S"))
    dep = ""

    def add(stage: str, job_id: str, logs: list[str], **extra: Any) -> None:
        nonlocal dep
        entry = {"job_id": job_id, "after": dep, "logs": logs, "submitted_at": time.time(), **extra}
        state["stages"][stage] = {"stage": stage, **entry}
        write_state(p.run_dir, state)  # recorded as it goes: a failure below must leave no unknown job
        print(f"{stage}: Slurm job {job_id}" + (f" ({dep})" if dep else ""))
        dep = f"afterok:{job_id}"

    def skip(stage: str, why: str) -> None:
        state["stages"][stage] = {"stage": stage, "state": "SKIPPED", "detail": why}
        print(f"{stage}: {why}, skipped")

    try:
        _submit_stages(p, done, folder, add, skip, lambda: dep)
    except BaseException as e:
        # A half-submitted chain would wait on nothing or run without its last stages: cancel it.
        ids = [v["job_id"] for v in state["stages"].values() if v.get("job_id")]
        if ids:
            subprocess.run(["scancel", *ids], check=False, capture_output=True)
        why = str(e).strip() or type(e).__name__
        raise PipelineError(
            f"submitting the pipeline failed ({why}); cancelled the jobs already submitted "
            f"({', '.join(ids) or 'none'}); fix the cause and run again"
        ) from e
    write_state(p.run_dir, state)
    submitted = [e for e in state["stages"].values() if e.get("job_id")]
    if not submitted:
        print(f"every stage is complete: {p.run_dir}")
        return 0
    print(f"follow it: rnnpipe status {p.run_dir}")
    print(f"watch it: tensorboard --logdir {p.run_dir}")
    if not wait:
        return 0
    return wait_for(p.run_dir, p.cfg.slurm.poll_s)


def _submit_stages(p: Pipeline, done: dict[str, Any], folder: str, add: Any, skip: Any, dep: Any) -> None:
    """Submit each stage not yet complete; ``add`` records a job, ``dep()`` is the afterok on the
    last one submitted."""
    import submitit

    from launch import pretrain as pretrain_launch
    from launch.executors import SlurmExecutor
    from launch.finetune import sweep_config
    from pipeline.finetune.sweep import LabelledJob, expand, job_label, run_one

    if done["prepare"]:
        skip("prepare", "complete")
    else:
        ex = _small_executor(p, folder, "prepare", dep())
        with submitit.helpers.clean_env():
            job = ex.submit(_cli_task, ["prepare", p.stage_file("prepare")])
        add("prepare", job.job_id, [str(job.paths.stderr)], detail="driver: submits the prepare arrays")
    if done["pretrain"]:
        skip("pretrain", "complete")
    else:
        ex = pretrain_launch.slurm_executor(p.pretrain, fsio.join(folder, "pretrain", "%j"), dep())
        with submitit.helpers.clean_env():
            job = ex.submit(pretrain_launch.slurm_task, pretrain_launch.stage_config(p.pretrain), True)
        d = p.pretrain.distributed
        add(
            "pretrain",
            job.job_id,
            [str(job.paths.stderr)],
            detail=f"{d.nodes} node(s) x {pretrain_launch.tasks_per_node(p.pretrain)} task(s)",
        )
    if p.finetune is not None:
        ft = p.finetune
        if not done["finetune"]:
            skip("finetune", "every job complete")
        else:
            sweep = sweep_config(ft)
            jobs = expand(sweep, sweep.pretrained)
            items = [LabelledJob(jobs[i], job_label(jobs[i])) for i in done["finetune"]]
            executor = SlurmExecutor(ft.executor.slurm, folder, requeue=True)
            array = executor.submit(run_one, items, name="finetune", dependency=dep())
            add(
                "finetune",
                array.job_id,
                [str(j.paths.stderr) for j in array.jobs],
                tasks=[", ".join(items[i].label for i in c) for c in array.chunks],
            )
        if dep() or not fsio.exists(fsio.join(ft.out_dir, "results.md")):
            ex = _small_executor(p, folder, "collect", dep())
            with submitit.helpers.clean_env():
                job = ex.submit(_cli_task, ["collect", ft.out_dir])
            add("collect", job.job_id, [str(job.paths.stderr)])
        else:
            skip("collect", "results.md is up to date")


def wait_for(run_dir: str, poll_s: float) -> int:
    """Wait until every recorded job has ended; print the status; 0 when all completed."""
    from launch.status import show

    while active_jobs(read_state(run_dir)):
        time.sleep(poll_s)
    return show(run_dir, out=sys.stdout)
