"""Slurm glue shared by the launchers: job states from sacct, sbatch flags from a config, and the
node-local caches every task sets up first.

Nothing here submits work; :mod:`rnnpipe.launch.processes.executors`,
:mod:`rnnpipe.launch.stages.pretrain` and :mod:`rnnpipe.launch.chain.workflow` do, through
submitit, and ``slurm/*.sbatch`` through plain sbatch.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from rnnpipe.pipeline.errors import ConfigError, PipelineError

# Job states after which nothing more happens to a job (sacct's names; "CANCELLED by 0" → CANCELLED).
ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
}


@dataclass
class JobState:
    """One job, or one task of an array, as sacct reports it."""

    job_id: str  # 123, or 123_4 for an array task
    state: str  # RUNNING, COMPLETED, FAILED, CANCELLED, PENDING, REQUEUED, ...
    exit_code: str  # "1:0": the exit status and the signal
    elapsed: str
    nodes: str
    reason: str  # why it is pending (Dependency, Resources, ...), or None

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


def node_local_caches(environ: Any = None) -> None:
    """Point Triton's and torch's extension caches at this node's temporary directory, unless the
    user chose them: by default both live in the home directory, a shared file system on which
    every node of a job compiles into the same files at once."""
    env = os.environ if environ is None else environ
    base = os.path.join(env.get("TMPDIR") or "/tmp", f"rnnpipe-{getpass.getuser()}")
    env.setdefault("TRITON_CACHE_DIR", os.path.join(base, "triton"))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(base, "torch_extensions"))


def threads_per_task(environ: Any = None) -> None:
    """One OpenMP thread per CPU Slurm gave the task (torch would otherwise use every core of the
    node, oversubscribing it when several tasks share one); a user's OMP_NUM_THREADS wins."""
    env = os.environ if environ is None else environ
    cpus = env.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = cpus
    threads = env.get("OMP_NUM_THREADS")
    torch = sys.modules.get("torch")
    if threads and environ is None and torch is not None:
        # torch read the variable when it loaded; a task that has not loaded it (a prepare task)
        # need not pay for loading it here
        torch.set_num_threads(int(threads))


def task_setup() -> None:
    """What every task of an rnnpipe Slurm job does first: node-local caches, one thread per CPU,
    and log lines (the job's log file is where its user looks)."""
    from rnnpipe.launch.processes.distributed import setup_logging  # (it loads nothing heavy)

    node_local_caches()
    threads_per_task()
    setup_logging()  # RNNPIPE_LOG_LEVEL (rnnpipe -v / -q), DeepSpeed's messages below it


def job_states(job_ids: list[str]) -> dict[str, JobState]:
    """The state of each job (array tasks one by one) from sacct; squeue when accounting is off.
    Keys are sacct's job ids: ``123``, ``123_0``, or ``123_[1-3]`` for array tasks not yet started."""
    if not job_ids:
        return {}
    ids = ",".join(job_ids)
    try:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", ids, "-o", "JobID,State,ExitCode,Elapsed,NodeList,Reason"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise PipelineError(f"cannot run sacct ({e}): is this a Slurm login node?") from e
    states: dict[str, JobState] = {}
    if out.returncode == 0:
        for line in out.stdout.splitlines():
            f = line.split("|")
            if len(f) >= 6:
                states[f[0]] = JobState(f[0], f[1].split()[0], f[2], f[3], f[4], f[5])
    if states:
        return states
    try:  # no accounting: squeue knows jobs that have not ended (and for MinJobAge after)
        out = subprocess.run(
            ["squeue", "-h", "-j", ids, "-o", "%i|%T|%M|%N|%r"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise PipelineError(f"cannot run squeue ({e}): is this a Slurm login node?") from e
    for line in out.stdout.splitlines():
        f = line.split("|")
        if len(f) >= 5:
            states[f[0]] = JobState(f[0], f[1], "", f[2], f[3], f[4])
    return states


def of_job(states: dict[str, JobState], job_id: str) -> list[JobState]:
    """The entries of ``states`` that belong to job (or array) ``job_id``."""
    return [s for k, s in states.items() if k == job_id or k.startswith(f"{job_id}_")]


def sbatch_flags(
    c: Any,
    *,
    nodes: int = 1,
    ntasks_per_node: int = 1,
    gpus_per_node: int = 0,
    signal: str = "",
    requeue: bool = False,
    output: str = "",
) -> list[str]:
    """sbatch options for a :class:`rnnpipe.launch.processes.executors.SlurmConfig`: the same
    resources that the submitit launchers ask for, for ``slurm/*.sbatch``."""
    flags = [
        f"--nodes={nodes}",
        f"--ntasks-per-node={ntasks_per_node}",
        f"--cpus-per-task={c.cpus_per_task}",
        f"--mem={c.mem_gb:g}GB",
        f"--time={c.time_min}",
    ]
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(c, key):
            flags.append(f"--{key}={getattr(c, key)}")
    gpus = gpus_per_node or c.gpus_per_node
    if gpus:
        flags.append(f"--gpus-per-node={gpus}")
    if signal:
        flags.append(f"--signal={signal}")
    if requeue:
        flags.append("--requeue")
    if output:
        flags.append(f"--output={output}")
    for key, value in c.extra.items():
        flags.append(f"--{key}" if value in ("", None) else f"--{key}={value}")
    return flags


def partitions() -> set[str] | None:
    """The partitions this cluster has (``sinfo``), or None where that cannot be asked."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return {line.strip() for line in out.stdout.splitlines() if line.strip()} if out.returncode == 0 else None


def check_partition(partition: str, key: str) -> None:
    """Refuse, before anything is submitted, a partition the cluster does not have (``key`` names
    the config key, as in ``pretrain.executor.slurm.partition``)."""
    if not partition:
        return
    known = partitions()
    if known and partition not in known:
        raise ConfigError(
            f"{key}={partition}: this cluster has no such partition (sinfo lists: {', '.join(sorted(known))})"
        )


def with_dependency(ex: Any, dependency: str) -> Any:
    """``ex`` (a submitit SlurmExecutor) made to wait on ``dependency`` (``afterok:123``), and to be
    cancelled when it can never be met (``--kill-on-invalid-dep``; without it Slurm 22.05 leaves the
    job pending forever). No dependency: ``ex`` as it is."""
    if dependency:
        extra = dict(ex.parameters.get("additional_parameters") or {})
        extra.update({"dependency": dependency, "kill-on-invalid-dep": "yes"})
        ex.update_parameters(additional_parameters=extra)
    return ex


def submitit_extra(extra: dict[str, str]) -> dict[str, Any]:
    """``executor.slurm.extra`` for submitit's ``additional_parameters``: an empty value is a bare
    flag (``{exclusive: ""}`` → ``--exclusive``), as in :func:`sbatch_flags`."""
    return {k: (True if v in ("", None) else v) for k, v in extra.items()}


def shell_array(name: str, words: list[str]) -> str:
    """``name=('w1' 'w2' ...)``: a bash array assignment, every word quoted."""
    return f"{name}=(" + " ".join(shlex.quote(w) for w in words) + ")"


def shell_var(name: str, value: object) -> str:
    """``name='value'``: a bash assignment, the value quoted."""
    return f"{name}={shlex.quote(str(value))}"


def log_tail(path: str, lines: int = 20) -> list[str]:
    """The end of a log file ([] when it does not exist yet): from rnnpipe's last error message
    when there is one (a traceback printed after it would hide it), else the last ``lines``."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().splitlines()
    except OSError:
        return []
    marks = ("rnnpipe: error:", "rnnpipe: config error:")
    starts = [i for i, line in enumerate(text) if line.startswith(marks)]
    if starts:
        message = text[starts[-1] : starts[-1] + lines]
        # ... up to the job runner's report of the same failure (submitit's traceback)
        end = next((i for i, line in enumerate(message) if i and _RUNNER_LINE.match(line)), len(message))
        return message[:end]
    return text[-lines:]


_RUNNER_LINE = re.compile(r"(submitit |Traceback |[\d:]+ E submitit|srun: error)")
