"""Running the pretrain stage: in this process, as N local processes, or as a Slurm job.

- inline: this process is one rank (or the only one): the process group comes from the
  environment (torchrun, Slurm's srun) or is a single process.
- local: ``distributed.nproc`` processes on this machine (default: one per GPU, or 1 on CPU), each
  running ``rnnpipe pretrain ... --executor inline`` with RANK/WORLD_SIZE/MASTER_* set. Signals are
  forwarded; if one fails the others are stopped.
- slurm: one submitit job of nodes × tasks_per_node tasks through srun, with --signal=USR2 ahead of
  the time limit; the command prints the job id and returns (``--wait`` to wait).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from launch.distributed import free_port
from launch.executors import ExecutorConfig, ExecutorKind
from pipeline.config import base_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.train.config import PretrainConfig
from pipeline.train.signals import EXIT_PREEMPTED, StopFlag, ignore_late_warnings

log = logging.getLogger("rnnpipe")


@dataclass
class DistributedConfig:
    nproc: int = 0  # processes per node (one per GPU); 0 = the GPUs here, or 1 without GPUs
    nodes: int = 1  # slurm
    gpus_per_node: int = 0  # slurm: GPUs requested per node (0 = none)
    signal_grace_s: int = 120  # slurm: USR2 this long before the time limit (Slurm may send it 30 s early)

    def validate(self) -> None:
        if self.nproc < 0 or self.nodes < 1 or self.gpus_per_node < 0:
            raise ConfigError(
                "distributed.nproc >= 0, distributed.nodes >= 1, distributed.gpus_per_node >= 0"
            )


@dataclass
class PretrainJob(PretrainConfig):
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def stage_config(job: PretrainJob) -> PretrainConfig:
    return base_config(job, PretrainConfig)


def run_rank(cfg: PretrainConfig, stop: StopFlag | None = None) -> int:
    """This process's part of the run; returns the exit status (0, or EXIT_PREEMPTED)."""
    from launch import distributed
    from pipeline.train.loop import train

    distributed.init()
    result = train(cfg, stop)
    distributed.shutdown()
    if result.status == "preempted":
        return EXIT_PREEMPTED
    ignore_late_warnings()
    return 0


def _start_rank() -> StopFlag:
    """What a rank started by srun does first: the stop flag, installed before torch and DeepSpeed
    load so that a signal arriving meanwhile is kept (and not taken by submitit's own handler,
    which would end the job as failed); then the node-local caches, threads and logging."""
    stop = StopFlag().install()
    if "SLURM_JOB_ID" in os.environ:
        from launch.slurm import task_setup

        task_setup()
    return stop


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def export_dir(cfg: PretrainConfig) -> str:
    """Where ``--export`` puts the final model: ``<run_dir>/export``."""
    return os.path.join(cfg.run_dir, "export")


def export_final(cfg: PretrainConfig) -> str:
    """Export the finished run's last checkpoint to :func:`export_dir`."""
    from pipeline.train.export import export

    out = export_dir(cfg)
    export(cfg.run_dir, out)
    log.info("exported the final model to %s", out)
    return out


def run_local(argv: list[str], nproc: int) -> int:
    """Start ``nproc`` ranks of ``rnnpipe pretrain`` with the same arguments; wait for all."""
    import torch

    if nproc == 0:
        nproc = torch.cuda.device_count() or 1
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    procs = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(threads),
        }
        cmd = [sys.executable, "-m", "launch", *argv, "--executor", "inline"]
        procs.append(subprocess.Popen(cmd, env=env))

    def forward(signum, frame):  # a preempted launcher passes the signal on: the ranks checkpoint
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    try:
        codes: dict[int, int] = {}
        while len(codes) < nproc:
            for rank, p in enumerate(procs):
                if rank not in codes and p.poll() is not None:
                    codes[rank] = p.returncode
                    if p.returncode not in (0, EXIT_PREEMPTED):  # one rank failed: the others would hang
                        for q in procs:
                            if q.poll() is None:
                                q.terminate()
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    failed = {r: c for r, c in codes.items() if c not in (0, EXIT_PREEMPTED)}
    if failed:
        raise PipelineError(
            f"pretrain rank(s) {sorted(failed)} failed (exit status {sorted(set(failed.values()))}); "
            "see their messages above"
        )
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes.values() else 0


def slurm_task(cfg: PretrainConfig, export: bool = False) -> int:
    """One task of the Slurm job (run by submitit through srun on every node)."""
    code = run_rank(cfg, _start_rank())
    rank0 = os.environ.get("SLURM_PROCID") == "0"
    # Checkpointed on a signal: rank 0 asks Slurm to run the job again (it was submitted --requeue).
    if code == EXIT_PREEMPTED and rank0:
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
    if code == 0 and export and rank0:
        export_final(cfg)
    return code


def slurm_executor(job: PretrainJob, folder: str, dependency: str = "") -> Any:
    """The submitit executor for the pretrain job: nodes × tasks through srun, USR2 ahead of the
    time limit, --requeue; ``dependency`` (``afterok:123``) also cancels it if never met."""
    import submitit

    from launch.executors import SlurmExecutor
    from launch.slurm import with_dependency

    d = job.distributed
    # The resources every rnnpipe Slurm job takes from executor.slurm, then what makes this one a
    # multi-node, requeueable job rather than an array.
    params = SlurmExecutor(job.executor.slurm, folder).slurm_parameters("pretrain")
    params.pop("array_parallelism")
    params.update(
        nodes=d.nodes,
        ntasks_per_node=tasks_per_node(job),
        signal_delay_s=d.signal_grace_s,
        additional_parameters={"requeue": True, **params.get("additional_parameters", {})},
    )
    if d.gpus_per_node:
        params["gpus_per_node"] = d.gpus_per_node
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    ex.update_parameters(**params)
    return with_dependency(ex, dependency)


def tasks_per_node(job: PretrainJob) -> int:
    """Ranks per node: one per GPU, else ``distributed.nproc`` (at least 1)."""
    d = job.distributed
    return d.gpus_per_node or max(1, d.nproc)


def submit_slurm(job: PretrainJob, wait: bool, export: bool = False) -> int:
    import submitit

    ex = slurm_executor(job, os.path.join(job.run_dir, "slurm", "%j"))
    with submitit.helpers.clean_env():
        sjob = ex.submit(slurm_task, stage_config(job), export)
    print(
        f"submitted Slurm job {sjob.job_id}: {job.distributed.nodes} node(s) × {tasks_per_node(job)} "
        f"task(s); logs in {job.run_dir}/slurm"
    )
    if not wait:
        return 0
    codes = sjob.results()
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


def launch(job: PretrainJob, argv: list[str], wait: bool = False, export: bool = False) -> int:
    """Run the stage with ``job.executor``; ``export``: write ``<run_dir>/export`` once it is done."""
    kind = job.executor.kind
    if kind is ExecutorKind.slurm:
        return submit_slurm(job, wait, export)
    if kind is ExecutorKind.inline:  # one rank: of torchrun, srun (slurm/pretrain.sbatch) or alone
        code = run_rank(stage_config(job), _start_rank())
        rank0 = _is_rank0()
    else:
        code = run_local(argv, job.distributed.nproc)
        rank0 = True
    if code == 0 and export and rank0:
        export_final(stage_config(job))
    return code


def run(job: PretrainJob, argv: list[str], wait: bool = False, export: bool = False) -> int:
    """The ``rnnpipe pretrain`` command: absolute paths, ``config.yaml`` in the run dir, launch."""
    from pipeline import fsio
    from pipeline.config import to_yaml

    job.run_dir = fsio.absolute(job.run_dir)
    job.data.path = fsio.absolute(job.data.path)
    launcher = job.executor.kind is not ExecutorKind.inline
    if launcher or _is_rank0():
        fsio.makedirs(job.run_dir)
        fsio.write_text_atomic(fsio.join(job.run_dir, "config.yaml"), to_yaml(job))
    code = launch(job, argv, wait=wait, export=export)
    if code and launcher:
        print(
            f"rnnpipe: pretrain checkpointed on a signal (exit status {code}); run it again to continue",
            file=sys.stderr,
        )
    return code
