"""The sections of benchmarks/gpu_check.py that run the real pretrain loop through ``rnnpipe pretrain
--executor inline`` (DeepSpeed, one process, bf16) at configs/pretrain/enwik8-50m.yaml on a byte
dataset prepared once: ``loop`` (ZeRO-0 and ZeRO-1 with a per-step profile), ``resume`` (checkpoint
→ resume bit for bit), ``compile`` (``train.compile=true``) and ``shuffle`` (``data.mode=shuffle``
with DataLoader workers).

Every run keeps its end short: ``train.eval_every=0`` (no evaluation during training),
``train.sample_tokens=0`` (no text generated) and ``eval.max_tokens`` = one evaluation batch (the
final evaluation's cap, ``train.eval_batch_size`` = the training batch: the same shapes, so a
compiled model is not compiled again for another size). The runs' dirs and logs are under
``--work`` (``loop-zero0/``, ``loop-zero0.log``, ...).

Every function fills the section dict ``out`` it is given as it goes (``rows``, ``checks``,
``notes``), so a section cut short by its time limit keeps what it measured.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from gpu_check_train import DRY_LM, REPO, find_data, finish, launch_prepare, load_run_config, start, stop

HERE = Path(__file__).resolve().parent
CONFIG = "enwik8-50m"
WARMUP_STEPS = 5  # optim.warmup_steps: the loss falls within the few tens of steps a run takes
# (steps, log_every) per run; the loop's profile: warm-up at step PROFILE[0], then PROFILE[1] recorded
LOOP, LOOP_DRY, PROFILE, PROFILE_DRY = (30, 5), (8, 2), (20, 5), (4, 2)
RESUME_STEPS, RESUME_STEPS_DRY = 16, 6  # N: the run stopped at its checkpoint of step N/2
STOP_DELAY_S = 0.5  # RNNPIPE_TEST_STEP_DELAY of the run that is stopped: it cannot outrun the kill
COMPILE, COMPILE_DRY = (15, 5), (6, 2)
SHUFFLE, SHUFFLE_DRY = (20, 5), (4, 2)
SHUFFLE_WORKERS, SHUFFLE_WORKERS_DRY = 4, 2  # (each worker is a spawned process importing torch)


# ------------------------------------------------------------------------------- data and runs


def byte_dataset(ctx: dict[str, Any]) -> Path:
    """The byte dataset every run here reads, prepared once per check into WORK/bytes-data:
    ``--enwik8`` (enwik8-head's text) when given, else the twin's tinyshakespeare as bytes (or the
    dry run's synthetic text). Samples of 16,384 bytes (1,024 in the dry run), 4 per shard, so that
    shuffle mode has a shard for each of its workers."""
    if "byte_data" in ctx:
        return ctx["byte_data"]
    work = Path(ctx["work"]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out, dry = work / "bytes-data", ctx["dry_run"]
    if ctx.get("enwik8"):
        source = Path(ctx["enwik8"]).resolve()
        args = ["configs/prepare/enwik8-head.yaml", f"source.paths=[{source}]"]
    else:
        source, _ = find_data(ctx)
        args = [
            "configs/prepare/tinyshakespeare-gpu.yaml",
            f"source.paths=[{source}]",
            "tokenizer.kind=bytes",
        ]
    args += [f"output={out}", "overwrite=true", "shards.samples_per_shard=4"]
    args.append(f"shards.sample_tokens={1024 if dry else 16384}")
    if dry:
        args.append("source.limit_bytes=60000")
    launch_prepare(
        args, work / "bytes-data.log", max(10.0, ctx["section_deadline"] - time.perf_counter() - 5)
    )
    ctx["byte_data"], ctx["byte_source"] = out, source
    return out


def shape(ctx: dict[str, Any]) -> tuple[int, int]:
    """(micro-batch, seq_len) of the runs: the config's, or the dry run's shrunk ones."""
    cfg = load_run_config(CONFIG, DRY_LM if ctx["dry_run"] else [])
    return cfg.data.batch_size, cfg.data.seq_len


def run_args(ctx: dict[str, Any], run_dir: Path, steps: int, every: int, *extra: str, fresh: bool = True):
    """``pretrain`` arguments of one run of the 50M config on the byte dataset (see the module's
    docstring for the keys that keep it short); ``fresh``: a new run (an earlier one replaced)."""
    B, T = shape(ctx)
    args = [
        *("pretrain", str(REPO / "configs" / "pretrain" / f"{CONFIG}.yaml")),
        *(f"run_dir={run_dir}", f"data.path={byte_dataset(ctx)}"),
        *(f"train.steps={steps}", f"train.log_every={every}", "train.eval_every=0"),
        *("train.sample_tokens=0", f"train.eval_batch_size={B}", f"eval.max_tokens={B * T + 1}"),
        f"optim.warmup_steps={WARMUP_STEPS}",
        *(DRY_LM if ctx["dry_run"] else []),
        *extra,
        *(("train.resume=none", "overwrite=true") if fresh else ()),
    ]
    return [*args, "--executor", "inline"]


def left_s(ctx: dict[str, Any], reserve: float = 2.0) -> float:
    """Seconds left of the section's limit, less ``reserve``."""
    return ctx["section_deadline"] - time.perf_counter() - reserve


def records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl, one record per line (a line cut short by a kill is left out)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """step -> train/loss (the last record of a step wins: a resumed run logs its steps again)."""
    return {r["step"]: r["train/loss"] for r in records(run_dir) if "train/loss" in r}


def windows(run_dir: Path, every: int, skip: tuple[int, int] = (0, 0)) -> tuple[dict, list[dict]]:
    """(the first log window's record, the records of the steady windows): every window of
    ``every`` steps after the first (Triton's compilation, torch.compile's, the workers' start),
    less those that overlap steps ``skip`` = (first, last) (the profiled ones)."""
    logged = [r for r in records(run_dir) if "train/tokens_per_s" in r]
    if not logged:
        raise RuntimeError(f"{run_dir}: no training log line in metrics.jsonl")
    a, b = skip
    steady = [r for r in logged[1:] if not (a and r["step"] - every < b and r["step"] >= a)]
    return logged[0], steady


def median(rs: list[dict], key: str) -> float:
    values = [r[key] for r in rs if key in r]
    return statistics.median(values) if values else math.nan


def log_text(log: Path) -> str:
    return log.read_text() if log.exists() else ""


# ------------------------------------------------------------------------------------------ loop


def loop_section(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    """(f): the 50M config through the real loop at ZeRO-0 and ZeRO-1, with a per-step profile."""
    from rnnpipe.pipeline.train.memory import estimate_memory

    dry, work = ctx["dry_run"], Path(ctx["work"]).resolve()
    steps, every = LOOP_DRY if dry else LOOP
    warm, active = PROFILE_DRY if dry else PROFILE
    out["notes"] = [
        f"configs/pretrain/{CONFIG}.yaml (bf16) through rnnpipe pretrain --executor inline at world 1, "
        f"{steps} steps on {byte_dataset(ctx).name} ({ctx['byte_source']}); tokens/s, MFU and step: "
        f"the loop's own log (train/tokens_per_s, train/mfu), median of its {every}-step windows after "
        "the first (Triton's compilation) that miss the profiled steps; peak GiB: train/memory_gb "
        "(torch's max allocated; on CPU the process's RSS); estimate: pipeline/train/memory.py",
        f"profile: torch.profiler over steps {warm + 1}-{warm + active} of the same run "
        "(benchmarks/gpu_check_profile.py), in ms per step: recurrence = under rnnpipe's recurrence "
        "ops (their Triton kernels); matmul = under aten::mm/addmm/bmm/...; optimizer = under the "
        "engine's step (gradient norm, clipping, AdamW, DeepSpeed's copies) and the loop's own norm; "
        "other = every other kernel (embedding, norms, activations, loss, copies); on a GPU device "
        "time, host = the step's time less the union of the device's busy intervals (the GPU "
        "waiting for Python); on CPU the operators' own CPU time, host = the step's time less theirs",
    ]
    if dry:
        out["notes"].append(f"dry run: shrunk by {' '.join(DRY_LM)}; the two runs side by side")
    rows, checks = out.setdefault("rows", []), out.setdefault("checks", [])
    runs = []
    for zero in (0, 1):
        run_dir, log = work / f"loop-zero{zero}", work / f"loop-zero{zero}.log"
        profile = work / f"loop-zero{zero}-profile.json"
        profile.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        program = [
            sys.executable,
            str(HERE / "gpu_check_profile.py"),
            str(profile),
            str(warm),
            str(active),
            "--",
        ]
        args = run_args(ctx, run_dir, steps, every, f"train.zero_stage={zero}")
        runs.append((zero, run_dir, log, profile, program, args))
    if dry:  # timings do not matter on CPU: both at once
        procs = [(start(r[5], r[2], program=r[4]), r[2], f"loop ZeRO-{r[0]}") for r in runs]
        finish(procs, left_s(ctx))
    else:  # one at a time: each has the GPU to itself
        for zero, _, log, _, program, args in runs:
            finish([(start(args, log, program=program), log, f"loop ZeRO-{zero}")], left_s(ctx))
    out["tokens_s"] = {}
    for zero, run_dir, _, profile, _, _ in runs:
        cfg = load_run_config(CONFIG, DRY_LM if dry else [])
        cfg.train.zero_stage = zero
        row = loop_row(run_dir, every, profile, (warm, warm + active))
        row["estimate GiB"] = estimate_memory(cfg, 256, world_size=1)["total"]
        rows.append({"run": f"{CONFIG}.yaml, ZeRO-{zero}", **row})
        out["tokens_s"][zero] = row["tokens/s"]
        ok = math.isfinite(row["loss"]) and row["tokens/s"] > 0 and row["profile"] != "missing"
        checks.append({"name": f"loop ZeRO-{zero} trains and is profiled", "pass": ok, "value": row["loss"]})
        print(f"  loop ZeRO-{zero}: {row['tokens/s']:,.0f} tokens/s, MFU {row['MFU']}", flush=True)


def loop_row(run_dir: Path, every: int, profile: Path, skip: tuple[int, int]) -> dict[str, Any]:
    """One run's figures: speed and memory from its log, the step split from its profile."""
    first, steady = windows(run_dir, every, skip)
    logged = [first, *steady]
    step_ms = 1e3 * median(steady, "train/step_time_s")
    row: dict[str, Any] = {
        "steps": logged[-1]["step"],
        "tokens/s": median(steady, "train/tokens_per_s"),
        "MFU": f"{100 * median(steady, 'train/mfu'):.1f} %",
        "peak GiB": max(r.get("train/memory_gb", math.nan) for r in logged),
        "step (ms)": step_ms,
    }
    if profile.is_file():
        p = json.loads(profile.read_text())
        for cat, ms in p["ms"].items():
            row[f"{cat} (ms)"] = ms
        used = p["busy_ms"] if p["busy_ms"] else sum(p["ms"].values())
        row["host (ms)"] = max(0.0, step_ms - used)
        row["profile"] = f"{p['basis']}, steps {p['first_step']}-{p['last_step']}"
        row["top kernels"] = "; ".join(f"{n} {ms:.2f}" for n, _, ms in p["top"][:3])
    else:
        row["profile"] = "missing"
    row["loss"] = logged[-1].get("train/loss", math.nan)
    return row


# ---------------------------------------------------------------------------------------- resume


def resume_section(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    """(g): N steps uninterrupted against N/2 steps, killed after its checkpoint, then resumed to
    N: the losses of steps N/2 + 1 .. N bit for bit (tests/integration/train/test_pretrain.py's CPU
    test, on CUDA)."""
    dry, work = ctx["dry_run"], Path(ctx["work"]).resolve()
    n = RESUME_STEPS_DRY if dry else RESUME_STEPS
    half = n // 2
    out["notes"] = [
        f"configs/pretrain/{CONFIG}.yaml at ZeRO-1 (bf16, dropout 0.1: the RNG state matters), "
        f"{n} steps logged one by one, a checkpoint every {half}; the uninterrupted run and the one "
        f"to be stopped run side by side; the second sleeps {STOP_DELAY_S} s after each step "
        f"(RNNPIPE_TEST_STEP_DELAY) and is killed (SIGKILL) once its checkpoint of step {half} is "
        "complete, then run again with train.resume=auto",
        "equal: train/loss of each step (a float64 in metrics.jsonl) compared with ==; steps before "
        "the stop compare two fresh runs (the GPU's run-to-run determinism), steps after it the resume",
    ]
    common = ("train.zero_stage=1", f"train.checkpoint_every={half}", "model.dropout=0.1")
    ref, cut = work / "resume-ref", work / "resume-cut"
    logs = {name: work / f"resume-{name}.log" for name in ("ref", "cut", "resumed")}
    for log in logs.values():
        log.unlink(missing_ok=True)
    again = run_args(ctx, cut, n, 1, *common, "train.resume=auto", fresh=False)
    stopped_at = stop_and_resume(
        ctx, run_args(ctx, ref, n, 1, *common), run_args(ctx, cut, n, 1, *common), again, logs, half
    )
    a, b = losses(ref), losses(cut)
    out["losses"] = {"uninterrupted": a, "stopped and resumed": b}
    said = log_text(logs["resumed"])
    rows = out["rows"] = []
    for label, span in (("before the stop (two runs)", (1, half)), ("after the resume", (half + 1, n))):
        pairs = [(a.get(s, math.nan), b.get(s, math.nan)) for s in range(span[0], span[1] + 1)]
        rows.append(
            {
                "steps": f"{span[0]}-{span[1]}",
                "compared": label,
                "uninterrupted, last": pairs[-1][0],
                "stopped + resumed, last": pairs[-1][1],
                "max |Δ|": max(abs(x - y) for x, y in pairs),
                "equal bit for bit": all(x == y for x, y in pairs),
            }
        )
    rows[-1]["stopped at step (logged)"] = stopped_at
    out["checks"] = [
        {"name": f"resumed from step {half}", "pass": "resumed from" in said and f"step{half:08d}" in said},
        {"name": "same losses before the stop (determinism)", "pass": rows[0]["equal bit for bit"]},
        {"name": "same losses after the resume (bit for bit)", "pass": rows[1]["equal bit for bit"]},
    ]
    print(f"  resume: equal before {rows[0]['equal bit for bit']}, after {rows[1]['equal bit for bit']}")


def stop_and_resume(
    ctx: dict[str, Any], ref: list[str], cut: list[str], again: list[str], logs: dict[str, Path], half: int
) -> int:
    """Start the uninterrupted run (``ref``) and the one to stop (``cut``, slowed) side by side; kill
    the second (its process group, SIGKILL) once its checkpoint of step ``half`` is complete and
    start it ``again`` (resuming) while the first goes on; wait for both. Returns the last step the
    killed run had logged."""
    run_dir = Path(next(a for a in cut if a.startswith("run_dir=")).split("=", 1)[1])
    complete = run_dir / "checkpoints" / f"step{half:08d}" / "COMPLETE"
    procs = [(start(ref, logs["ref"]), logs["ref"], "uninterrupted run")]
    delay = {"RNNPIPE_TEST_STEP_DELAY": str(STOP_DELAY_S)}
    procs.append((start(cut, logs["cut"], delay), logs["cut"], "run to stop"))
    try:
        while not complete.exists():
            if procs[1][0].poll() is not None:
                tail = " / ".join(log_text(logs["cut"]).splitlines()[-12:])[-600:]
                raise RuntimeError(f"the run to stop ended before its checkpoint of step {half}: {tail}")
            if left_s(ctx) < 0:
                raise TimeoutError(f"no checkpoint of step {half} in time (log: {logs['cut']})")
            time.sleep(0.05)
        stop(procs[1][0])
        stopped_at = max(losses(run_dir), default=0)
        procs[1] = (start(again, logs["resumed"]), logs["resumed"], "resumed run")
        finish(procs, left_s(ctx))
    finally:
        for proc, _, _ in procs:
            stop(proc)
    return stopped_at


# --------------------------------------------------------------------------------- compile, shuffle


def compile_section(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    """(h): ``train.compile=true`` (inductor) for a few steps: it compiles, trains, and how fast."""
    dry, work = ctx["dry_run"], Path(ctx["work"]).resolve()
    steps, every = COMPILE_DRY if dry else COMPILE
    backend = "aot_eager" if dry else "inductor"
    out["notes"] = [
        f"configs/pretrain/{CONFIG}.yaml at ZeRO-0 with train.compile=true ({backend}), {steps} steps; "
        f"tokens/s: median of the {every}-step windows after the first; the first window holds the "
        "compilations (training, then the state carried from step 2 on); compile (s) = that window "
        "less its steps at the steady speed; uncompiled: the loop section's ZeRO-0 run",
    ]
    if dry:
        out["notes"].append(
            "dry run: torch.compile's aot_eager backend (RNNPIPE_TEST_COMPILE_BACKEND): "
            "the same graphs as inductor, no C++ compilation (inductor on 2 CPUs: minutes)"
        )
    run_dir, log = work / "compile", work / "compile.log"
    log.unlink(missing_ok=True)
    env = {"RNNPIPE_TEST_COMPILE_BACKEND": backend} if dry else {}
    args = run_args(ctx, run_dir, steps, every, "train.zero_stage=0", "train.compile=true")
    finish([(start(args, log, env), log, "compiled run")], left_s(ctx))
    first, steady = windows(run_dir, every)
    tok_s, step_s = median(steady, "train/tokens_per_s"), median(steady, "train/step_time_s")
    plain = (ctx["results"].get("loop") or {}).get("tokens_s", {}).get(0)
    row = {
        "run": f"{CONFIG}.yaml, train.compile=true ({backend})",
        "steps": steady[-1]["step"] if steady else first["step"],
        "tokens/s": tok_s,
        f"first {every} steps (s)": first["train/step_time_s"] * every,
        "compile (s)": max(0.0, (first["train/step_time_s"] - step_s) * every),
        "loss, first window": first.get("train/loss", math.nan),
        "loss, last window": steady[-1].get("train/loss", math.nan) if steady else math.nan,
        "uncompiled tokens/s (loop, ZeRO-0)": plain,
        "speed-up": tok_s / plain if plain else None,
    }
    out["rows"] = [row]
    compiled = f"runs under torch.compile ({backend})" in log_text(log)
    first_loss, last_loss = row["loss, first window"], row["loss, last window"]
    checks = out.setdefault("checks", [])
    checks.append({"name": f"compiled with {backend}", "pass": compiled})
    checks.append(
        {"name": "compiled run's loss finite", "pass": math.isfinite(last_loss), "value": last_loss}
    )
    checks.append(
        {"name": "compiled run's loss decreases", "pass": last_loss < first_loss, "value": last_loss}
    )
    print(
        f"  compile: {tok_s:,.0f} tokens/s (uncompiled {plain}), compile ~{row['compile (s)']:.0f} s",
        flush=True,
    )


def shuffle_section(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    """(i): ``data.mode=shuffle`` with DataLoader worker processes for a few steps."""
    dry, work = ctx["dry_run"], Path(ctx["work"]).resolve()
    steps, every = SHUFFLE_DRY if dry else SHUFFLE
    workers = SHUFFLE_WORKERS_DRY if dry else SHUFFLE_WORKERS
    out["notes"] = [
        f"configs/pretrain/{CONFIG}.yaml at ZeRO-0 with data.mode=shuffle data.workers={workers} (spawned "
        f"DataLoader processes), {steps} steps; tokens/s: median of the {every}-step windows after the "
        "first (which holds the workers' start); stream: the loop section's ZeRO-0 run",
    ]
    run_dir, log = work / "shuffle", work / "shuffle.log"
    log.unlink(missing_ok=True)
    args = run_args(
        ctx, run_dir, steps, every, "train.zero_stage=0", "data.mode=shuffle", f"data.workers={workers}"
    )
    finish([(start(args, log), log, "shuffle-mode run")], left_s(ctx))
    first, steady = windows(run_dir, every)
    tok_s = median(steady, "train/tokens_per_s")
    stream = (ctx["results"].get("loop") or {}).get("tokens_s", {}).get(0)
    loss = (steady or [first])[-1].get("train/loss", math.nan)
    out["rows"] = [
        {
            "run": f"{CONFIG}.yaml, data.mode=shuffle, {workers} workers",
            "steps": (steady or [first])[-1]["step"],
            "tokens/s": tok_s,
            f"first {every} steps (s)": first["train/step_time_s"] * every,
            "stream-mode tokens/s (loop, ZeRO-0)": stream,
            "loss": loss,
        }
    ]
    ok = math.isfinite(loss) and tok_s > 0
    out.setdefault("checks", []).append(
        {"name": f"shuffle mode with {workers} workers trains", "pass": ok, "value": loss}
    )
    print(f"  shuffle: {tok_s:,.0f} tokens/s with {workers} workers", flush=True)
