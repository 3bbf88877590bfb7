"""One prepared GPU check: the Triton kernels, their speed beside the peers, LM training speed and
the tinyshakespeare GPU twin, in one command that ends within 8 minutes on one H100 or H200.

    python benchmarks/gpu_check.py --out DIR [--data PATH/input.txt] [--work DIR] [--budget-s 450]
    python benchmarks/gpu_check.py --out DIR --dry-run      # tiny shapes on CPU (Triton's interpreter)

Writes ``DIR/gpu_check.md`` (the tables) and ``DIR/gpu_check.json`` (the same numbers). Sections:

- ``kernels``: the Triton kernels, compiled, against the PyTorch reference (kernels/reference.py) at
  real shapes: values and gradients, fp32 and bf16, max abs and relative errors, pass/fail;
- ``speed``: forward + backward time and GB/s against the device's copy bandwidth, beside
  flash-linear-attention's ``chunk_hgrn`` / ``fused_recurrent_hgrn`` and accelerated-scan's
  ``warp`` scan when installed (optional; rows say "not installed" otherwise);
- ``lm``: training tokens/s, MFU and peak memory of the 50M and 350M configs in bf16 against
  docs/pretrain.md's memory estimates (forward + backward + AdamW on random tokens, no DeepSpeed);
- ``twin``: configs/pretrain/tinyshakespeare-gpu.yaml through ``rnnpipe prepare`` and ``rnnpipe
  pretrain --executor inline`` against nanoGPT's published 1.4697 val loss.

Each section runs under its own time limit (a SIGALRM interrupts it) inside ``--budget-s``; one
that fails or runs out of time records its error and the script goes on. ``--dry-run`` runs the
same code at tiny shapes on CPU: ``TRITON_INTERPRET=1`` is set here, before anything imports Triton.
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
import gpu_check_train  # noqa: E402
import torch  # noqa: E402

# (name, title, nominal seconds on one H100/H200). Their sum stays under the default budget, which
# leaves about 30 s of the 8 minutes for Python's start and writing the report.
SECTIONS: list[tuple[str, str, float]] = [
    ("kernels", "(a) Triton kernels against the PyTorch reference", 90.0),
    ("speed", "(b) Forward + backward speed against the copy bandwidth and the peers", 90.0),
    ("lm", "(c) LM training speed and memory, bf16, one GPU", 70.0),
    ("twin", "(d) The tinyshakespeare GPU twin against nanoGPT", 210.0),
]


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
            lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            lines += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="where gpu_check.md and gpu_check.json go")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (Triton's interpreter)")
    parser.add_argument("--data", type=Path, help="tinyshakespeare's input.txt (the twin section)")
    parser.add_argument(
        "--work",
        type=Path,
        help="the twin's dataset and run (default: OUT/work; keep it off a device's $OUT)",
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="all sections together (seconds)")
    parser.add_argument("--sections", default=",".join(s[0] for s in SECTIONS), help="comma-separated")
    args = parser.parse_args(argv)
    if args.dry_run != DRY_RUN:  # main() called in-process with other arguments than the script's
        parser.error("--dry-run must be on the command line (TRITON_INTERPRET is set before imports)")
    started = time.perf_counter()
    dev = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if dev.type == "cpu" and not args.dry_run:
        print("gpu_check: no CUDA device; this runs everything on CPU (use --dry-run for tiny shapes)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "work"
    wanted = set(args.sections.split(","))
    ctx = {"device": dev, "dry_run": args.dry_run, "data": args.data, "work": work, "results": {}}
    runners = {
        "kernels": lambda out: gpu_check_kernels.accuracy_section(ctx, out),
        "speed": lambda out: gpu_check_kernels.speed_section(ctx, out),
        "lm": lambda out: gpu_check_train.lm_section(ctx, out),
        "twin": lambda out: gpu_check_train.twin_section(ctx, out),
    }
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
        "sections": {},
    }
    for name, title, nominal in SECTIONS:
        left = args.budget_s - (time.perf_counter() - started)
        if name not in wanted:
            report["sections"][name] = {"status": "skipped", "error": "not in --sections", "seconds": 0.0}
            report["sections"][name]["limit_s"] = 0.0
            continue
        if left < 5:
            report["sections"][name] = {"status": "timeout", "error": "no budget left", "seconds": 0.0}
            report["sections"][name]["limit_s"] = 0.0
            continue
        # The twin takes what the others left over (its training is sized from its limit).
        limit = left if name == "twin" else min(nominal, left)
        ctx["limit_s"] = limit
        ctx["section_deadline"] = time.perf_counter() + limit
        print(f"gpu_check: {title} (limit {limit:.0f} s)", flush=True)
        sec = run_section(runners[name], limit)
        ctx["results"][name] = sec
        report["sections"][name] = sec
        print(
            f"gpu_check: {name}: {sec['status']} in {sec['seconds']:.1f} s {sec.get('error', '')}", flush=True
        )
        if dev.type == "cuda":
            torch.cuda.empty_cache()
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
