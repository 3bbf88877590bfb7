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

from launch.distributed import free_port
from launch.executors import ExecutorConfig, ExecutorKind
from pipeline.config import base_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.train.config import PretrainConfig
from pipeline.train.signals import EXIT_PREEMPTED

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


def run_rank(cfg: PretrainConfig) -> int:
    """This process's part of the run; returns the exit status (0, or EXIT_PREEMPTED)."""
    from launch import distributed
    from pipeline.train.loop import train

    distributed.init()
    result = train(cfg)
    distributed.shutdown()
    return EXIT_PREEMPTED if result.status == "preempted" else 0


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


def _slurm_task(cfg: PretrainConfig) -> int:
    code = run_rank(cfg)
    # Checkpointed on a signal: rank 0 asks Slurm to run the job again (it was submitted --requeue).
    if code == EXIT_PREEMPTED and os.environ.get("SLURM_PROCID") == "0":
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
    return code


def submit_slurm(job: PretrainJob, wait: bool) -> int:
    import submitit

    c, d = job.executor.slurm, job.distributed
    tasks = d.gpus_per_node or max(1, d.nproc)
    ex = submitit.SlurmExecutor(folder=os.path.join(job.run_dir, "slurm", "%j"), max_num_timeout=0)
    params = dict(
        job_name="rnnpipe-pretrain",
        nodes=d.nodes,
        ntasks_per_node=tasks,
        cpus_per_task=c.cpus_per_task,
        mem=f"{c.mem_gb:g}GB",
        time=c.time_min,
        signal_delay_s=d.signal_grace_s,
        additional_parameters={"requeue": True, **c.extra},
    )
    if d.gpus_per_node:
        params["gpus_per_node"] = d.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(c, key):
            params[key] = getattr(c, key)
    if c.setup:
        params["setup"] = list(c.setup)
    ex.update_parameters(**params)
    sjob = ex.submit(_slurm_task, stage_config(job))
    print(
        f"submitted Slurm job {sjob.job_id}: {d.nodes} node(s) × {tasks} task(s); logs in {job.run_dir}/slurm"
    )
    if not wait:
        return 0
    codes = sjob.results()
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


def launch(job: PretrainJob, argv: list[str], wait: bool = False) -> int:
    kind = job.executor.kind
    if kind is ExecutorKind.inline:
        return run_rank(stage_config(job))
    if kind is ExecutorKind.local:
        return run_local(argv, job.distributed.nproc)
    return submit_slurm(job, wait)
