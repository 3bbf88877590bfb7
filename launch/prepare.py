"""The prepare stage's job config (the stage plus its executor) and running it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from launch.executors import ExecutorConfig, make_executor
from pipeline import fsio
from pipeline.config import base_config, to_yaml
from pipeline.data.config import PrepareConfig


@dataclass
class PrepareJob(PrepareConfig):
    """A prepare config plus how to run it; the stage itself never sees ``executor``."""

    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


def stage_config(job: PrepareJob) -> PrepareConfig:
    return base_config(job, PrepareConfig)


def run(job: PrepareJob) -> dict[str, Any]:
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


def is_complete(job: PrepareJob) -> bool:
    """Whether ``job.output`` holds this config's dataset, whole (shard sizes and hashes verify)."""
    from pipeline.config import fingerprint, to_dict
    from pipeline.data.manifest import MANIFEST, dataset_fingerprint_keys, read_manifest, verify

    root = fsio.absolute(job.output)
    if not fsio.exists(fsio.join(root, MANIFEST)):
        return False
    expected = fingerprint(dataset_fingerprint_keys(to_dict(stage_config(job))))
    return read_manifest(root).get("fingerprint") == expected and not verify(root, deep=False)
