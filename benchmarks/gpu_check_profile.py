"""The real pretrain loop (``rnnpipe pretrain ... --executor inline``, in this process) with
torch.profiler over a few of its steps, for benchmarks/gpu_check.py's ``loop`` section.

    python benchmarks/gpu_check_profile.py OUT.json WARMUP_STEP ACTIVE -- pretrain CONFIG [key=value ...]

The command after ``--`` runs as the ``rnnpipe`` command would run it. The profiler warms up at
optimizer step WARMUP_STEP and records steps WARMUP_STEP + 1 .. WARMUP_STEP + ACTIVE; when they end,
OUT.json gets their time split by category (:func:`summarize`). The loop is not changed: the
DeepSpeed engine's ``step`` (and the loop's own gradient norm and clipping) run inside a
``record_function`` range, so that the optimizer's work can be told apart, and each optimizer step
advances the profiler's schedule.

Categories, on a GPU of device (kernel, copy and memset) time, on CPU of CPU time of the operators
themselves (their self time, every thread), per step:

- ``recurrence``: under one of rnnpipe's recurrence ops (``rnnpipe::lrn_packed``, its backward, ...),
  or a kernel named like rnnpipe's Triton kernels when it could not be linked to an operator;
- ``optimizer``: under the engine's ``step`` (gradient norm, clipping, AdamW, DeepSpeed's bf16 and
  ZeRO copies and partitions) and the loop's own gradient norm and clipping;
- ``matmul``: under a matrix product (``aten::mm``, ``aten::addmm``, ``aten::bmm``, ...), or a
  kernel named like a GEMM (cuBLAS's ``nvjet``/``sm90_xmma``/``cutlass``) when not linked;
- ``other``: every other operator (embedding, norms, activations, dropout, the loss, copies).

``busy_ms`` is the union of the device's busy intervals per step (0 on CPU); the caller sets the
step's host time against it (see gpu_check_loop.profile_row).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

OPTIMIZER_RANGE = "gpu_check::optimizer"
CATEGORIES = ("recurrence", "matmul", "optimizer", "other")
MATMUL_OPS = {
    *("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"),
    *("aten::addbmm", "aten::_scaled_mm", "aten::mv", "aten::addmv", "aten::_grouped_mm"),
}
RECURRENCE_KERNELS = re.compile(r"^_(scan|lrn_fwd|lrn_bwd|sru_fwd|sru_bwd)_kernel")
GEMM_KERNELS = re.compile(r"gemm|cutlass|nvjet|xmma|cublas|^sm\d+_", re.I)


def category_of_op(event: Any) -> str | None:
    """The category of an operator event from itself and its ancestors (the first match, in the
    order optimizer > recurrence > matmul); None when nothing matches."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    if OPTIMIZER_RANGE in names:
        return "optimizer"
    if any(n.startswith("rnnpipe::") for n in names):
        return "recurrence"
    if any(n in MATMUL_OPS for n in names):
        return "matmul"
    return None


def category_of_kernel(name: str) -> str:
    """The category of a device kernel from its name alone (one not linked to an operator)."""
    if RECURRENCE_KERNELS.search(name):
        return "recurrence"
    if GEMM_KERNELS.search(name):
        return "matmul"
    if "adam" in name.lower():
        return "optimizer"
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end] intervals (µs)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(events: list[Any], steps: int) -> dict[str, Any]:
    """Milliseconds per step of each category (see the module's docstring), from the profiler's
    events of ``steps`` recorded steps; the ten costliest kernels (or operators on CPU) beside."""
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    # (the device-side copies of record_function ranges span kernels: not counted twice)
    device = [
        e for e in events if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)
    ]
    totals: dict[str, float] = defaultdict(float)
    by_name: dict[tuple[str, str], float] = defaultdict(float)
    if device:  # the GPU's time: each kernel by the operator that launched it
        ops = {e.id: e for e in cpu if getattr(e, "linked_correlation_id", 0) == 0}
        intervals = []
        for k in device:
            us = k.time_range.end - k.time_range.start
            op = ops.get(getattr(k, "linked_correlation_id", 0))
            cat = (category_of_op(op) if op is not None else None) or category_of_kernel(k.name)
            totals[cat] += us
            by_name[(k.name, cat)] += us
            intervals.append((k.time_range.start, k.time_range.end))
        basis, busy = "device time", _union_us(intervals)
    else:  # CPU: the operators' own time
        for e in cpu:
            if e.name.startswith("ProfilerStep"):  # its own time is outside every operator: host
                continue
            cat = category_of_op(e) or "other"
            totals[cat] += e.self_cpu_time_total
            by_name[(e.name, cat)] += e.self_cpu_time_total
        basis, busy = "CPU time of operators", 0.0
    per = 1e3 * max(steps, 1)  # µs over the steps -> ms per step
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
    return {
        "basis": basis,
        "steps": steps,
        "ms": {c: totals.get(c, 0.0) / per for c in CATEGORIES},
        "busy_ms": busy / per,
        "top": [[name[:90], cat, us / per] for (name, cat), us in top],
    }


def profiled_train(out: Path, warmup_step: int, active: int, train: Callable[..., Any]) -> Callable[..., Any]:
    """``train`` (the loop's) under the profiler: steps warmup_step + 1 .. + active recorded, then
    summarized into ``out``. The patches are undone when it returns."""

    def run(cfg: Any, stop: Any = None) -> Any:
        import deepspeed.runtime.engine as ds_engine
        import torch
        from torch.profiler import ProfilerActivity, profile, record_function, schedule

        from rnnpipe.pipeline.train import stepsync

        marks: dict[int, float] = {}

        def ready(prof: Any) -> None:
            wall = marks.get(warmup_step + active, 0.0) - marks.get(warmup_step, 0.0)
            summary = summarize(list(prof.events()), active)
            summary |= {"first_step": warmup_step + 1, "last_step": warmup_step + active}
            summary["profiled_step_ms"] = 1e3 * wall / active  # with the profiler's own overhead
            out.write_text(json.dumps(summary, indent=1) + "\n")

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        prof = profile(
            activities=activities,
            schedule=schedule(wait=warmup_step - 1, warmup=1, active=active, repeat=1),
            on_trace_ready=ready,
        )
        originals = (ds_engine.DeepSpeedEngine.step, stepsync.grad_norm, stepsync.clip_)

        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            before = self.global_steps
            with record_function(OPTIMIZER_RANGE):
                result = originals[0](self, *args, **kwargs)
            if self.global_steps > before:  # an optimizer step (not a micro-step): advance
                marks[self.global_steps] = time.perf_counter()
                prof.step()
            return result

        def in_range(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                with record_function(OPTIMIZER_RANGE):
                    return fn(*args, **kwargs)

            return wrapped

        ds_engine.DeepSpeedEngine.step = step
        stepsync.grad_norm, stepsync.clip_ = in_range(originals[1]), in_range(originals[2])
        prof.start()
        try:
            return train(cfg, stop)
        finally:
            prof.stop()
            ds_engine.DeepSpeedEngine.step = originals[0]
            stepsync.grad_norm, stepsync.clip_ = originals[1], originals[2]

    return run


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[3] != "--":
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out, warmup_step, active = Path(argv[0]), int(argv[1]), int(argv[2])
    if warmup_step < 1 or active < 1:
        print("WARMUP_STEP and ACTIVE must be at least 1", file=sys.stderr)
        return 2
    from rnnpipe.launch.cli import main as rnnpipe
    from rnnpipe.pipeline.train import loop

    # The CLI's rank imports the loop's train() when it runs (launch/stages/rank.py): this one instead.
    loop.train = profiled_train(out, warmup_step, active, loop.train)
    return rnnpipe(argv[4:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
