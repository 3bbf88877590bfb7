"""The prepare stage: corpora → webdataset shards (:mod:`pipeline.data.prepare`) on an executor.

Stage protocol (:mod:`launch.stage`). Its fingerprint is the manifest's: the sha256 of the prepare
config without where the dataset lives and how it is run. Complete: ``manifest.json`` records that
fingerprint and every shard has its recorded size and sha256. An output holding a different
dataset is refused unless ``overwrite=true``. On Slurm the stage is a one-CPU driver job that fans
the work out as job arrays (how many pack tasks there are is only known once encoding has run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from launch.executors import ExecutorConfig, ExecutorKind, make_executor
from launch.stage import Decision, SlurmContext, Submitted, short
from pipeline import fsio
from pipeline.config import base_config, config_diff, describe_diff, to_dict, to_yaml
from pipeline.config import fingerprint as config_fingerprint
from pipeline.data.config import PrepareConfig
from pipeline.errors import ConfigError

NAME = "prepare"


@dataclass
class PrepareJob(PrepareConfig):
    """A prepare config plus how to run it; the stage itself never sees ``executor``."""

    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


Job = PrepareJob


def stage_config(job: PrepareJob) -> PrepareConfig:
    return base_config(job, PrepareConfig)


def _identity(values: dict[str, Any]) -> dict[str, Any]:
    from pipeline.data.manifest import dataset_fingerprint_keys

    return dataset_fingerprint_keys(values)


def fingerprint(job: PrepareJob) -> str:
    """The dataset's fingerprint: what ``manifest.json`` records when it is this config's."""
    return config_fingerprint(_identity(to_dict(stage_config(job))))


def _manifest(job: PrepareJob) -> dict[str, Any] | None:
    from pipeline.data.manifest import MANIFEST, read_manifest

    root = fsio.absolute(job.output)
    return read_manifest(root) if fsio.exists(fsio.join(root, MANIFEST)) else None


def is_complete(job: PrepareJob) -> bool:
    """``job.output`` holds this config's dataset, whole (shard sizes and hashes verify)."""
    from pipeline.data.manifest import verify

    manifest = _manifest(job)
    if manifest is None or manifest.get("fingerprint") != fingerprint(job):
        return False
    return not verify(fsio.absolute(job.output), deep=False)


def check(job: PrepareJob, upstream: bool = False) -> None:
    """Slurm values (for a submission); the inputs are checked by the stage's plan step itself."""
    if job.executor.kind is ExecutorKind.slurm:
        from launch.slurm import check_partition

        check_partition(job.executor.slurm.partition, "prepare.executor.slurm.partition")


def plan(job: PrepareJob, upstream: bool = False) -> Decision:
    from pipeline.data.manifest import verify

    root = fsio.absolute(job.output)
    fp = fingerprint(job)
    manifest = _manifest(job)
    if manifest is None:
        work = fsio.absolute(job.work_dir) if job.work_dir else fsio.join(root, ".work")
        if fsio.exists(fsio.join(work, "plan.json")):
            return Decision(True, "continues an interrupted prepare")
        missing = [p for p in _local_inputs(job) if not os.path.exists(p)]
        if missing:  # prepare fails on it, naming it; a dry run says so now
            return Decision(True, f"no dataset yet in {root}; missing input: {', '.join(missing)}")
        return Decision(True, f"no dataset yet in {root}")
    if manifest.get("fingerprint") == fp:
        problems = verify(root, deep=False)
        if not problems:
            return Decision(False, f"complete: the dataset matches its config (fingerprint {short(fp)})")
        return Decision(True, f"rebuilds {len(problems)} damaged shard(s): {problems[0]}")
    was = _identity(manifest.get("config") or {}) if manifest.get("config") else {}
    diff = describe_diff(config_diff(was, _identity(to_dict(stage_config(job))))) or "another fingerprint"
    if job.overwrite:
        return Decision(True, f"overwrite=true: replaces a different dataset ({diff})")
    raise ConfigError(
        f"prepare: {root} holds a different dataset ({diff}). Ways out: a new run_dir (or output), "
        "or prepare.overwrite=true to replace it"
    )


def _local_inputs(job: PrepareJob) -> list[str]:
    """The plain local paths among the inputs (not globs, URLs or chains)."""
    paths = [*job.source.paths, *job.source.valid_paths, *job.source.test_paths]
    return [p for p in paths if "://" not in p and "::" not in p and not any(c in p for c in "*?[")]


def run(job: PrepareJob, decision: Decision | None = None) -> dict[str, Any]:
    """Prepare the dataset on ``job.executor`` and print a line per split; returns the manifest."""
    from pipeline.data.prepare import prepare

    stage = stage_config(job)
    root = fsio.absolute(stage.output)
    work = fsio.absolute(stage.work_dir) if stage.work_dir else fsio.join(root, ".work")
    with make_executor(job.executor, fsio.join(work, "slurm")) as executor:
        manifest = prepare(stage, executor, config_yaml=to_yaml(job))
    for split, info in manifest["splits"].items():
        print(
            f"{split}: {info['tokens']:,} tokens, {info['bytes']:,} bytes, {info['documents']:,} documents, "
            f"{info['samples']:,} samples in {len(info['shards'])} shard(s)"
        )
    print(f"dataset: {root}")
    return manifest


def driver(job: PrepareJob) -> None:
    """The Slurm driver job: prepare with ``job.executor`` (slurm: it submits the arrays, running
    the same code snapshot as itself)."""
    from launch.slurm import task_setup

    task_setup()
    run(job)


def submit(job: PrepareJob, decision: Decision, ctx: SlurmContext) -> Submitted:
    """The driver, a one-CPU job with the pipeline's ``slurm`` resources (``ctx.small``)."""
    from launch.executors import SlurmExecutor

    executor = SlurmExecutor(ctx.small, ctx.folder, code=ctx.code)
    sjob = executor.submit_job(driver, job, name=NAME, dependency=ctx.after)
    return Submitted(sjob.job_id, [str(sjob.paths.stderr)], detail="driver: submits the prepare arrays")
