"""What a pretrain launch is, below both the launcher (:mod:`rnnpipe.launch.stages.pretrain`) and the ranks
(:mod:`rnnpipe.launch.stages.rank`): the job's config (the run config plus executor and process layout), the
run config a rank trains with, and the export at the end. Importing it loads nothing heavy.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from rnnpipe.launch.processes.executors import ExecutorConfig
from rnnpipe.pipeline.config import base_config, check_range
from rnnpipe.pipeline.train.config import PretrainConfig

log = logging.getLogger("rnnpipe")

__all__ = ["DistributedConfig", "Job", "PretrainJob", "export_dir", "export_final", "stage_config"]


@dataclass
class DistributedConfig:
    nproc: int = 0  # processes per node (one per GPU); 0 = the GPUs here, or 1 without GPUs
    nodes: int = 1  # slurm
    gpus_per_node: int = 0  # slurm: GPUs requested per node (0 = none)
    signal_grace_s: int = 120  # slurm: USR2 this long before the time limit (Slurm may send it 30 s early)
    # How long a collective waits for a rank that does not come before the job fails (NCCL's and
    # gloo's timeout). A crashed rank ends a Slurm job at once (srun --kill-on-bad-exit); this bounds
    # a hang. Rank 0's universal-checkpoint conversion on an elastic resume must fit in it.
    timeout_min: float = 30.0

    def validate(self) -> None:
        check_range("nproc", self.nproc, ge=0)
        check_range("timeout_min", self.timeout_min, gt=0)
        check_range("nodes", self.nodes, ge=1)
        check_range("gpus_per_node", self.gpus_per_node, ge=0)
        check_range("signal_grace_s", self.signal_grace_s, ge=0)


@dataclass
class PretrainJob(PretrainConfig):
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # Replace the run dir's run when its checkpoints cannot be resumed with this config (another
    # model, dataset or world size): they are deleted. A run that can be resumed is resumed.
    overwrite: bool = False


Job = PretrainJob


def stage_config(job: PretrainJob) -> PretrainConfig:
    return base_config(job, PretrainConfig)


def export_dir(cfg: PretrainConfig) -> str:
    """Where ``--export`` puts the final model: ``<run_dir>/export``."""
    return os.path.join(cfg.run_dir, "export")


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def export_final(cfg: PretrainConfig) -> str:
    """Export the finished run's last checkpoint to :func:`export_dir`."""
    from rnnpipe.pipeline.train.export import export

    out = export_dir(cfg)
    export(cfg.run_dir, out)
    log.info("exported the final model to %s", out)
    return out
