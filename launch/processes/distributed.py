"""The process group from the environment: Slurm, torchrun, or a single process. No ssh, no hostfile.

:func:`init` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from whichever launcher
started this process and initializes torch.distributed (NCCL on GPUs, gloo on CPU) through
DeepSpeed, so the training loop only ever sees torch.distributed.

A rank's console: :func:`setup_logging` (rnnpipe's format at the level of RNNPIPE_LOG_LEVEL, which
``rnnpipe -v`` sets to DEBUG) and :func:`quiet_deepspeed`, which moves DeepSpeed's own messages
(its logger, its prints while it loads and sets up the process group, the Python warnings raised
inside it and torch.distributed) below rnnpipe's level: shown with ``-v``, hidden otherwise. Its
errors always show.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
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


def hostnames(nodelist: str) -> list[str]:
    """Every host of a Slurm nodelist, in order: ``rack[1-2]-node[01-02],cpu1`` → ``rack1-node01``,
    ``rack1-node02``, ``rack2-node01``, ``rack2-node02``, ``cpu1``. Any number of bracket groups per
    name, ranges keep their zero padding (what ``scontrol show hostnames`` prints, without it)."""
    names: list[str] = []
    for part in _split_top_level(nodelist.strip()):
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", part):
            if not literal and not ranges:
                continue
            choices = [literal + v for v in _expand_ranges(ranges, nodelist)] if ranges else [literal]
            expanded = [e + c for e in expanded for c in choices]
        names += [e for e in expanded if e]
    if not names:
        raise ValueError(f"cannot read the Slurm nodelist {nodelist!r}")
    return names


def _split_top_level(nodelist: str) -> list[str]:
    """``a[1,3],b`` → ``a[1,3]``, ``b``: the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    return [p for p in parts if p]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    """``01-03,7`` → ``01``, ``02``, ``03``, ``7`` (zero padding as written)."""
    out = []
    for item in ranges.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"cannot read the Slurm nodelist {nodelist!r}")
        out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi or lo) + 1)]
    return out


def first_host(nodelist: str) -> str:
    """The first host of a Slurm nodelist: ``gpu[03-05,9],cpu1`` → ``gpu03``."""
    return hostnames(nodelist)[0]


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


# Slurm's job ids map onto ports in [15000, 32000): below Linux's ephemeral range (32768-60999),
# where a port the kernel handed to an outgoing connection would make the rendezvous fail.
PORT_BASE, PORT_SPAN = 15000, 17000


def _launched_by_rank_launcher(env: dict[str, str] | os._Environ) -> bool:
    """RANK and WORLD_SIZE come from a launcher that set them for this process (torchrun, or
    rnnpipe's local launcher), not from a shell that exported them once."""
    return "TORCHELASTIC_RUN_ID" in env or "RNNPIPE_LAUNCHER_PID" in env


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    """Where this process sits in the job, from environment variables: torchrun's or rnnpipe's
    local launcher's RANK/WORLD_SIZE; else a Slurm step's tasks (a RANK or WORLD_SIZE exported by
    hand, or inherited from the submitting shell, does not override what srun says); else alone."""
    env = os.environ if environ is None else environ
    in_slurm_step = "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env
    if "RANK" in env and "WORLD_SIZE" in env and (_launched_by_rank_launcher(env) or not in_slurm_step):
        return DistEnv(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", "0")),
            int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", "29500")),
            "torchrun",
        )
    if in_slurm_step:
        # The step's own nodes: a step on some of the job's nodes has its rank 0 on its first one.
        nodelist = (
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        ) or "127.0.0.1"
        job, step = int(env["SLURM_JOB_ID"]), int(env.get("SLURM_STEP_ID", "0") or 0)
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", "0")),
            int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"]),
            first_host(nodelist),
            # the same on every task of the step; another for the job's next step (the last one's
            # may still be in TIME_WAIT) and, mostly, for other jobs
            PORT_BASE + (job + 7919 * step) % PORT_SPAN,
            "slurm",
        )
    return DistEnv(0, 0, 1, "127.0.0.1", free_port(), "single")


def cuda_device(local_rank: int, visible: int, environ: dict[str, str] | None = None) -> int:
    """The CUDA device index this rank uses among the ``visible`` ones: its local rank when each
    task sees every GPU of the node; 0 when Slurm (``--gpus-per-task=1``, ``--gpu-bind``, a site
    default) or CUDA_VISIBLE_DEVICES gives each task one GPU. A task that sees several GPUs, but
    fewer than its local rank, is refused: which one is meant cannot be known."""
    if visible == 1 or local_rank < visible:
        return 0 if visible == 1 else local_rank
    env = os.environ if environ is None else environ
    shown = env.get("CUDA_VISIBLE_DEVICES", "(unset)")
    from rnnpipe.pipeline.errors import PipelineError

    raise PipelineError(
        f"the rank with local rank {local_rank} sees {visible} GPUs (CUDA_VISIBLE_DEVICES={shown}): each "
        "task needs its own GPU; run one task per GPU with every GPU visible to each task "
        "(--gpu-bind=none) or exactly one (--gpus-per-task=1)"
    )


DEFAULT_TIMEOUT_MIN = 30.0  # distributed.timeout_min: how long a collective may wait for a peer


def init(timeout_min: float = DEFAULT_TIMEOUT_MIN) -> DistEnv:
    """Export the detected layout to the environment, pick this rank's GPU, and initialize the
    process group with an explicit ``timeout_min``: how long a collective waits for a rank that
    does not come (rank 0's universal-checkpoint conversion must fit in it; a rank that crashes
    ends a Slurm job at once through srun's --kill-on-bad-exit, not through this timeout)."""
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
    quiet_deepspeed()  # before DeepSpeed loads: it logs and prints while it does
    import datetime

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    else:
        torch.cuda.set_device(cuda_device(d.local_rank, torch.cuda.device_count()))
    with deepspeed_prints():
        import deepspeed

        quiet_deepspeed()  # again: loading it reset its logger's level
        skip_shm_build()
        deepspeed.init_distributed(
            dist_backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(minutes=timeout_min),
        )
    return d


def skip_shm_build() -> bool:
    """Keep DeepSpeed from building its shared-memory collectives (a C++ extension, about 19 s on
    two cores, under ~/.cache/torch_extensions) when it sets up the process group on CPU: they
    serve only ``deepspeed.comm.inference_all_reduce`` (DeepSpeed's inference and tensor
    parallelism), which rnnpipe never calls; without them that call falls back to
    torch.distributed's all-reduce. DeepSpeed has no setting for it (0.19: ``TorchBackend``
    builds it unconditionally through ``deepspeed.comm.torch.build_shm_op``), so that function is
    replaced, before the process group exists, by one that reports the op unavailable (its own
    answer on a platform without it). Guarded: a DeepSpeed without the function is left alone (it
    builds as before, or not at all). Returns whether it was replaced."""
    try:  # (by its name: ``deepspeed.comm.torch`` as an attribute is the torch package)
        ds_torch = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return False
    if not callable(getattr(ds_torch, "build_shm_op", None)):
        return False
    ds_torch.build_shm_op = _no_shm_op
    return True


def _no_shm_op() -> None:
    """:func:`deepspeed.comm.torch.build_shm_op`'s answer where the op is unavailable."""
    return None


# ------------------------------------------------------------------------------------ console

LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
LOG_LEVEL_ENV = "RNNPIPE_LOG_LEVEL"  # set by ``rnnpipe -v`` (DEBUG) for the processes it starts
DEEPSPEED_LOGGER = "DeepSpeed"  # deepspeed.utils.logging.logger's name


def log_level(environ: dict[str, str] | None = None) -> int:
    """The level RNNPIPE_LOG_LEVEL names (DEBUG, INFO, WARNING, ERROR, or a number); INFO without it
    or when it names none."""
    value = ((os.environ if environ is None else environ).get(LOG_LEVEL_ENV) or "").strip().upper()
    if value.isdigit():
        return int(value)
    level = logging.getLevelName(value) if value else logging.INFO
    return level if isinstance(level, int) else logging.INFO


def child_log_level() -> str | None:
    """The level for the ranks this process starts (RNNPIPE_LOG_LEVEL in their environment): its
    own RNNPIPE_LOG_LEVEL, else its root logger's level where logging was set up (``rnnpipe -q``
    gives WARNING); None where it was not (the ranks' default, INFO, applies)."""
    if os.environ.get(LOG_LEVEL_ENV):
        return os.environ[LOG_LEVEL_ENV]
    root = logging.getLogger()
    return logging.getLevelName(root.level) if root.handlers and root.level else None


def setup_logging() -> None:
    """A rank's log lines: rnnpipe's format, at RNNPIPE_LOG_LEVEL (INFO by default), on stderr; and
    DeepSpeed's messages below that unless it is DEBUG (:func:`quiet_deepspeed`). Where the root
    logger has handlers already (submitit's job, a test), only its level is set."""
    level = log_level()
    root = logging.getLogger()
    if root.handlers:
        root.setLevel(level)
    else:
        logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S")
    quiet_deepspeed()


class _DemoteDeepSpeed(logging.Filter):
    """On DeepSpeed's logger: its records below ERROR become DEBUG records, and every record goes to
    the root logger's handlers (rnnpipe's format, stderr) when the root logger's level lets it
    through, never to DeepSpeed's own handler (stdout, another format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        root = logging.getLogger()
        if root.isEnabledFor(record.levelno):
            root.handle(record)
        return False


def quiet_deepspeed() -> None:
    """DeepSpeed's messages below rnnpipe's: its logger's INFO and WARNING records (config dumps,
    "Attempting to get learning rate from scheduler before it has started", the accelerator it
    picked) as DEBUG, and the Python warnings raised inside deepspeed and torch.distributed hidden,
    unless the root logger is at DEBUG (``rnnpipe -v``, RNNPIPE_LOG_LEVEL=DEBUG). Errors show.

    Safe to call before DeepSpeed loads (the filter on its logger survives the loading, which sets
    the logger's level to WARNING: call it again afterwards) and any number of times."""
    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    ds = logging.getLogger(DEEPSPEED_LOGGER)
    if not any(isinstance(f, _DemoteDeepSpeed) for f in ds.filters):
        ds.addFilter(_DemoteDeepSpeed())
    if "deepspeed.utils.logging" in sys.modules:  # (before, deepspeed's loading would reset it)
        # Not verbose: its INFO and WARNING records are not even made (some sit in hot loops).
        ds.setLevel(logging.INFO if verbose else logging.ERROR)
    # DeepSpeed calls torch's renamed collectives: one FutureWarning per call would bury the log.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    if not verbose:
        # Raised inside the libraries (their stack level points there), about their own internals:
        # nothing a user of rnnpipe can act on. A warning they attribute to rnnpipe's code still shows.
        for module in (r"deepspeed(\.|$)", r"torch\.distributed(\.|$)"):
            warnings.filterwarnings("ignore", module=module)


@contextlib.contextmanager
def deepspeed_prints():
    """Catch what DeepSpeed prints to stdout inside the block (while it loads: its op builders'
    "[WARNING] ..." compatibility notes; while it sets up the process group) and log each line on
    its logger, so that :func:`quiet_deepspeed` decides: DEBUG, or ERROR when the block raised (the
    lines may say why). Only for short blocks around DeepSpeed's own calls: all of stdout is caught."""
    buffer = io.StringIO()
    failed = False
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    except BaseException:
        failed = True
        raise
    finally:
        ds = logging.getLogger(DEEPSPEED_LOGGER)
        for h in ds.handlers:  # made while loading inside the block: its own handler wrote to the buffer
            if isinstance(h, logging.StreamHandler) and h.stream is buffer:
                h.setStream(sys.stdout)
        for line in buffer.getvalue().splitlines():
            if line.strip():
                ds.log(logging.ERROR if failed else logging.INFO, "%s", line.rstrip())


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
