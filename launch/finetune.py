"""The fine-tune sweep's job config: the sweep plus how its jobs are run (the executor).

Jobs fan out through the executor layer: one process per job on this machine (local), one Slurm
array task per job through submitit (slurm; tasks are requeued on preemption or timeout and resume
from their checkpoint), or one after another in this process (inline).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launch.executors import ExecutorConfig
from pipeline.config import base_config
from pipeline.finetune.sweep import SweepConfig


@dataclass
class FinetuneJob(SweepConfig):
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


def stage_config(job: FinetuneJob) -> SweepConfig:
    return base_config(job, SweepConfig)
