"""The first job on a new cluster (``slurm/first-contact.sbatch``): what the network and the training
loop actually do there, in one table, before anyone spends a week of GPU time.

    python -P -m rnnpipe.launch.commands.first_contact allreduce OUT    # every rank of a srun step
    python -P -m rnnpipe.launch.commands.first_contact report OUT       # after the runs: OUT/first-contact.md

``allreduce`` times NCCL's (gloo's, on CPU) all-reduce over the job's ranks for message sizes from
1 MiB to 1 GiB (RNNPIPE_ALLREDUCE_MIB=1,16 for others) and writes ``OUT/allreduce-<world>.json``:
per size the time and the bus bandwidth (nccl-tests' definition: algorithm bandwidth × 2(n−1)/n,
what each link carries). ``report`` joins those with the pretrain runs under ``OUT/runs/`` (their
``metrics.jsonl``: tokens/s, MFU, step time, memory, after the first logged steps, which include
compilation and warm-up).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

SIZES_MIB = (1, 4, 16, 64, 256, 1024)


def bus_bandwidth(nbytes: int, seconds: float, world: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce of ``nbytes`` in ``seconds`` over ``world`` ranks,
    in GB/s: the algorithm bandwidth (bytes / time) × 2(n−1)/n."""
    if world < 2 or seconds <= 0:
        return 0.0
    return nbytes / seconds * 2 * (world - 1) / world / 1e9


def allreduce(out: str, sizes_mib: tuple[float, ...] = SIZES_MIB, repeats: int = 20) -> dict[str, Any] | None:
    """Time the all-reduce on this rank's process group (set up by
    :func:`rnnpipe.launch.processes.distributed.init`); rank 0 writes and returns the rows, the
    others None."""
    import torch
    import torch.distributed as dist

    from rnnpipe.launch.processes import distributed

    distributed.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    rows = []
    for mib in sizes_mib:
        n = int(mib * 2**20) // torch.tensor([], dtype=dtype).element_size()
        x = torch.ones(n, dtype=dtype, device=device)
        for _ in range(3):  # warm-up: NCCL sets up its channels at the first calls
            dist.all_reduce(x)
        _sync(device)
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            _sync(device)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a collective is as fast as its slowest rank
        seconds = float(slowest.item())
        nbytes = n * x.element_size()
        rows.append(
            {"bytes": nbytes, "ms": seconds * 1e3, "busbw_gbs": bus_bandwidth(nbytes, seconds, world)}
        )
    result = {
        "world": world,
        "nodes": int(os.environ.get("SLURM_NNODES", "1")),
        "backend": dist.get_backend(),
        "dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
    }
    distributed.shutdown()
    if rank != 0:
        return None
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"allreduce-{world}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _sync(device: Any) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


def run_figures(run_dir: Path, skip: int = 1) -> dict[str, float] | None:
    """A pretrain run's median tokens/s, MFU, step time and peak memory over its logged steps after
    the first ``skip`` (compilation, warm-up); None where it logged none."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    steps = [m for m in map(json.loads, path.read_text().splitlines()) if "train/tokens_per_s" in m][skip:]
    if not steps:
        return None

    def median(key: str) -> float:
        return statistics.median(m[key] for m in steps if key in m)

    return {
        "steps": len(steps),
        "tokens_per_s": median("train/tokens_per_s"),
        "mfu": median("train/mfu"),
        "step_s": median("train/step_time_s"),
        "memory_gb": max(m.get("train/memory_gb", math.nan) for m in steps),
    }


def report(out: str) -> str:
    """The table of what the job measured: ``OUT/first-contact.md`` (also returned)."""
    root = Path(out)
    lines = ["# First contact", "", "## All-reduce (median of 20, the slowest rank's)", ""]
    lines += [
        "| ranks | nodes | backend | size | time (ms) | bus bandwidth (GB/s) |",
        "|---|---|---|---|---|---|",
    ]
    for file in sorted(root.glob("allreduce-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        r = json.loads(file.read_text())
        for row in r["rows"]:
            size = f"{row['bytes'] / 2**20:g} MiB"
            cells = [
                r["world"],
                r["nodes"],
                r["backend"],
                size,
                f"{row['ms']:.3f}",
                f"{row['busbw_gbs']:.1f}",
            ]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "## Pretraining (median over the logged steps after the first)", ""]
    lines += [
        "| run | logged steps | tokens/s | MFU | step (s) | peak memory (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for run in sorted(p for p in (root / "runs").glob("*") if p.is_dir()):
        f = run_figures(run)
        if f is None:
            lines.append(f"| {run.name} | — (no steps logged: see its log) | | | | |")
            continue
        lines.append(
            f"| {run.name} | {f['steps']} | {f['tokens_per_s']:,.0f} | {100 * f['mfu']:.1f}% | "
            f"{f['step_s']:.3f} | {f['memory_gb']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    (root / "first-contact.md").write_text(text)
    return text


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("allreduce", "report"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    if argv[0] == "allreduce":
        from rnnpipe.launch.processes.distributed import setup_logging

        setup_logging()
        sizes = os.environ.get("RNNPIPE_ALLREDUCE_MIB")
        allreduce(argv[1], tuple(float(s) for s in sizes.split(",")) if sizes else SIZES_MIB)
    else:
        print(report(argv[1]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
