"""Monitoring: TensorBoard (rank 0), metrics.jsonl, and a console line per interval with ETA.

On resume at step N, TensorBoard purges events past N (``purge_step``) and metrics.jsonl drops its
lines past N, so curves never overlap.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rnnpipe.train")


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool, start_step: int, total_steps: int):
        self.enabled = enabled
        self.start_step, self.total_steps = start_step, total_steps
        self.t0 = time.time()
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )
        path = run_dir / "metrics.jsonl"
        if path.exists():  # keep what the checkpoint covers, drop what came after it
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= start_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = path.open("a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log ``{"train/loss": 1.2, ...}`` at ``step`` to TensorBoard and metrics.jsonl."""
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def hparams(self, params: dict[str, Any], results: dict[str, float]) -> None:
        if self.enabled:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
            self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in results.items()}, run_name=".")

    def console(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        done = step - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.total_steps - step)
        log.info(
            "step %d/%d | loss %.4f | bpb %.3f | lr %.2e | grad %.3f | %s tok/s | mfu %.1f%% | eta %s",
            step,
            self.total_steps,
            values["train/loss"],
            values["train/bpb"],
            values["train/lr"],
            values["train/grad_norm"],
            f"{values['train/tokens_per_s']:,.0f}",
            100 * values["train/mfu"],
            _duration(eta),
        )

    def close(self) -> None:
        if self.enabled:
            self.writer.flush()
            self.writer.close()
            self.jsonl.close()
