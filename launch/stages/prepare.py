"""The prepare stage: corpora → webdataset shards (:mod:`rnnpipe.pipeline.data.prepare`) on an executor.

Stage protocol (:mod:`rnnpipe.launch.stages.stage`). Its fingerprint is the manifest's: the sha256 of
the prepare config without where the dataset lives and how it is run. Complete: ``manifest.json`` records that
fingerprint and every shard has its recorded size and sha256 (all re-hashed: a flipped byte keeps
the size). An output holding a different dataset is refused unless ``overwrite=true``; one that
holds no dataset rnnpipe wrote is refused even then. On Slurm the stage is a one-CPU driver job that fans
the work out as job arrays (how many pack tasks there are is only known once encoding has run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from rnnpipe.launch.processes.executors import ExecutorConfig, ExecutorKind, make_executor
from rnnpipe.launch.stages.stage import Decision, SlurmContext, SlurmShape, Submitted, Upstream, Wiring, short
from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import base_config, config_diff, describe_diff, to_dict, to_yaml
from rnnpipe.pipeline.config import fingerprint as config_fingerprint
from rnnpipe.pipeline.data.config import PrepareConfig
from rnnpipe.pipeline.errors import ConfigError

NAME = "prepare"


@dataclass
class PrepareJob(PrepareConfig):
    """A prepare config plus how to run it; the stage itself never sees ``executor``."""

    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


Job = PrepareJob


def wire(ctx: Wiring) -> PrepareJob:
    """The pipeline's prepare job: the dataset goes to ``<run_dir>/data``."""
    job: PrepareJob = ctx.load(PrepareJob, NAME)
    job.output = ctx.path("data")
    job.executor.kind = ctx.executor
    return job


def stage_config(job: PrepareJob) -> PrepareConfig:
    return base_config(job, PrepareConfig)


def _identity(values: dict[str, Any]) -> dict[str, Any]:
    from rnnpipe.pipeline.data.manifest import dataset_fingerprint_keys

    return dataset_fingerprint_keys(values)


def fingerprint(job: PrepareJob) -> str:
    """The dataset's fingerprint: what ``manifest.json`` records when it is this config's."""
    return config_fingerprint(_identity(to_dict(stage_config(job))))


def _manifest(job: PrepareJob) -> dict[str, Any] | None:
    """The output's manifest, None without one; a damaged one of rnnpipe's with overwrite=true
    reads as one of another fingerprint (overwrite replaces it)."""
    from rnnpipe.pipeline.data.prepare import own_manifest

    return own_manifest(fsio.absolute(job.output), job.overwrite)


def is_complete(job: PrepareJob) -> bool:
    """``job.output`` holds this config's dataset, whole: every shard and the tokenizer file have
    their recorded size and sha256 (each file hashed once per process while it is unchanged)."""
    from rnnpipe.pipeline.data.manifest import check_sizes
    from rnnpipe.pipeline.errors import PipelineError

    try:
        manifest = _manifest(job)
    except PipelineError:  # a damaged manifest: not complete (plan says why)
        return False
    if manifest is None or manifest.get("fingerprint") != fingerprint(job):
        return False
    return not check_sizes(fsio.absolute(job.output), hashes=True)


def check(job: PrepareJob, upstream: Upstream | None = None) -> None:
    """Slurm values (for a submission); the inputs are checked by the stage's plan step itself."""
    if job.executor.kind is ExecutorKind.slurm:
        from rnnpipe.launch.processes.slurm import check_partition

        check_partition(job.executor.slurm.partition, "prepare.executor.slurm.partition")


def plan(job: PrepareJob, upstream: Upstream | None = None) -> Decision:
    """Whether the stage runs and why: no dataset yet, an interrupted prepare to continue, damaged
    shards to rebuild (every shard re-hashed), or complete. Refuses (ConfigError) an output holding
    another dataset unless ``overwrite=true``, and one holding no dataset of rnnpipe's even then."""
    import json

    from rnnpipe.pipeline.data.manifest import check_sizes

    root = fsio.absolute(job.output)
    fp = fingerprint(job)
    values = _identity(to_dict(stage_config(job)))

    def refuse(what: str, was: dict[str, Any]) -> Decision:
        diff = describe_diff(config_diff(_identity(was), values)) if was else "another fingerprint"
        if job.overwrite:
            return Decision(True, f"overwrite=true: replaces {what} ({diff})", output=fp)
        raise ConfigError(
            f"prepare: {root} holds {what} ({diff}). Ways out: a new run_dir (or output), or "
            "prepare.overwrite=true to replace it"
        )

    manifest = _manifest(job)
    if manifest is None:
        work = fsio.absolute(job.work_dir) if job.work_dir else fsio.join(root, ".work")
        state_file = fsio.join(work, "state.json")
        if fsio.exists(state_file):
            state = json.loads(fsio.read_text(state_file))
            if state.get("fingerprint") != fp and fsio.exists(fsio.join(work, "plan.json")):
                return refuse("an unfinished prepare of another config", state.get("config") or {})
            if fsio.exists(fsio.join(work, "plan.json")):
                return Decision(True, "continues an interrupted prepare", output=fp)
        else:
            from rnnpipe.pipeline.data.prepare import foreign_entries

            # Refused even with overwrite=true, which only ever removes a dataset rnnpipe wrote.
            foreign = foreign_entries(root, work)
            if foreign:
                raise ConfigError(
                    f"prepare: {root} is not empty and holds no rnnpipe dataset "
                    f"({', '.join(foreign[:5])}...); choose an empty or new run_dir (or output)"
                )
        missing = [p for p in _local_inputs(job) if not os.path.exists(p)]
        if missing:  # prepare fails on it, naming it; a dry run says so now
            return Decision(True, f"no dataset yet in {root}; missing input: {', '.join(missing)}", output=fp)
        return Decision(True, f"no dataset yet in {root}", output=fp)
    if manifest.get("fingerprint") != fp:
        return refuse("a different dataset", manifest.get("config") or {})
    problems = check_sizes(root, hashes=True)
    if problems:
        return Decision(True, f"rebuilds {len(problems)} damaged shard(s): {problems[0]}", output=fp)
    return Decision(False, f"complete: the dataset matches its config (fingerprint {short(fp)})", output=fp)


def _local_inputs(job: PrepareJob) -> list[str]:
    """The plain local paths among the inputs (not globs, URLs or chains)."""
    paths = [*job.source.paths, *job.source.valid_paths, *job.source.test_paths]
    return [p for p in paths if "://" not in p and "::" not in p and not any(c in p for c in "*?[")]


def run(job: PrepareJob, decision: Decision | None = None) -> dict[str, Any]:
    """Prepare the dataset on ``job.executor`` and print a line per split; returns the manifest."""
    from rnnpipe.pipeline.data.prepare import prepare

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
    from rnnpipe.launch.processes.slurm import task_setup

    task_setup()
    run(job)


def slurm_shape(job: PrepareJob, small: Any) -> SlurmShape:
    """The driver: a one-task job with the pipeline's ``slurm`` resources (``small``); the arrays
    it submits take ``executor.slurm``'s."""
    return SlurmShape("prepare.sbatch", small)


def submit(job: PrepareJob, decision: Decision, ctx: SlurmContext) -> Submitted:
    """The driver (:func:`slurm_shape`), which submits the arrays."""
    from rnnpipe.launch.processes.executors import SlurmExecutor

    executor = SlurmExecutor(slurm_shape(job, ctx.small).resources, ctx.folder, code=ctx.code)
    sjob = executor.submit_job(driver, job, name=NAME, dependency=ctx.after)
    return Submitted(sjob.job_id, [str(sjob.paths.stderr)], detail="driver: submits the prepare arrays")
