"""Benchmark the prepare stage: MB/s of input for bytes and sentencepiece, 1 and 2 workers.

    python benchmarks/prepare.py --data ../shared/data [--write docs/benchmarks.md]

Beside it, the raw read speed of the same file (the limit no stage can beat) and sha256 speed.
Each configuration runs ``--repeats`` times into a fresh directory; the table shows the median
wall time and a per-stage breakdown of that run. Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RNNPIPE_PROGRESS", "0")

from rnnpipe.launch.processes.executors import make_executor  # noqa: E402
from rnnpipe.launch.stages.prepare import PrepareJob, stage_config  # noqa: E402
from rnnpipe.pipeline.config import load_config  # noqa: E402
from rnnpipe.pipeline.data.prepare import prepare  # noqa: E402

BEGIN, END = "<!-- prepare-benchmark:begin -->", "<!-- prepare-benchmark:end -->"


class TimedExecutor:
    """Wraps an executor and records the wall time of each stage's map."""

    def __init__(self, inner):
        self.inner = inner
        self.stages: dict[str, float] = {}

    def map(self, fn, items, *, name, weights=None):
        t = time.perf_counter()
        try:
            return self.inner.map(fn, items, name=name, weights=weights)
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t


def raw_read(path: Path, repeats: int) -> tuple[float, float]:
    size = path.stat().st_size
    best_read = best_hash = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        with open(path, "rb") as f:
            while f.read(1 << 22):
                pass
        best_read = min(best_read, time.perf_counter() - t)
        t = time.perf_counter()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        best_hash = min(best_hash, time.perf_counter() - t)
    return size / best_read / 1e6, size / best_hash / 1e6


def run(
    src: Path, tokenizer: list[str], workers: int, repeats: int, unit_mb: float = 0.5
) -> tuple[float, dict]:
    times, breakdowns = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            job = load_config(
                PrepareJob,
                str(REPO / "configs/prepare/enwik8-head.yaml"),
                [
                    f"output={tmp}/d",
                    f"source.paths=[{src}]",
                    "source.unit_mb=0.5",
                    "executor.kind=local",
                    f"executor.workers={workers}",
                    *tokenizer,
                ],
            )
            t = time.perf_counter()
            with make_executor(job.executor, f"{tmp}/logs") as ex:
                timed = TimedExecutor(ex)
                prepare(stage_config(job), timed)
            times.append(time.perf_counter() - t)
            breakdowns.append(timed.stages)
    median = statistics.median(times)
    return median, breakdowns[times.index(min(times, key=lambda x: abs(x - median)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", help="markdown file to put the table in (between markers)")
    args = parser.parse_args()
    src = Path(args.data) / "enwik8-head" / "enwik8-head.txt"
    if not src.exists():
        sys.exit(f"needs {src}")
    size = src.stat().st_size
    read_mbs, hash_mbs = raw_read(src, 5)
    rows = [
        f"| raw read (4 MiB blocks, page cache) | – | – | {read_mbs:,.0f} | |",
        f"| sha256 of the file | – | – | {hash_mbs:,.0f} | |",
    ]
    configs = [
        ("bytes", ["tokenizer.kind=bytes"]),
        ("sentencepiece (unigram, 8192)", ["tokenizer.kind=sentencepiece", "tokenizer.vocab_size=8192"]),
    ]
    for label, overrides in configs:
        for workers in (1, 2):
            wall, stages = run(src, overrides, workers, args.repeats)
            detail = ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
            rows.append(f"| {label} | {workers} | {wall:.2f} | {size / wall / 1e6:.2f} | {detail} |")
            print(rows[-1], flush=True)
    # Fixed costs (starting workers, training the tokenizer) dominate 4 MB; 8 copies show throughput.
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "enwik8-head-x8"
        big.write_bytes(src.read_bytes() * 8)
        for label, overrides in configs:
            for workers in (1, 2):
                wall, stages = run(big, overrides, workers, 1, unit_mb=4)
                detail = ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
                rows.append(
                    f"| {label}, 8 copies ({8 * size / 1e6:.0f} MB, 4 MB units) | {workers} | "
                    f"{wall:.2f} | {8 * size / wall / 1e6:.2f} | {detail} |"
                )
                print(rows[-1], flush=True)
    cpu = "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    table = "\n".join(
        [
            BEGIN,
            f"enwik8-head ({size:,} bytes) on {cpu}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}; local executor, `source.unit_mb=0.5` "
            f"({-(-size // 500_000)} units), median of {args.repeats} runs. "
            "MB/s is input bytes over wall time, process start-up and tokenizer training included "
            "(the 8-copy rows: one run each).",
            "",
            "| configuration | workers | wall s | MB/s | stages (s) |",
            "|---|---|---|---|---|",
            *rows,
            END,
        ]
    )
    print(table)
    if args.write:
        path = Path(args.write)
        text = path.read_text() if path.exists() else ""
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + table + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip() + "\n\n" + table + "\n"
        path.write_text(text)


if __name__ == "__main__":
    main()
