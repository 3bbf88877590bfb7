"""One prepared GPU check: how a rank starts on a node, the Triton kernels and their speed beside
the peers, the real pretrain loop (DeepSpeed, ZeRO-0 and ZeRO-1, resume, torch.compile, shuffle
mode) and the tinyshakespeare GPU twin, in one command that ends within 8 minutes on one H100 or H200.

    python benchmarks/gpu_check.py --out DIR [--data PATH/input.txt] [--enwik8 PATH] [--work DIR]
                                   [--budget-s 450] [--sections start,loop,...]
    python benchmarks/gpu_check.py --out DIR --dry-run      # tiny shapes on CPU (Triton's interpreter)

Writes ``DIR/gpu_check.md`` (the tables) and ``DIR/gpu_check.json`` (the same numbers). Sections,
with their nominal seconds on one H100 (450 in all; the 8 minutes leave about 30 s for Python's
start, the peers' imports and the report). The nominal seconds are estimates until a GPU run
replaces them (each DeepSpeed run: about 15-20 s to start, its steps, a checkpoint of 0.8 GB):

- ``start`` (15 s): a rank started as a Slurm task's second (LOCAL_RANK=1, SLURM_LOCALID=1, one
  GPU in CUDA_VISIBLE_DEVICES) runs ``rnnpipe.launch.processes.distributed.init`` with an explicit timeout:
  the device it chose, the process group's backend and timeout, an all-reduce; the compute-node
  preflight's ``check_gpus``, ``check_triton_launcher`` and ``check_nccl`` with their findings;
- ``kernels`` (45 s): the Triton kernels, compiled, against the PyTorch reference
  (kernels/reference.py) at real shapes: values and gradients, fp32 and bf16, pass/fail;
- ``mingru_bf16`` (10 s): minGRU and minLSTM in bf16 over 10,240 carried tokens with a decay of
  1 − σ(−7) (1.0 in bf16) through Triton's scan: mean |h| against fp32;
- ``speed`` (45 s): forward + backward time and GB/s against the device's copy bandwidth, beside
  flash-linear-attention's ``chunk_hgrn`` / ``fused_recurrent_hgrn`` and accelerated-scan's
  ``warp`` scan when installed (optional; rows say "not installed" otherwise);
- ``lm`` (30 s): tokens/s, MFU and peak memory of the 50M and 350M configs under bf16 autocast
  without DeepSpeed (forward + backward + AdamW on random tokens) against docs/pretrain.md's
  memory estimates;
- ``loop`` (70 s): the 50M config through ``rnnpipe pretrain --executor inline`` (DeepSpeed, bf16,
  world 1) at ZeRO-0 and ZeRO-1 on a byte dataset: tokens/s, MFU, peak memory, and torch.profiler's
  split of a step into recurrence, matmul, optimizer, other device time and host time;
- ``resume`` (60 s): N steps against N/2 steps killed after a checkpoint and resumed to N: the
  losses of steps N/2 + 1 .. N bit for bit on CUDA (and of steps 1 .. N/2: run-to-run determinism);
- ``compile`` (80 s): ``train.compile=true`` with inductor: it compiles, the loss falls, tokens/s
  beside the uncompiled run's;
- ``shuffle`` (35 s): ``data.mode=shuffle`` with 4 DataLoader workers: it trains, tokens/s;
- ``twin`` (60 s, what the others leave): configs/pretrain/tinyshakespeare-gpu.yaml through
  ``rnnpipe prepare`` and ``rnnpipe pretrain --executor inline``, its valid loss beside nanoGPT's
  published 1.4697 (a check only with 150 s of training or more: ``--sections twin`` alone gives it
  about 3 minutes).

Each section runs under its own time limit (a SIGALRM interrupts it, and the commands it started
are killed) inside ``--budget-s``: up to 1.5 times its nominal seconds while the sections after it
keep 70 % of theirs (the twin: whatever is left). One that fails or runs out of time records its
error and the script goes on. ``--dry-run`` runs the same code at tiny shapes on CPU:
``TRITON_INTERPRET=1`` is set here, before anything imports Triton; the runs use gloo, a 2-layer
64-wide model, a few steps, and torch.compile's aot_eager backend (inductor's C++ takes minutes on
CPU); the limits are doubled.
"""

from __future__ import annotations

import os
import sys

DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN:  # Triton reads this when it is first imported: it must come before every import below
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

import gpu_check_kernels  # noqa: E402
import gpu_check_loop  # noqa: E402
import gpu_check_mingru  # noqa: E402
import gpu_check_start  # noqa: E402
import gpu_check_train  # noqa: E402
import torch  # noqa: E402

# (name, title, nominal seconds on one H100/H200). Their sum stays within the default budget, which
# leaves about 30 s of the 8 minutes for Python's start and writing the report.
SECTIONS: list[tuple[str, str, float]] = [
    ("start", "(a) A rank with LOCAL_RANK=1 and one visible GPU starts; the node preflight", 15.0),
    ("kernels", "(b) Triton kernels against the PyTorch reference", 45.0),
    ("mingru_bf16", "(c) minGRU/minLSTM in bf16 over a long carried stream", 10.0),
    ("speed", "(d) Forward + backward speed against the copy bandwidth and the peers", 45.0),
    ("lm", "(e) LM training speed and memory under autocast, no DeepSpeed", 30.0),
    ("loop", "(f) The real pretrain loop at 50M: ZeRO-0 and ZeRO-1, a step's profile", 70.0),
    ("resume", "(g) Checkpoint, kill, resume: the same losses bit for bit", 60.0),
    ("compile", "(h) train.compile=true with inductor", 80.0),
    ("shuffle", "(i) Shuffle mode with DataLoader workers", 35.0),
    ("twin", "(j) The tinyshakespeare GPU twin against nanoGPT", 60.0),
]
OVERRUN = 1.5  # a section may run to this many times its nominal seconds ...
KEEP = 0.7  # ... while the sections after it keep this share of theirs
DRY_SLACK = 2.0  # the dry run's limits: CI's CPUs are slow and shared


class SectionTimeout(Exception):
    """Raised by the alarm when a section runs past its limit."""


def _alarm(signum: int, frame: Any) -> None:
    raise SectionTimeout("ran past its time limit")


def run_section(fn: Callable[[dict[str, Any]], None], limit_s: float) -> dict[str, Any]:
    """Run one section under a hard time limit (SIGALRM); never raises.

    ``fn`` fills the dict it is given (``rows``, ``checks``, ``notes``) as it goes, so what it
    measured before a failure or the alarm is kept. Returns that dict with ``status`` (ok | failed
    | timeout), ``error``, ``seconds`` and ``limit_s`` added."""
    started = time.perf_counter()
    out: dict[str, Any] = {"rows": [], "checks": [], "notes": []}
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, limit_s))
    try:
        fn(out)
        out["status"], out["error"] = "ok", ""
    except SectionTimeout as e:
        out["status"], out["error"] = "timeout", f"{e} ({limit_s:.0f} s)"
    except Exception as e:  # a section's failure is a result: record it and go on
        if "SectionTimeout" in repr(e):  # the alarm, wrapped (Triton's interpreter re-raises it)
            out["status"], out["error"] = "timeout", f"ran past its time limit ({limit_s:.0f} s)"
        else:
            out["status"], out["error"] = "failed", f"{type(e).__name__}: {e}"
            traceback.print_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    out["seconds"] = round(time.perf_counter() - started, 2)
    out["limit_s"] = round(limit_s, 1)
    return out


def section_limit(i: int, wanted: set[str], left: float, dry: bool) -> float:
    """Seconds section ``i`` may run: up to OVERRUN × its nominal seconds, as long as the wanted
    sections after it keep KEEP of theirs (the twin takes what the others left: its training is
    sized from its limit); at least half its nominal seconds, at most what is ``left``."""
    name, _, nominal = SECTIONS[i]
    if name == "twin":
        return left
    later = sum(s[2] for s in SECTIONS[i + 1 :] if s[0] in wanted)
    limit = min(OVERRUN * nominal, max(0.5 * nominal, left - KEEP * later))
    return min(left, DRY_SLACK * limit if dry else limit)


def describe_device(dev: torch.device) -> str:
    """The device in words: the GPU's name, memory and SM count, or the CPU."""
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), dry run"


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "pass" if v else "**FAIL**"
    if isinstance(v, float):  # 5 significant digits; thousands separated; tiny ones scientific
        if v != v:  # NaN
            return "nan"
        if abs(v) >= 1e4:
            return f"{v:,.0f}"
        if v == 0 or abs(v) >= 1e-3:
            return f"{v:.5g}"
        return f"{v:.2e}"
    if isinstance(v, list | tuple):
        return "×".join(str(x) for x in v)
    return "–" if v is None or v == "" else str(v).replace("|", "/")


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a header, then one table per section with its status and time."""
    lines = [
        "# GPU check",
        "",
        f"- device: {report['device']}",
        f"- torch {report['torch']}, triton {report['triton']}, python {report['python']}",
        f"- command: `{report['command']}`",
        f"- total: {report['total_s']:.0f} s of a {report['budget_s']:.0f} s budget; "
        f"all checks passed: {report['all_passed']}",
        "",
    ]
    for name, title, _ in SECTIONS:
        sec = report["sections"][name]
        status = f"status: {sec['status']}, {sec['seconds']:.1f} s of {sec['limit_s']:.0f} s"
        if sec.get("error"):
            status += f"; error: `{sec['error']}`"
        lines += [f"## {title}", "", status]
        for note in sec.get("notes", []):
            lines += ["", f"- {note}"]
        rows = sec.get("rows", [])
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            header = [c.replace("|", "\\|") for c in cols]  # (a column named "mean |h|")
            lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="where gpu_check.md and gpu_check.json go")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton's interpreter)")
    parser.add_argument("--data", type=Path, help="tinyshakespeare's input.txt (the twin section)")
    parser.add_argument(
        "--enwik8",
        type=Path,
        help="enwik8-head's text for the byte-level runs (default: the twin's text read as bytes)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="the datasets and runs (default: OUT/work; keep it off a device's $OUT)",
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="all sections together (seconds)")
    parser.add_argument("--sections", default=",".join(s[0] for s in SECTIONS), help="comma-separated")
    args = parser.parse_args(argv)
    if args.dry_run != DRY_RUN:  # main() called in-process with other arguments than the script's
        parser.error("--dry-run must be on the command line (TRITON_INTERPRET is set before imports)")
    unknown = set(args.sections.split(",")) - {s[0] for s in SECTIONS}
    if unknown:
        names = ", ".join(s[0] for s in SECTIONS)
        parser.error(f"--sections: no section {', '.join(sorted(unknown))} (there are {names})")
    return args


def runners(ctx: dict[str, Any]) -> dict[str, Callable[[dict[str, Any]], None]]:
    """Each section's function of its result dict."""
    return {
        "start": lambda out: gpu_check_start.start_section(ctx, out),
        "kernels": lambda out: gpu_check_kernels.accuracy_section(ctx, out),
        "mingru_bf16": lambda out: gpu_check_mingru.mingru_section(ctx, out),
        "speed": lambda out: gpu_check_kernels.speed_section(ctx, out),
        "lm": lambda out: gpu_check_train.lm_section(ctx, out),
        "loop": lambda out: gpu_check_loop.loop_section(ctx, out),
        "resume": lambda out: gpu_check_loop.resume_section(ctx, out),
        "compile": lambda out: gpu_check_loop.compile_section(ctx, out),
        "shuffle": lambda out: gpu_check_loop.shuffle_section(ctx, out),
        "twin": lambda out: gpu_check_train.twin_section(ctx, out),
    }


def run_sections(ctx: dict[str, Any], wanted: set[str], budget_s: float, started: float) -> dict[str, Any]:
    """Every section in order, each under its limit (:func:`section_limit`); name -> its result."""
    results: dict[str, Any] = {}
    run = runners(ctx)
    for i, (name, title, _) in enumerate(SECTIONS):
        left = budget_s - (time.perf_counter() - started)
        if name not in wanted:
            results[name] = {
                "status": "skipped",
                "error": "not in --sections",
                "seconds": 0.0,
                "limit_s": 0.0,
            }
            continue
        if left < 5:
            results[name] = {"status": "timeout", "error": "no budget left", "seconds": 0.0, "limit_s": 0.0}
            continue
        limit = section_limit(i, wanted, left, ctx["dry_run"])
        ctx["limit_s"] = limit
        ctx["section_deadline"] = time.perf_counter() + limit
        print(f"gpu_check: {title} (limit {limit:.0f} s)", flush=True)
        sec = run_section(run[name], limit)
        ctx["results"][name] = results[name] = sec
        print(
            f"gpu_check: {name}: {sec['status']} in {sec['seconds']:.1f} s {sec.get('error', '')}", flush=True
        )
        if ctx["device"].type == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    dev = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if dev.type == "cpu" and not args.dry_run:
        print("gpu_check: no CUDA device; this runs everything on CPU (use --dry-run for tiny shapes)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    ctx = {"device": dev, "dry_run": args.dry_run, "data": args.data, "work": work, "results": {}}
    ctx["enwik8"] = args.enwik8
    import triton

    gpu_check_kernels.start_peer_builds(ctx)

    report: dict[str, Any] = {
        "device": describe_device(dev),
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv or sys.argv[1:])]),
        "budget_s": args.budget_s,
    }
    report["sections"] = run_sections(ctx, set(args.sections.split(",")), args.budget_s, started)
    report["total_s"] = round(time.perf_counter() - started, 1)
    checks = [c for s in report["sections"].values() for c in s.get("checks", [])]
    report["all_passed"] = (
        bool(checks)
        and all(c["pass"] for c in checks)
        and all(s["status"] in ("ok", "skipped") for s in report["sections"].values())
    )
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(f"gpu_check: wrote {args.out / 'gpu_check.md'} and gpu_check.json in {report['total_s']:.0f} s")
    return 0 if report["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
