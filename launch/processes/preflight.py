"""The checks a pretrain rank runs on its compute node before DeepSpeed starts: what a first job on
a new cluster otherwise finds out after minutes of start-up, or in a collective's timeout.

- GPUs: torch sees CUDA where the job asked for GPUs (a CPU build of torch does not), and each task
  of the node gets a GPU of its own (as many visible as tasks, or exactly one per task);
- Triton: its launcher is C code that Triton compiles at a kernel's first launch, with the node's C
  compiler against ``Python.h`` (and on a GPU, libcuda): built here once, with Triton's own builder;
- NCCL: an interface named by NCCL_SOCKET_IFNAME, or an InfiniBand adapter named by NCCL_IB_HCA,
  exists on this node; the NCCL variables in effect are logged (a first job's log shows them);
- disk: the run dir has room for two checkpoints (the one written and the one kept).

Each problem is one line naming what to do; :func:`check_node` raises :class:`ConfigError` (exit 2).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rnnpipe.pipeline.errors import ConfigError

log = logging.getLogger("rnnpipe")

# Bytes a checkpoint takes per parameter: fp32 master weights and Adam's two moments (12), the
# bf16 or fp32 module weights (2-4), under any ZeRO stage (sharded, the sum is the same).
CHECKPOINT_BYTES_PER_PARAM = 16

_LAUNCHER_PROBE = """#include <Python.h>
static struct PyModuleDef probe = {PyModuleDef_HEAD_INIT, "rnnpipe_preflight", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_rnnpipe_preflight(void) { return PyModule_Create(&probe); }
"""


def tasks_on_node(env: Mapping[str, str]) -> int | None:
    """How many ranks run on this node: torchrun's LOCAL_WORLD_SIZE, or Slurm's tasks per node
    (``SLURM_TASKS_PER_NODE`` is ``8(x2),4``: this node's entry is the first for node 0...)."""
    if env.get("LOCAL_WORLD_SIZE"):
        return int(env["LOCAL_WORLD_SIZE"])
    if env.get("SLURM_NTASKS_PER_NODE"):
        return int(env["SLURM_NTASKS_PER_NODE"])
    spec = env.get("SLURM_TASKS_PER_NODE", "")
    node = int(env.get("SLURM_NODEID", "0"))
    for count, _, repeat in re.findall(r"(\d+)(\(x(\d+)\))?", spec):
        n = int(repeat or 1)
        if node < n:
            return int(count)
        node -= n
    return None


def check_gpus(
    env: Mapping[str, str], cuda_available: bool, visible: int, torch_cuda: str | None
) -> list[str]:
    """GPUs asked for and seen: ``visible`` devices, ``torch_cuda`` the CUDA version torch was
    built for (None for a CPU build)."""
    asked = int(env.get("SLURM_GPUS_ON_NODE") or 0) or len(
        [g for g in env.get("SLURM_JOB_GPUS", "").split(",") if g]
    )
    if not cuda_available:
        if not asked:
            return []
        if torch_cuda is None:
            return [
                f"the job has {asked} GPU(s) on this node but torch is a CPU build: install a CUDA build "
                "of torch in the environment the job runs (pip install torch --index-url "
                "https://download.pytorch.org/whl/cu128)"
            ]
        return [
            f"the job has {asked} GPU(s) on this node but torch (CUDA {torch_cuda}) sees none: "
            "check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES="
            f"{env.get('CUDA_VISIBLE_DEVICES', '(unset)')}"
        ]
    tasks = tasks_on_node(env)
    if tasks and visible not in (1, tasks) and visible < tasks:
        return [
            f"{tasks} ranks on this node but each sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
            f"{env.get('CUDA_VISIBLE_DEVICES', '(unset)')}): ranks would share GPUs; ask Slurm for one GPU "
            "per task (--gpus-per-task=1) or every GPU of the node (--gpus-per-node with --gpu-bind=none)"
        ]
    return []


def check_triton_launcher() -> list[str]:
    """Build a tiny C extension the way Triton builds its launcher (its compiler choice, include
    directories and cache): a missing compiler or ``Python.h`` shows here, not at the first step."""
    try:
        from triton.runtime.build import compile_module_from_src
    except ImportError:
        return []  # no Triton: the recurrences run their PyTorch paths
    try:
        compile_module_from_src(_LAUNCHER_PROBE, "rnnpipe_preflight")
    except Exception as e:
        include = sysconfig.get_paths()["include"]
        cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang") or "none found"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return [
            f"Triton cannot build its kernel launcher on this node ({first}; C compiler: {cc}; Python "
            f"headers: {include}): load a compiler module, or install the python3-dev headers"
        ]
    return []


def check_nccl(
    env: Mapping[str, str], net: Path = Path("/sys/class/net"), ib: Path = Path("/sys/class/infiniband")
) -> list[str]:
    """NCCL_SOCKET_IFNAME and NCCL_IB_HCA name what this node has (NCCL's syntax: prefixes, ``^``
    to exclude, ``=`` for exact names, ``:port`` after an adapter)."""
    problems = []
    ifname = env.get("NCCL_SOCKET_IFNAME", "")
    if ifname and not ifname.startswith("^") and net.is_dir():
        names = [p.name for p in net.iterdir()]
        wanted = [w for w in ifname.lstrip("=").split(",") if w]
        exact = ifname.startswith("=")
        if not any(n == w if exact else n.startswith(w) for w in wanted for n in names):
            problems.append(
                f"NCCL_SOCKET_IFNAME={ifname} names no interface of this node (it has "
                f"{', '.join(sorted(names))})"
            )
    hca = env.get("NCCL_IB_HCA", "")
    if hca and not hca.startswith("^") and ib.is_dir():
        names = [p.name for p in ib.iterdir()]
        wanted = [w.split(":")[0] for w in hca.lstrip("=").split(",") if w]
        if not any(n.startswith(w) for w in wanted for n in names):
            problems.append(
                f"NCCL_IB_HCA={hca} names no InfiniBand adapter of this node (it has "
                f"{', '.join(sorted(names)) or 'none'})"
            )
    return problems


def check_disk(run_dir: str, params: int) -> list[str]:
    """Room for two checkpoints of a model of ``params`` parameters under ``run_dir``."""
    need = 2 * params * CHECKPOINT_BYTES_PER_PARAM
    path = Path(run_dir)
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    if free < need:
        return [
            f"{run_dir}: {free / 2**30:.1f} GiB free, a checkpoint of {params / 1e6:.0f}M parameters takes "
            f"{need / 2 / 2**30:.1f} GiB and two are kept while one is written: free space, or use "
            "another run_dir"
        ]
    return []


def check_node(cfg: Any, env: Mapping[str, str] | None = None) -> None:
    """Every check above, for this rank's node (the disk and the launcher once per node: local
    rank 0); ConfigError with the first problem and how many there are."""
    import torch

    from rnnpipe.pipeline.data.manifest import read_manifest
    from rnnpipe.pipeline.models.flops import model_params

    env = os.environ if env is None else env
    local_rank = int(env.get("LOCAL_RANK") or env.get("SLURM_LOCALID") or 0)
    problems = check_gpus(env, torch.cuda.is_available(), torch.cuda.device_count(), torch.version.cuda)
    problems += check_nccl(env)
    if local_rank == 0:
        if cfg.model.kind.value != "huggingface":  # (a backbone's size is its own config's)
            vocab = int(read_manifest(cfg.data.path)["tokenizer"]["vocab_size"])
            problems += check_disk(cfg.run_dir, model_params(cfg.model, cfg.model.vocab_size or vocab))
        if torch.cuda.is_available():
            problems += check_triton_launcher()
            nccl = {k: v for k, v in sorted(env.items()) if k.startswith(("NCCL_", "TORCH_NCCL_"))}
            log.info(
                "preflight: NCCL settings: %s", ", ".join(f"{k}={v}" for k, v in nccl.items()) or "none set"
            )
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise ConfigError(f"preflight: {problems[0]}{more}")
