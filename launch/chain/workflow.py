"""``rnnpipe run PIPELINE.yaml``: the stages chained — prepare → pretrain [→ pretrain-backward] →
finetune → collect.

A pipeline config names each stage's own YAML (the files ``rnnpipe prepare|pretrain|finetune`` take)
with overrides, and one run dir that the pipeline lays out itself:

    <run_dir>/pipeline.yaml      the resolved pipeline config
    <run_dir>/stages/*.yaml      each stage's resolved config
    <run_dir>/pipeline.json      the run record: each stage's job id(s), state, logs (launch.processes.record)
    <run_dir>/data/              the dataset (prepare)
    <run_dir>/pretrain/          the pretrain run: checkpoints/, tensorboard/, export/
    <run_dir>/pretrain-backward/ with backward_lm: true, the backward LM's run (ELMo)
    <run_dir>/finetune/          the sweep: jobs/, results.md, results.csv, results.json
    <run_dir>/slurm/<time>/      one folder per submission: the code snapshot, submitit's scripts and logs

The pipeline is a loop over :data:`STAGES`, modules with one interface (:mod:`rnnpipe.launch.stages.stage`).
Before anything runs or is submitted every stage is checked and planned: a stage runs when its
output does not record the fingerprint it would have now, and so does every stage after one that
runs. ``--dry-run`` prints that plan and stops, like ``make -n``. ``--executor local`` runs the
stages one after another on this machine (each planned again once those before it are done);
``--executor slurm`` submits the ones to run as jobs chained with ``afterok`` and
``--kill-on-invalid-dep`` (a failed stage cancels the ones after it), all running a snapshot of the
code as it was at submission, and returns.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from rnnpipe.launch.processes import record
from rnnpipe.launch.processes.executors import ExecutorKind, SlurmConfig
from rnnpipe.launch.stages import collect, finetune, prepare, pretrain, pretrain_backward
from rnnpipe.launch.stages.stage import Decision, SlurmContext, Wiring
from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import load_config, to_yaml
from rnnpipe.pipeline.errors import ConfigError, PipelineError

# The stages, in order: each a module with the protocol of launch.stages.stage.
STAGES: tuple[ModuleType, ...] = (prepare, pretrain, pretrain_backward, finetune, collect)
CONFIGURED = ("prepare", "pretrain", "finetune")  # the stages a pipeline file names a YAML for
# The stages with a resolved config in <run_dir>/stages/ (the backward LM's is the pretrain one's).
RESOLVED = ("prepare", "pretrain", pretrain_backward.NAME, "finetune")


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
    # ELMo: also pretrain the backward LM (the pretrain stage's config with data.direction=backward)
    # in <run_dir>/pretrain-backward after the forward one; the finetune stage gets its export as
    # pretrained_backward (head.features=elmo)
    backward_lm: bool = False
    # The prepare driver and the collect job: one CPU each; the driver lives as long as the arrays.
    slurm: SlurmConfig = field(default_factory=_small_job)

    def validate(self) -> None:
        if self.executor is ExecutorKind.inline:
            raise ConfigError("executor: a pipeline runs on local or slurm, not inline")
        for name in ("prepare", "pretrain"):
            if not getattr(self, name).config:
                raise ConfigError(f"{name}.config: name the {name} stage's YAML file")
        if not self.run_dir:  # (control characters in any value are refused as the config loads)
            raise ConfigError("run_dir is empty: name the pipeline's run directory")


@dataclass
class Pipeline:
    """A loaded pipeline: its config and every stage's job (None for a stage it does not have)."""

    cfg: PipelineConfig
    run_dir: str
    jobs: dict[str, Any]

    def stage_file(self, stage: str) -> str:
        return fsio.join(self.run_dir, "stages", f"{stage}.yaml")

    def stages(self) -> list[tuple[ModuleType, Any]]:
        """(stage module, its job) for every stage this pipeline has, in order."""
        return [(s, self.jobs[s.NAME]) for s in STAGES if self.jobs.get(s.NAME) is not None]


def load(path: str, overrides: list[str], executor: str | None = None) -> Pipeline:
    """The pipeline in ``path`` with overrides. ``stage.key=value`` (``pretrain.train.steps=50``)
    goes to that stage's config; other keys are the pipeline's own (``run_dir=...``). Each stage
    makes its own job (its ``wire``: its config, its inputs and outputs placed in the run dir)."""
    own: list[str] = []
    routed: dict[str, list[str]] = {s: [] for s in CONFIGURED}
    for item in overrides:
        head, _, rest = item.partition(".")
        if head in CONFIGURED and rest.split("=", 1)[0].split(".")[0] not in ("config", "overrides"):
            routed[head].append(rest)
        else:
            own.append(item)
    if executor:
        own.append(f"executor={executor}")
    cfg = load_config(PipelineConfig, path, own)
    base = os.path.dirname(os.path.abspath(path)) if fsio.is_local(path) else ""

    def stage_config(schema: type, name: str, extra: tuple[str, ...] = ()) -> Any:
        """Stage ``name``'s config as the pipeline file names it, or None where it names none."""
        ref: StageRef = getattr(cfg, name)
        if not ref.config:
            return None
        file = ref.config if not base or os.path.isabs(ref.config) else os.path.join(base, ref.config)
        try:
            return load_config(schema, file, [*ref.overrides, *routed[name], *extra])
        except ConfigError as e:
            raise ConfigError(f"{name} stage ({file}): {e}") from e

    ctx = Wiring(fsio.absolute(cfg.run_dir), cfg.executor, cfg.backward_lm, {}, stage_config)
    for stage in STAGES:
        job = stage.wire(ctx)
        if job is not None:
            ctx.jobs[stage.NAME] = job
    return Pipeline(cfg, ctx.run_dir, ctx.jobs)


def write_stage_files(p: Pipeline) -> None:
    """``pipeline.yaml`` and ``stages/<stage>.yaml``: a record of the run, and what the plain
    sbatch scripts run."""
    fsio.makedirs(fsio.join(p.run_dir, "stages"))
    fsio.write_text_atomic(fsio.join(p.run_dir, "pipeline.yaml"), to_yaml(p.cfg))
    for name in RESOLVED:
        job = p.jobs.get(name)
        if job is not None:
            fsio.write_text_atomic(p.stage_file(name), to_yaml(job))


@dataclass
class Step:
    """One stage of this run: its module, its job and what it will do."""

    stage: ModuleType
    job: Any
    decision: Decision

    @property
    def name(self) -> str:
        return self.stage.NAME


def decide(p: Pipeline) -> list[Step]:
    """Check and plan every stage, in order, before any work: a stage after one that runs runs too
    (its inputs will change). Raises ConfigError naming the stage, key or path (exit 2)."""
    if p.cfg.executor is ExecutorKind.slurm:  # the prepare driver's and the collect job's
        from rnnpipe.launch.processes.slurm import check_partition

        check_partition(p.cfg.slurm.partition, "slurm.partition")
    steps = []
    upstream: dict[str, Decision] = {}
    for stage, job in p.stages():
        try:
            stage.check(job, dict(upstream))
            decision = stage.plan(job, dict(upstream))
        except ConfigError as e:
            text = str(e)
            raise ConfigError(text if text.startswith(f"{stage.NAME}") else f"{stage.NAME}: {text}") from e
        steps.append(Step(stage, job, decision))
        upstream[stage.NAME] = decision
    return steps


def _show(name: str, d: Decision, prefix: str = "") -> None:
    print(prefix + d.line(name), flush=True)
    for detail in d.details:
        print(f"{prefix}{'':<15} {detail}", flush=True)


def dry_run(p: Pipeline) -> int:
    """Print what ``rnnpipe run`` would do, stage by stage; run and submit nothing."""
    for step in decide(p):
        _show(step.name, step.decision)
    print(f"dry run: nothing was run or submitted ({p.run_dir})")
    return 0


# ------------------------------------------------------------------------------------------ local


def _failed(p: Pipeline, steps: list[Step], i: int, error: str, seconds: float | None = None) -> None:
    """Record stage ``i`` as FAILED and those after it as CANCELLED."""
    entry: dict[str, Any] = {"state": "FAILED", "error": error}
    if seconds is not None:
        entry["seconds"] = round(seconds, 1)
    record.record(p.run_dir, steps[i].name, entry, "local")
    for later in steps[i + 1 :]:
        record.record(
            p.run_dir, later.name, {"state": "CANCELLED", "detail": f"{steps[i].name} failed"}, "local"
        )


def run_local(p: Pipeline) -> int:
    """Every stage, one after another, on this machine; a failed stage stops the ones after it."""
    decide(p)  # every refusal comes before any work, and before the run dir is touched
    with record.lock(p.run_dir):
        record.refuse_if_busy(p.run_dir)
        steps = decide(p)  # again, now that no other rnnpipe can change the run dir
        write_stage_files(p)
        record.begin(p.run_dir, "local")
        for i, step in enumerate(steps):
            t0 = time.time()
            try:
                d = step.decision
                if i:  # checked and planned again: the stages before it are done, their outputs final
                    step.stage.check(step.job, None)
                    d = step.stage.plan(step.job, None)
                print(f"== {step.name}: {'run' if d.run else 'skip'} ({d.reason})", flush=True)
                for detail in d.details:
                    print(f"   {detail}", flush=True)
                if not d.run:
                    record.record(p.run_dir, step.name, {"state": "SKIPPED", "detail": d.reason}, "local")
                    if step.stage is collect:  # the table is the pipeline's last word, even when current
                        collect.show(step.job)
                    continue
                record.record(p.run_dir, step.name, {"state": "RUNNING", "started": record.now()}, "local")
                step.stage.run(step.job, d)
                if not step.stage.is_complete(step.job):  # e.g. pretrain stopped by train.time_limit_min
                    why = step.stage.plan(step.job, None).reason
                    raise PipelineError(
                        f"{step.name} ended, but its output is not complete ({why}); run again"
                    )
            except (PipelineError, KeyboardInterrupt) as e:
                _failed(p, steps, i, str(e) or type(e).__name__, time.time() - t0)
                raise
            record.record(
                p.run_dir, step.name, {"state": "COMPLETED", "seconds": round(time.time() - t0, 1)}, "local"
            )
    print(f"pipeline complete: {p.run_dir}")
    print(f"watch it: tensorboard --logdir {p.run_dir}")
    return 0


# ------------------------------------------------------------------------------------------ slurm


def submit_slurm(p: Pipeline, wait: bool) -> int:
    """Submit the stages to run, chained with afterok, all running one code snapshot; with
    ``wait``, wait for them."""
    from rnnpipe.launch.processes.snapshot import take

    decide(p)  # every refusal comes before any work, and before the run dir is touched
    with record.lock(p.run_dir):
        record.refuse_if_busy(p.run_dir)
        steps = decide(p)
        write_stage_files(p)
        folder = fsio.join(p.run_dir, "slurm", time.strftime("%Y%m%d-%H%M%S"))
        code = take(folder) if any(s.decision.run for s in steps) else None
        state = record.begin(
            p.run_dir, "slurm", code={"path": code.path, "digest": code.digest} if code else None
        )
        dep = ""
        try:
            for step in steps:
                d = step.decision
                if not d.run:
                    state["stages"][step.name] = {"stage": step.name, "state": "SKIPPED", "detail": d.reason}
                    print(f"{step.name}: skip ({d.reason})")
                    continue
                ctx = SlurmContext(folder, dep, code, p.cfg.slurm)
                sub = step.stage.submit(step.job, d, ctx)
                state["stages"][step.name] = {"stage": step.name, **sub.entry(dep, time.time())}
                record.write_state(p.run_dir, state)  # as it goes: a failure must leave no unknown job
                print(f"{step.name}: Slurm job {sub.job_id}" + (f" ({dep})" if dep else ""))
                dep = f"afterok:{sub.job_id}"
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
        record.write_state(p.run_dir, state)
    if code is None:
        print(f"every stage is complete: {p.run_dir}")
        return 0
    print(f"follow it: rnnpipe status {p.run_dir}")
    print(f"watch it: tensorboard --logdir {p.run_dir}")
    if not wait:
        return 0
    return wait_for(p.run_dir, p.cfg.slurm.poll_s)


def wait_for(run_dir: str, poll_s: float) -> int:
    """Wait until every recorded job has ended; print the status; 0 when all completed."""
    from rnnpipe.launch.chain.status import show

    while record.active_jobs(record.read_state(run_dir)):
        time.sleep(poll_s)
    return show(run_dir, out=sys.stdout)
