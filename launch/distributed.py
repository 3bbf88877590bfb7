"""The process group from the environment: Slurm, torchrun, or a single process. No ssh, no hostfile.

:func:`init` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from whichever launcher
started this process and initializes torch.distributed (NCCL on GPUs, gloo on CPU) through
DeepSpeed, so the training loop only ever sees torch.distributed.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | single


def first_host(nodelist: str) -> str:
    """The first host of a Slurm nodelist: ``gpu[03-05,9],cpu1`` → ``gpu03``."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot read the Slurm nodelist {nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def node_address(name: str) -> str:
    """An address for the Slurm node ``name``: the name itself when it resolves (the usual case),
    else the node's NodeAddr from ``scontrol`` (clusters whose node names are not hostnames)."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", name], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return name
    m = re.search(r"NodeAddr=(\S+)", out)
    return m.group(1) if m else name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """Where this process sits in the job, from environment variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or rnnpipe's local launcher
        return DistEnv(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", "0")),
            int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", "29500")),
            "torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job = int(env["SLURM_JOB_ID"])
        port = 15000 + job % 20000  # the same on every task of the job, rarely the same across jobs
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", "0")),
            int(env["SLURM_NTASKS"]),
            first_host(nodelist),
            port,
            "slurm",
        )
    return DistEnv(0, 0, 1, "127.0.0.1", free_port(), "single")


def init() -> DistEnv:
    """Export the detected layout to the environment and initialize the process group."""
    d = detect()
    if d.source == "slurm":
        d.master_addr = node_address(d.master_addr)
    os.environ.update(
        RANK=str(d.rank),
        LOCAL_RANK=str(d.local_rank),
        WORLD_SIZE=str(d.world_size),
        MASTER_ADDR=d.master_addr,
        MASTER_PORT=str(d.master_port),
    )
    import torch

    # DeepSpeed calls torch's renamed collectives: one FutureWarning per call would bury the log.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(d.local_rank)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return d


def shutdown() -> None:
    """End the process group cleanly after a rank's work succeeded.

    Ranks finish at different times (rank 0 writes the last files). Without a barrier and an
    explicit ``destroy_process_group``, an interpreter that exits while gloo's worker threads are
    still joinable aborts with "terminate called without an active exception" (exit status -6),
    so a run that trained and saved correctly would report failure. Not called after an error: a
    barrier there would hang on the rank that died.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def exit_now(code: int) -> None:
    """End a rank's process with ``code`` once its work is done and its files are closed, skipping
    the interpreter's finalization: gloo's and DeepSpeed's CPU communication threads can still
    abort it there ("terminate called without an active exception", exit status -6) now and then,
    even after :func:`shutdown`, and a rank that trained and saved correctly would report failure."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
