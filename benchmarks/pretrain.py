"""Benchmark the pretrain stage: tokens/s and MFU of LRN, minGRU and transformer LMs of equal
parameter count, and the enwik8-head valid bits per byte each reaches in the same wall-clock budget.

    python benchmarks/pretrain.py --data ../shared/data [--budget-min 3] [--write docs/benchmarks.md]

Each run is a real ``rnnpipe pretrain`` (DeepSpeed, one process) on enwik8-head as bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.kernels import machine, replace_section, width_for  # noqa: E402
from pipeline.models import MixerKind  # noqa: E402

MIXERS = (MixerKind.lrn, MixerKind.mingru, MixerKind.attention)


def pretrain(run_dir: Path, data: Path, kind: MixerKind, d: int, seq_len: int, *extra: str) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "launch",
        "-q",
        "pretrain",
        str(REPO / "configs/pretrain/tiny-lrn.yaml"),
        f"run_dir={run_dir}",
        f"data.path={data}",
        f"model.mixer={kind.value}",
        "model.n_layers=4",
        f"model.d_model={d}",
        "model.mlp_ratio=4.0",
        "model.n_heads=4",
        "model.dropout=0.0",
        f"data.seq_len={seq_len}",
        f"data.batch_size={max(1, 8192 // seq_len)}",
        "train.eval_batch_size=8",
        "train.sample_tokens=0",
        "train.checkpoint_every=0",
        "--executor",
        "inline",
        *extra,
    ]
    subprocess.run(cmd, check=True, env={**os.environ, "RNNPIPE_PROGRESS": "0"})
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--budget-min", type=float, default=3.0)
    parser.add_argument("--params", type=int, default=3_000_000)
    parser.add_argument("--write")
    args = parser.parse_args()
    src = Path(args.data) / "enwik8-head" / "enwik8-head.txt"
    rows, budget_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "launch",
                "-q",
                "prepare",
                str(REPO / "configs/prepare/enwik8-head.yaml"),
                f"output={data}",
                f"source.paths=[{src}]",
                "--executor",
                "inline",
            ],
            check=True,
            env={**os.environ, "RNNPIPE_PROGRESS": "0"},
        )
        for seq_len in (512, 2048):
            for kind in MIXERS:
                d = width_for(kind, args.params, 4, 256)
                m = pretrain(
                    Path(tmp) / f"{kind.value}-{seq_len}",
                    data,
                    kind,
                    d,
                    seq_len,
                    f"train.steps={args.steps}",
                    "train.log_every=5",
                    "train.eval_every=0",
                    "train.eval_max_tokens=20000",
                    "optim.warmup_steps=5",
                )
                logged = [x for x in m if "train/tokens_per_s" in x][1:]  # the first window includes warm-up
                tok = statistics.median(x["train/tokens_per_s"] for x in logged)
                mfu = statistics.median(x["train/mfu"] for x in logged)
                rows.append(f"| {kind.value} | {d} | {seq_len} | {tok:,.0f} | {100 * mfu:.1f} % |")
                print(rows[-1], flush=True)
        for kind in MIXERS:
            d = width_for(kind, args.params, 4, 256)
            m = pretrain(
                Path(tmp) / f"{kind.value}-budget",
                data,
                kind,
                d,
                512,
                "train.steps=1000000",
                f"train.time_limit_min={args.budget_min}",
                "train.log_every=50",
                "train.eval_every=0",
                "optim.warmup_steps=50",
            )
            final = [x for x in m if "valid/bpb" in x][-1]
            budget_rows.append(f"| {kind.value} | {d} | {final['step']} | {final['valid/bpb']:.3f} |")
            print(budget_rows[-1], flush=True)
    body = "\n".join(
        [
            f"One process on {machine()}, DeepSpeed ZeRO-0, fp32, 4 layers, MLP ratio 4, about "
            f"{args.params / 1e6:.0f} M parameters each, 8,192 tokens per step, median of the logged "
            f"windows after the first of {args.steps} steps. MFU: against a measured float32 matmul rate "
            "on this CPU.",
            "",
            "| mixer | d_model | seq_len | tokens/s | MFU |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"The same models for {args.budget_min:g} minutes of training each (seq_len 512), then valid "
            "bits per byte over the whole enwik8-head valid split (207,703 bytes; state carried through "
            "8 streams):",
            "",
            "| mixer | d_model | steps in the budget | valid bits per byte |",
            "|---|---|---|---|",
            *budget_rows,
        ]
    )
    print(body)
    if args.write:
        replace_section(
            Path(args.write), "<!-- pretrain-benchmark:begin -->", "<!-- pretrain-benchmark:end -->", body
        )


if __name__ == "__main__":
    main()
