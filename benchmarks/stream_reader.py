"""The pretrain stream reader: sample reads and milliseconds per step at 16, 64 and 128 streams,
and what opening a split costs.

    python benchmarks/stream_reader.py [--streams 16 64 128] [--seq-len 512] [--steps 200]

Prepares a bytes dataset with enwik8's layout (65,536-token samples, 64 KB each; configs/prepare/
enwik8.yaml) from a synthetic corpus (``--mb``, default 33.5 MB: 128 streams of about four
samples) in a temporary directory, or reads ``--data DIR``. For each stream count it runs one rank's
``StreamBatches`` (world 1, ``--seq-len`` tokens per step) and reports, over ``--steps`` steps after
the first (which reads every stream's first sample):

- sample reads per step: opens of a shard file (each is one open and one 64 KB read), against
  the sample crossings the streams make (a stream entering its next sample needs one read);
- ms per step spent reading (``next()`` of the plain reader), the best of ``--repeats`` runs;
- with the prefetching reader (where this code has it), the ms per step the loop still waits when
  each step takes ``--step-ms`` (a sleep, which releases the GIL as a GPU step's wait does).

Then the open of the training split: wall time and file opens (a header scan opens every shard;
the sample index is one file), on that dataset and on the same corpus cut into 512-token samples
(``--open-sample-tokens``: about 65,000 training samples, as many as a 4.5B-token Wikipedia has of
65,536 tokens). Not a test: the numbers depend on the machine and the page cache
(every read here hits it; a shared filesystem makes each read dearer).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fsspec.implementations.local import LocalFileSystem

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("RNNPIPE_PROGRESS", "0")

from rnnpipe.launch.cli import main as cli  # noqa: E402
from rnnpipe.pipeline.data.reader import SplitReader  # noqa: E402
from rnnpipe.pipeline.train import data as train_data  # noqa: E402


class Opens:
    """Counts the files fsspec's local filesystem opens (every shard and index read goes through it)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._orig = LocalFileSystem._open

    def __enter__(self) -> Opens:
        orig, paths = self._orig, self.paths

        def counting(fs, path, *args, **kwargs):
            paths.append(str(path))
            return orig(fs, path, *args, **kwargs)

        LocalFileSystem._open = counting
        return self

    def __exit__(self, *exc) -> None:
        LocalFileSystem._open = self._orig

    def count(self, suffix: str) -> int:
        return sum(p.endswith(suffix) for p in self.paths)


def build(out: Path, mb: float, sample_tokens: int = 65536) -> Path:
    """A bytes dataset of ``mb`` MB of random printable text in ``out/data-<sample_tokens>``
    (65,536: enwik8's sample size)."""
    corpus = out / "corpus.txt"
    if not corpus.exists():
        rng = np.random.default_rng(0)
        corpus.write_bytes(rng.integers(32, 127, int(mb * 1e6), dtype=np.uint8).tobytes())
    root = out / f"data-{sample_tokens}"
    code = cli(
        [
            "prepare",
            str(REPO / "configs/prepare/enwik8-head.yaml"),
            f"output={root}",
            f"source.paths=[{corpus}]",
            "source.unit_mb=8",
            "shards.shard_mb=16",
            f"shards.sample_tokens={sample_tokens}",
            "--executor",
            "inline",
        ]
    )
    if code:
        sys.exit(f"prepare failed ({code})")
    return root


def crossings(batches, steps: range) -> int:
    """Sample reads the streams need over ``steps``: each stream's new samples (its first one
    counted at the first step of the range only if it is step 0)."""
    n = batches.reader.sample_tokens
    T = batches.seq_len
    need = 0
    for j in range(batches.streams):
        lo, hi = int(batches.bounds[j]), int(batches.bounds[j + 1])
        seen: set[int] = set()
        for k in range(steps.start - 1 if steps.start else 0, steps.stop):
            a = lo + k * T
            b = min(a + T, hi)
            if b > a:
                new = set(range(a // n, b // n + 1))  # tokens [a, b] (inputs and targets)
                if k >= steps.start:
                    need += len(new - seen)
                seen = new
    return need


def measure(root: Path, streams: int, seq_len: int, steps: int, step_ms: float) -> dict[str, float]:
    reader = SplitReader(str(root), "train")
    batches = train_data.StreamBatches(reader, 0, 1, streams, seq_len)
    steps = min(steps, batches.steps_per_epoch - 1)
    next(batches)  # every stream's first sample
    with Opens() as opens:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            next(batches)
            times.append(time.perf_counter() - t)
    out = {
        "reads": opens.count(".tar") / steps,
        "need": crossings(batches, range(1, steps + 1)) / steps,
        "ms": 1e3 * statistics.fmean(times),
        "steps": steps,
    }
    prefetched = getattr(train_data, "PrefetchedBatches", None)
    if prefetched is not None and step_ms > 0:
        loader = prefetched(train_data.StreamBatches(SplitReader(str(root), "train"), 0, 1, streams, seq_len))
        next(loader)
        waits = []
        for _ in range(steps):
            time.sleep(step_ms / 1e3)  # the step: the GPU computes, the host waits
            t = time.perf_counter()
            next(loader)
            waits.append(time.perf_counter() - t)
        out["exposed_ms"] = 1e3 * statistics.fmean(waits)
    return out


def open_cost(root: Path, repeats: int) -> tuple[float, int, int, int]:
    """(ms to open the training split, files opened, of them shards, samples)."""
    best = math.inf
    for _ in range(repeats):
        with Opens() as opens:
            t = time.perf_counter()
            reader = SplitReader(str(root), "train")
            best = min(best, time.perf_counter() - t)
    return 1e3 * best, len(opens.paths), opens.count(".tar"), reader.sample_count()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", help="a prepared dataset (default: build one in a temporary directory)")
    parser.add_argument("--mb", type=float, default=33.5, help="size of the synthetic corpus")
    parser.add_argument("--streams", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=5.0, help="simulated step for the prefetch row")
    parser.add_argument("--open-sample-tokens", type=int, default=512, help="0: no second dataset")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else build(Path(tmp), args.mb)
        cpu = "unknown CPU"
        if Path("/proc/cpuinfo").exists():
            m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
            cpu = m.group(1).strip() if m else cpu
        print(
            f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}; seq_len {args.seq_len}, "
            f"{args.steps} steps after the first, best of {args.repeats}"
        )
        waits = f"loop waits with prefetch ({args.step_ms:g} ms steps), ms / step"
        print(f"| streams | sample reads / step | crossings / step | read ms / step | {waits} |")
        print("|---|---|---|---|---|")
        for _ in range(args.repeats):  # warm-up, not shown: the first runs of a process are slower
            measure(root, args.streams[0], args.seq_len, args.steps, 0)
        for streams in args.streams:
            runs = [
                measure(root, streams, args.seq_len, args.steps, args.step_ms) for _ in range(args.repeats)
            ]
            best = min(runs, key=lambda r: r["ms"])
            exposed = f"{min(r['exposed_ms'] for r in runs):.3f}" if "exposed_ms" in best else "–"
            print(
                f"| {streams} | {best['reads']:.2f} | {best['need']:.2f} | {best['ms']:.3f} | {exposed} |",
                flush=True,
            )
        roots = [root]
        if args.open_sample_tokens and not args.data:
            roots.append(build(Path(tmp), args.mb, args.open_sample_tokens))
        for r in roots:
            ms, opened, shards, samples = open_cost(r, args.repeats)
            print(
                f"open of the training split ({samples:,} samples): {ms:.1f} ms, {opened} file(s) "
                f"opened ({shards} shard(s)); {1e3 * ms / samples:.1f} µs per sample",
                flush=True,
            )


if __name__ == "__main__":
    main()
