"""A fine-tuning sweep: a grid over job keys, expanded into jobs, run through an executor.

    tasks: {sst2: {kind: classification, train: ..., dev: ...}, conll: {kind: tagging, ...}}
    job:   {optim: {lr: 1e-3}, max_steps: 500, ...}            # defaults of every job
    grid:  {task: [sst2, conll], init: [pretrained, scratch], seed: [0, 1, 2], optim.lr: [1e-3, 3e-4]}

Every combination of the grid's values is one job in ``<out_dir>/jobs/<name>``, its name made of
the values (``sst2-pretrained-lr0.0003-seed1``). Jobs that already have ``result.json`` are skipped
when their recorded fingerprint is the one the job would have now (:mod:`rnnpipe.pipeline.finetune.identity`),
so a re-run does exactly what is missing or stale; one failed job does not stop the others.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import config_key, override
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.finetune import kinds
from rnnpipe.pipeline.finetune.backward import check_backward
from rnnpipe.pipeline.finetune.config import Features, JobConfig, JobSpec, TaskConfig

log = logging.getLogger("rnnpipe.finetune")


@dataclass
class SweepConfig:
    out_dir: str = "runs/finetune"
    pretrained: str = ""  # an ``rnnpipe export`` directory, or a pretrain run dir (its latest exported)
    # head.features=elmo: the backward LM (pretrained on the stream read in reverse), an export or a
    # backward pretrain run dir (its latest exported into <out_dir>/pretrained-backward); "" = the
    # forward export's own <export>/backward, when it has one
    pretrained_backward: str = ""
    data_root: str = "../shared/data"  # for ${data_root} in task paths
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    job: JobSpec = field(default_factory=JobSpec)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # job key -> values

    def validate(self) -> None:
        if not self.out_dir:
            raise ConfigError(f"{config_key('out_dir')} is empty: name the sweep's output directory")
        if not self.pretrained:
            raise ConfigError("pretrained: set it to an rnnpipe export directory or a pretrain run dir")
        if not self.tasks:
            raise ConfigError("tasks: name at least one task (tasks.<name>.kind/train/dev/...)")
        for name, task in self.tasks.items():  # each against its kind: one of the registry's
            kinds.check_task(task, f"{config_key('tasks')}.{name}.")
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid.{key} must be a non-empty list of values")


def _short(key: str, value: Any) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if leaf in ("task", "init"):
        return str(value)
    return f"{leaf}{value}"


def job_name(values: dict[str, Any]) -> str:
    """A directory name from a job's grid values: task and init first, the seed last."""
    keys = sorted(values, key=lambda k: (k != "task", k != "init", k == "seed", k))
    name = "-".join(_short(k, values[k]) for k in keys) or "job"
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)


def expand(sweep: SweepConfig, pretrained: str, backward: str | None = None) -> list[JobConfig]:
    """Every job of the grid, in grid order, each with its task's files and its directory.

    ``backward``: the backward LM's export for head.features=elmo jobs (None: where
    :func:`backward_of` says it is; "" = none)."""
    keys = list(sweep.grid)
    if backward is None:
        backward = backward_of(sweep, pretrained)
    jobs = []
    names: set[str] = set()
    for combo in itertools.product(*(sweep.grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        spec = override(sweep.job, [f"{k}={v}" for k, v in values.items()], "in grid")
        if spec.task not in sweep.tasks:
            raise ConfigError(f"job task {spec.task!r} is not among tasks: {', '.join(sorted(sweep.tasks))}")
        spec = override(spec, sweep.tasks[spec.task].job_overrides, f"in tasks.{spec.task}.job_overrides")
        kinds.get(sweep.tasks[spec.task].kind).check_job(spec.task, spec)
        elmo = spec.head.features is Features.elmo
        if elmo:
            _check_elmo(sweep, spec, pretrained, backward)
        name = job_name(values)
        if name in names:
            raise ConfigError(f"grid: two jobs would share the directory {name}")
        names.add(name)
        fields = {f: getattr(spec, f) for f in JobSpec.__dataclass_fields__}
        jobs.append(
            JobConfig(
                **fields,
                task_config=sweep.tasks[spec.task],
                pretrained=pretrained,
                pretrained_backward=backward if elmo else "",
                out_dir=fsio.join(sweep.out_dir, "jobs", name),
                hparams={k: (v.value if hasattr(v, "value") else v) for k, v in values.items()},
            )
        )
    return jobs


def _check_elmo(sweep: SweepConfig, spec: JobSpec, pretrained: str, backward: str) -> None:
    """An elmo job (its kind has a head to read the mix: ``Kind.check_job``): a backward LM once the
    forward export exists (before it does, a pipeline's pretrain stage may make both), with the
    forward LM's tokenizer."""
    from rnnpipe.pipeline.models.exported import is_export

    if not is_export(pretrained):
        return
    if not backward:
        raise ConfigError(
            "head.features=elmo needs a backward LM: set pretrained_backward to its export or its "
            "pretrain run dir (data.direction=backward), or export one into "
            f"{fsio.join(pretrained, 'backward')}"
        )
    if is_export(backward):
        check_backward(pretrained, backward)


def job_label(cfg: JobConfig) -> str:
    return cfg.out_dir.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class LabelledJob:
    """A job config with the ``label`` that executors print for failures."""

    cfg: JobConfig
    label: str


def run_one(item: LabelledJob, report: Callable[[int], None]) -> dict[str, Any]:
    """Executor task: run one job; a failure carries the tail of the job's log."""
    from rnnpipe.pipeline.finetune.job import LOG, run_job

    try:
        return run_job(item.cfg)
    except Exception as e:
        path = fsio.join(item.cfg.out_dir, LOG)
        tail = fsio.read_text(path).splitlines()[-15:] if fsio.exists(path) else []
        msg = f"{e}" + ("\n  log tail (" + path + "):\n  " + "\n  ".join(tail) if tail else "")
        raise PipelineError(msg) from e


def pending(jobs: list[JobConfig]) -> tuple[list[dict[str, Any]], list[JobConfig], dict[str, str]]:
    """(the results of jobs complete with their current identity, the other jobs, why each of those
    is not complete: ``{out_dir: "not run yet" | "stale: backbone.sha256: … → …" | ...}``)."""
    from rnnpipe.pipeline.finetune.identity import status
    from rnnpipe.pipeline.models.exported import backbone_identity

    backbones: dict[str, dict[str, Any]] = {}
    done, todo, why = [], [], {}
    for j in jobs:
        if j.pretrained not in backbones:
            backbones[j.pretrained] = backbone_identity(j.pretrained)
        result, reason = status(j, backbones[j.pretrained])
        if result is not None:
            done.append(result)
        else:
            todo.append(j)
            why[j.out_dir] = reason
    return done, todo, why


BACKWARD_EXPORT = "pretrained-backward"  # <out_dir>/pretrained-backward: a backward run dir's export


def _export_path(sweep: SweepConfig, src: str, name: str) -> str:
    from rnnpipe.pipeline.models.exported import CONFIG

    src = fsio.absolute(src)
    if fsio.exists(fsio.join(src, CONFIG)) or not fsio.exists(fsio.join(src, "checkpoints")):
        return src
    return fsio.join(fsio.absolute(sweep.out_dir), name)


def export_of(sweep: SweepConfig) -> str:
    """Where the export the sweep fine-tunes is: ``pretrained`` when it is one, else (a pretrain
    run dir) ``<out_dir>/pretrained``, which :func:`resolve_pretrained` makes."""
    return _export_path(sweep, sweep.pretrained, "pretrained")


def backward_export(path: str) -> str | None:
    """The backward LM an export holds in ``<export>/backward`` (itself an export), or None."""
    from rnnpipe.pipeline.models import exported

    held = getattr(exported, "backward_export", None)  # the export's own answer, where it has one
    if held is not None:
        return held(path)
    inner = fsio.join(fsio.absolute(path), "backward")
    return inner if exported.is_export(inner) else None


def backward_of(sweep: SweepConfig, pretrained: str) -> str:
    """Where the backward LM's export of elmo jobs is: ``pretrained_backward`` when it is an export,
    ``<out_dir>/pretrained-backward`` for a backward pretrain run dir (:func:`resolve_pretrained`
    makes it), else (unset) the forward export's ``<export>/backward``; "" when there is none."""
    if sweep.pretrained_backward:
        return _export_path(sweep, sweep.pretrained_backward, BACKWARD_EXPORT)
    return (backward_export(pretrained) or "") if pretrained else ""


def resolve_pretrained(sweep: SweepConfig) -> str:
    """The export directory to load: ``pretrained`` itself, or (a pretrain run dir) its latest
    checkpoint exported into ``<out_dir>/pretrained``, again whenever the run has moved on. A
    ``pretrained_backward`` run dir is exported (into ``<out_dir>/pretrained-backward``) the same way."""
    if sweep.pretrained_backward:
        _resolve(sweep, sweep.pretrained_backward, BACKWARD_EXPORT, "pretrained_backward")
    return _resolve(sweep, sweep.pretrained, "pretrained", "pretrained")


def _resolve(sweep: SweepConfig, source: str, name: str, key: str) -> str:
    from rnnpipe.pipeline.models.exported import CONFIG, export_source

    src = fsio.absolute(source)
    if fsio.exists(fsio.join(src, CONFIG)):
        return src
    if not fsio.exists(fsio.join(src, "checkpoints")):
        raise PipelineError(
            f"{key}={source}: neither an rnnpipe export (no {CONFIG}) "
            "nor a pretrain run dir (no checkpoints/)"
        )
    from pathlib import Path

    from rnnpipe.pipeline.train.checkpoint import find_latest, read_header
    from rnnpipe.pipeline.train.export import export

    dst = fsio.join(fsio.absolute(sweep.out_dir), name)
    latest = find_latest(Path(src))
    if latest is not None and fsio.exists(fsio.join(dst, CONFIG)):
        made_from = export_source(dst)
        if (made_from.get("checkpoint"), made_from.get("fingerprint")) == (
            str(latest),
            read_header(latest).get("fingerprint"),
        ):
            return dst
    log.info("exporting %s (%s) to %s", src, latest, dst)
    export(src, dst)
    return dst


def run_sweep(sweep: SweepConfig, executor: Any) -> tuple[list[dict[str, Any]], int]:
    """Run every job not yet complete; returns (all results, how many were skipped).
    Raises :class:`TasksFailed` naming the failed jobs after all have ended."""
    pretrained = resolve_pretrained(sweep)
    jobs = expand(sweep, pretrained)
    done, todo, _ = pending(jobs)
    log.info("%d job(s): %d complete, %d to run", len(jobs), len(done), len(todo))
    items = [LabelledJob(j, job_label(j)) for j in todo]
    results = executor.map(run_one, items, name="finetune") if items else []
    return done + results, len(done)
