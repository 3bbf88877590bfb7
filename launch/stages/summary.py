"""What ``rnnpipe pretrain`` tells the user when it ends: a summary read from the run dir.

Everything comes from files rank 0 writes into the run dir (``metrics.jsonl``, the checkpoints'
markers, the export), so the launcher needs nothing from the ranks, and a ``--wait`` on a Slurm
job can summarize a run that trained on other machines.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnpipe.pipeline.engine.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED


@dataclass
class RunRecord:
    """What a run dir's ``metrics.jsonl`` says about its run."""

    step: int = 0  # the last step with a train line (or checkpoint, see :func:`read_run`)
    logged_step: int = 0  # the last step with a train line
    tokens_seen: int | None = None  # at logged_step
    best_valid: tuple[int, float] | None = None  # (step, bpb) of the lowest valid bpb
    last: dict[str, float] = field(default_factory=dict)  # {"valid": bpb, "test": bpb} at the last step
    lines: int = 0  # in metrics.jsonl


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of ``<run_dir>/metrics.jsonl`` (none when it is missing); a torn last line, as a
    killed rank 0 may leave, is skipped."""
    try:
        text = (Path(run_dir) / "metrics.jsonl").read_text()
    except OSError:
        return []
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return [m for m in lines if isinstance(m, dict) and isinstance(m.get("step"), int)]


def read_run(run_dir: str | Path) -> RunRecord:
    """The run's progress and results from its metrics (and its latest checkpoint's step: a run
    stopped between two train lines got further than its last one)."""
    rec = RunRecord()
    lines = read_metrics(run_dir)
    rec.lines = len(lines)
    valid: list[tuple[int, float]] = []
    for m in lines:
        if "train/loss" in m:
            rec.logged_step = max(rec.logged_step, m["step"])
            if "train/tokens_seen" in m:
                rec.tokens_seen = int(m["train/tokens_seen"])
        if _finite(m.get("valid/bpb")):
            valid.append((m["step"], float(m["valid/bpb"])))
    rec.step = max(rec.logged_step, checkpoint_step(run_dir))
    if valid:
        rec.best_valid = min(valid, key=lambda sv: (sv[1], -sv[0]))  # a tie: the later step
    # A finished run's final evaluation comes last, at its last step: whole valid, then test (an
    # evaluation during training at that step, if any, comes before it).
    for split in ("valid", "test"):
        ends = [m[f"{split}/bpb"] for m in lines if m["step"] == rec.step and _finite(m.get(f"{split}/bpb"))]
        if ends:
            rec.last[split] = float(ends[-1])
    return rec


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def checkpoint_step(run_dir: str | Path) -> int:
    """The step of the run dir's latest complete checkpoint (0 without one): where a launch starts."""
    from rnnpipe.pipeline.errors import PipelineError
    from rnnpipe.pipeline.train.checkpoint import find_latest, read_header

    latest = find_latest(Path(run_dir))
    if latest is None:
        return 0
    try:
        return int(read_header(latest).get("step", 0))
    except (PipelineError, TypeError, ValueError):
        return 0


def duration(seconds: float) -> str:
    """``3h05m``, ``4m02s``, ``12.3s``."""
    from rnnpipe.pipeline.engine.metrics import duration as minutes  # (the console's ETA format)

    return f"{seconds:.1f}s" if seconds < 60 else minutes(seconds)


def outcome(code: int, nothing_to_do: bool = False) -> str:
    """How a launch that ended with exit status ``code`` went, in a few words."""
    if nothing_to_do:
        return "already complete, nothing to do"
    if code == EXIT_PREEMPTED:
        return "preempted (exit status 75)"
    if code == EXIT_INTERRUPTED:
        return "interrupted (exit status 130)"
    return "done" if code == 0 else f"ended with exit status {code}"


def summary(
    run_dir: str | Path,
    code: int,
    total_steps: int,
    *,
    wall_s: float | None = None,
    export: str | None = None,
    start_step: int | None = None,
    nothing_to_do: bool = False,
    wall_what: str = "",
) -> str:
    """The lines ``rnnpipe pretrain`` ends with: how the launch ended (done, preempted, nothing to
    do), steps and tokens, wall time, the best valid bits per byte (and a finished run's final
    valid and test ones), the export, and how to look at the curves.

    ``code``: the launch's exit status; ``total_steps``: train.steps; ``start_step``: the step it
    resumed from (None: unknown); ``wall_s``: how long it took (``wall_what``: since when, if not
    the launch); ``export``: the export it made (or, with ``nothing_to_do``, found)."""
    run_dir = str(run_dir)
    rec = read_run(run_dir)
    finished = code == 0
    head = f"pretrain {outcome(code, nothing_to_do)}: step {rec.step:,}/{total_steps:,}"
    if start_step and not nothing_to_do and rec.step > start_step:
        head += f" ({rec.step - start_step:,} this launch, resumed from step {start_step:,})"
    if finished and not nothing_to_do and 0 < rec.step < total_steps:
        head += " (train.time_limit_min reached)"
    if rec.tokens_seen is not None:
        head += f", {rec.tokens_seen:,} tokens seen"
        if rec.logged_step != rec.step:
            head += f" (by step {rec.logged_step:,})"
    if wall_s is not None and not nothing_to_do:
        head += f", wall time {duration(wall_s)}" + (f" {wall_what}" if wall_what else "")
    lines = [head]
    if rec.best_valid is not None:
        step, bpb = rec.best_valid
        parts = [f"best valid {bpb:.4f} bits per byte (step {step:,})"]
        if finished:  # (a stopped run's last valid line is one from during training)
            parts += [
                f"final {split} {rec.last[split]:.4f}" for split in ("valid", "test") if split in rec.last
            ]
        lines.append("  " + "; ".join(parts))
    elif finished and rec.lines:
        lines.append("  no evaluation recorded")
    if code in (EXIT_PREEMPTED, EXIT_INTERRUPTED):
        lines.append("  run the same command again to continue")
    if export and os.path.isdir(export):
        lines.append(f"  export: {export}")
    board = os.path.join(run_dir, "tensorboard")
    if rec.lines or os.path.isdir(board):
        lines.append(f"  curves: tensorboard --logdir {board}")
    return "\n".join(lines)


def stopped_message(run_dir: str | Path, code: int) -> str:
    """What a launch that stopped on a signal (exit status ``code``) tells the user: the checkpoint
    to continue from, and only if there is one."""
    from rnnpipe.pipeline.train.checkpoint import find_latest

    latest = find_latest(Path(run_dir))
    if latest is None:
        return f"pretrain stopped on a signal (exit status {code}) before its first checkpoint"
    return (
        f"pretrain checkpointed on a signal (exit status {code}): its last checkpoint is {latest}; "
        "run the same command again to continue"
    )
