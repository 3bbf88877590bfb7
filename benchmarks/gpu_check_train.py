"""Sections (e) and (j) of benchmarks/gpu_check.py: LM training speed and memory of the shipped
configs, and the tinyshakespeare GPU twin through the real prepare and pretrain commands.

Every function fills the section dict ``out`` it is given as it goes (``rows``, ``checks``,
``notes``), so a section cut short by its time limit keeps what it measured.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
# The shipped configs' vocabularies come from their datasets' manifests: bytes, and the 32k
# sentencepiece model docs/pretrain.md names (362 M parameters with it, as its table says).
LM_CONFIGS = [("enwik8-50m", 256), ("wiki-350m", 32000)]
DRY_LM = ["model.n_layers=2", "model.d_model=64", "data.seq_len=32", "data.batch_size=2"]
NANOGPT_VAL_LOSS = 1.4697  # nanoGPT's README, shakespeare_char: 6 layers, 384 wide, 5000 iterations
TWIN = "tinyshakespeare-gpu"
# The pretrain loop's steps against this micro-benchmark's (DeepSpeed's bf16 optimizer, gradient
# clipping, its host synchronisations, logging): a guess to be checked against the first GPU run.
LOOP_OVERHEAD = 1.6
TWIN_TRAIN_S = 180.0  # "about 3 minutes" of training, when the budget leaves them
# The recipe's claim (beating nanoGPT) is checked only when the run trained at least this long: in
# the whole check the twin gets what the other sections leave (about a minute); `--sections twin`
# gives it the full 3 minutes.
TWIN_FULL_S = 150.0
TWIN_RESERVE_S = 40.0  # prepare, DeepSpeed's start, the final evaluations and save, in the limit
DRY_TWIN = [
    *("model.n_layers=1", "model.d_model=32", "data.seq_len=32", "data.batch_size=4"),
    *("train.steps=4", "train.log_every=2", "train.eval_every=0", "train.eval_batch_size=2"),
    *("train.eval_max_tokens=2000", "train.sample_tokens=0", "eval.window=16", "optim.warmup_steps=1"),
]


def load_run_config(name: str, overrides: list[str]):
    """configs/pretrain/NAME.yaml as a validated PretrainConfig (without its executor keys)."""
    import yaml

    from rnnpipe.pipeline.config import config_from_dict, override
    from rnnpipe.pipeline.train.config import PretrainConfig

    values = yaml.safe_load((REPO / "configs" / "pretrain" / f"{name}.yaml").read_text())
    values = {k: v for k, v in values.items() if k not in ("executor", "distributed", "overwrite")}
    cfg = config_from_dict(PretrainConfig, values, f"configs/pretrain/{name}.yaml")
    return override(cfg, overrides, "gpu_check") if overrides else cfg


def peak_flops(dev: torch.device) -> tuple[float, str]:
    """(FLOP/s, where from): the datasheet's dense bf16 rate for known GPUs, else a measured
    bf16 (CUDA) or fp32 (CPU) matrix product rate."""
    if dev.type == "cuda":  # the loop's own table (train/mfu): the H100 PCIe and NVL apart from the SXM
        from rnnpipe.pipeline.train.loop import dense_bf16_flops

        name = torch.cuda.get_device_name(dev)
        rate = dense_bf16_flops(name)
        if rate:
            return rate, f"{name} datasheet, dense bf16"
    n, dtype = (8192, torch.bfloat16) if dev.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        a @ a
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best, f"measured {str(dtype)[6:]} {n}³ matmul"


def train_speed(model_cfg, vocab: int, batch: int, seq_len: int, dev: torch.device, steps: int, warmup: int):
    """Seconds per step and peak GiB of forward + backward + AdamW in bf16 autocast on random tokens.

    The model keeps fp32 weights (autocast computes in bf16): 4 + 4 + 8 bytes of states per
    parameter, what DeepSpeed's bf16 mode (2 + 2 + 12) also takes. Gradients are clipped at 1.0 as
    the loop does. Returns (s/step, peak GiB or NaN on CPU, final loss, parameters)."""
    from rnnpipe.pipeline.models import LanguageModel

    model = LanguageModel(model_cfg, vocab).to(dev).train()
    cuda = dev.type == "cuda"
    opt = torch.optim.AdamW(model.param_groups(), lr=1e-4, weight_decay=0.1, fused=cuda)
    gen = torch.Generator(device=dev).manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq_len + 1), device=dev, generator=gen)
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)

    def step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):  # Triton's compilation, the allocator's first blocks
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else float("nan")
    return seconds, peak, float(loss), model.num_params()


def docs_estimate(name: str) -> str:
    """The estimate docs/pretrain.md's table gives the config ("0.8 + 7.6" GiB per GPU, its layout)."""
    text = (REPO / "docs" / "pretrain.md").read_text()
    m = re.search(rf"^\| `{re.escape(name)}\.yaml` \|(.*)\|\s*$", text, re.M)
    if not m:
        return "not in docs/pretrain.md"
    cells = [c.strip() for c in m.group(1).split("|")]
    return f"{cells[-1]} GiB ({cells[2]} GPU(s), ZeRO {cells[3]})"


def lm_section(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    """(e): tokens/s, MFU and peak memory of the 50M and 350M configs, one GPU, bf16."""
    from rnnpipe.pipeline.train.memory import estimate_memory

    dev, dry = ctx["device"], ctx["dry_run"]
    peak, where = peak_flops(dev)
    out["notes"] = [
        f"MFU against {peak / 1e12:.3g} TFLOP/s ({where}); FLOPs per token: "
        "LanguageModel.training_flops_per_token (3 × forward, pipeline/models/flops.py)",
        "forward + backward + AdamW (fused on CUDA) under bf16 autocast on random tokens, fp32 "
        "weights, no DeepSpeed; the config's micro-batch × seq_len; state not carried",
        "estimate (1 GPU): pipeline/train/memory.py at world size 1, ZeRO 0 (this layout); docs: "
        "docs/pretrain.md's table, at the config's own layout",
    ]
    if dry:
        out["notes"].append(f"dry run: the configs shrunk by {' '.join(DRY_LM)}")
    rows, checks = out.setdefault("rows", []), out.setdefault("checks", [])
    for name, vocab in LM_CONFIGS:
        cfg = load_run_config(name, DRY_LM if dry else [])
        cfg.train.zero_stage = 0
        est = estimate_memory(cfg, vocab, world_size=1)
        B, T = cfg.data.batch_size, cfg.data.seq_len
        steps, warmup = (2, 1) if dry else ((6, 2) if name == "enwik8-50m" else (4, 2))
        s, mem, loss, params = train_speed(cfg.model, vocab, B, T, dev, steps, warmup)
        from rnnpipe.pipeline.models.flops import training_flops_per_token

        tok_s = B * T / s
        mfu = training_flops_per_token(cfg.model, vocab, T) * tok_s / peak
        rows.append(
            {
                "config": f"{name}.yaml",
                "parameters (M)": params / 1e6,
                "micro-batch × seq_len": f"{B} × {T}",
                "step (ms)": s * 1e3,
                "tokens/s": tok_s,
                "MFU": f"{100 * mfu:.1f} %",
                "peak GiB": mem,
                "estimate GiB (1 GPU)": est["total"],
                "docs estimate": docs_estimate(name),
                "loss": loss,
            }
        )
        ok = math.isfinite(loss) and tok_s > 0
        checks.append({"name": f"{name} trains (finite loss)", "pass": ok, "value": loss})
        print(f"  {name}: {tok_s:,.0f} tokens/s, MFU {100 * mfu:.1f} %, peak {mem:.1f} GiB", flush=True)


# -------------------------------------------------------------------------------------------- twin


def find_data(ctx: dict[str, Any]) -> tuple[Path, str]:
    """tinyshakespeare's input.txt: --data, else $RNNPIPE_DATA or ../shared/data; a dry run without
    either writes a small synthetic text (so the code path runs anywhere)."""
    if ctx["data"]:
        if not Path(ctx["data"]).is_file():
            raise FileNotFoundError(f"--data {ctx['data']}: no such file")
        return Path(ctx["data"]).resolve(), "--data"
    root = Path(os.environ.get("RNNPIPE_DATA", REPO.parent / "shared" / "data"))
    path = root / "tinyshakespeare" / "input.txt"
    if path.is_file():
        return path.resolve(), str(root)
    if not ctx["dry_run"]:
        raise FileNotFoundError(
            f"no tinyshakespeare input.txt: pass --data (on a device machine: copy it to "
            f"runs/gpu-data/input.txt, carry runs/gpu-data), or set RNNPIPE_DATA ({path} is absent)"
        )
    synthetic = Path(ctx["work"]) / "synthetic.txt"
    synthetic.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"LINE {i}: to be or not to be, that is question {i % 7}.\n" for i in range(1500)]
    synthetic.write_text("".join(lines))
    return synthetic, "synthetic (dry run without the data)"


# rnnpipe's command as the installed console script runs it: -P keeps the repository root (its
# folders kernels/, pipeline/, launch/) off sys.path; rnnpipe itself is installed (or a wheel).
CLI = [sys.executable, "-P", "-m", "rnnpipe"]


def child_env(extra: dict[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a command this check starts: no progress bars, unbuffered output, the
    default kernel dispatch (Triton on CUDA, the reference on CPU), none of the loop's test hooks
    (RNNPIPE_TEST_*), with ``extra`` set (a None value removes the variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNPIPE_TEST_")}  # (the tests' hooks)
    env |= {"RNNPIPE_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RNNPIPE_KERNELS", None)
    for key, value in (extra or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def start(
    args: list[str], log: Path, env: dict[str, str | None] | None = None, program: list[str] | None = None
) -> subprocess.Popen:
    """Start ``program ARGS`` (default: the rnnpipe command) in the repository, in a process group
    of its own (so that :func:`stop` ends its DataLoader workers too), output appended to ``log``."""
    cmd = [*(program or CLI), *args]
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd[1:] if program else ['rnnpipe', *args])}\n")
        f.flush()
        return subprocess.Popen(
            cmd, cwd=REPO, env=child_env(env), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s process group if it still runs (after a failure, a timeout or the alarm)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def finish(procs: list[tuple[subprocess.Popen, Path, str]], timeout: float) -> None:
    """Wait for every (process, its log, what it is) within ``timeout`` seconds in all; raise with
    the first failure's log tail. Whatever ends the wait early (a failure, the section's alarm)
    kills those still running."""
    deadline = time.perf_counter() + max(1.0, timeout)
    try:
        for proc, log, what in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired as e:
                raise TimeoutError(f"{what} ran past {timeout:.0f} s (log: {log})") from e
            if proc.returncode:
                tail = log.read_text().splitlines()[-12:]
                raise RuntimeError(f"{what} exited {proc.returncode}: " + " / ".join(tail)[-600:])
    finally:
        for proc, _, _ in procs:
            stop(proc)


def _launch(args: list[str], log: Path, timeout: float) -> None:
    """``rnnpipe -q ARGS`` in the repository, output into ``log``; raises with its tail."""
    finish([(start(["-q", *args], log), log, f"rnnpipe {args[0]}")], timeout)


def launch_prepare(args: list[str], log: Path, timeout: float) -> None:
    """``rnnpipe prepare ARGS --executor inline`` (see :func:`_launch`)."""
    _launch(["prepare", *args, "--executor", "inline"], log, timeout)


def twin_section(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    """(j): prepare tinyshakespeare, size train.steps to the time left, pretrain, compare."""
    dev, dry = ctx["device"], ctx["dry_run"]
    started = time.perf_counter()
    limit = ctx["limit_s"]
    work = Path(ctx["work"]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "twin.log"
    log.write_text("")
    data, origin = find_data(ctx)
    out["notes"] = [
        f"data: {data} ({origin}); configs/prepare/{TWIN}.yaml (90/10 by characters, cut at a line "
        f"end) and configs/pretrain/{TWIN}.yaml through rnnpipe prepare and rnnpipe pretrain "
        "--executor inline (DeepSpeed, one process)",
        "train.steps sized to the time left: the model's step time measured first, times "
        f"{LOOP_OVERHEAD} for the loop's overhead, with train.time_limit_min as a guard; beating "
        f"nanoGPT is a check only after {TWIN_FULL_S:.0f} s of training or more (`--sections twin` "
        "gives it the whole budget: about 3 minutes of training)",
        "nanoGPT's published 1.4697 is its mean loss over 256-character windows: compare "
        "valid loss (256-windows), the state reset every 256 characters; valid loss (carried) "
        "carries the state through the whole split",
    ]
    if dry:
        out["notes"].append(f"dry run: shrunk by {' '.join(DRY_TWIN)} (windows of 16, not 256)")
    cfg = load_run_config(TWIN, DRY_TWIN if dry else [])
    B, T = cfg.data.batch_size, cfg.data.seq_len
    step_s, _, _, _ = train_speed(cfg.model, 65, B, T, dev, steps=2 if dry else 10, warmup=1 if dry else 3)
    left = limit - (time.perf_counter() - started) - TWIN_RESERVE_S
    train_s = min(TWIN_TRAIN_S, max(15.0, left))
    steps = cfg.train.steps if dry else max(50, min(cfg.train.steps, int(train_s / (step_s * LOOP_OVERHEAD))))
    out["planned"] = {"step_s_microbenchmark": step_s, "train_s": train_s, "steps": steps}
    print(f"  twin: {step_s * 1e3:.1f} ms/step measured; {steps} steps in ~{train_s:.0f} s", flush=True)

    if dev.type == "cuda":  # the subprocess gets the memory this process cached
        torch.cuda.empty_cache()
    data_dir, run_dir = work / f"{TWIN}-data", work / f"{TWIN}-run"
    prepare = [
        f"configs/prepare/{TWIN}.yaml",
        f"output={data_dir}",
        f"source.paths=[{data}]",
        "overwrite=true",
    ]
    if dry:
        prepare.append("source.limit_bytes=60000")
    t0 = time.perf_counter()
    _launch(["prepare", *prepare, "--executor", "inline"], log, limit - (time.perf_counter() - started) - 5)
    prepare_s = time.perf_counter() - t0
    overrides = [
        f"run_dir={run_dir}",
        f"data.path={data_dir}",
        f"train.steps={steps}",
        f"train.time_limit_min={train_s * 1.15 / 60:.3f}",
        "train.resume=none",
        "overwrite=true",
        *(DRY_TWIN if dry else []),  # its train.steps is the steps above
    ]
    t0 = time.perf_counter()
    left = limit - (time.perf_counter() - started) - 3
    _launch(["pretrain", f"configs/pretrain/{TWIN}.yaml", *overrides, "--executor", "inline"], log, left)
    pretrain_s = time.perf_counter() - t0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    final = next((r for r in reversed(records) if "valid/loss" in r), {})
    speeds = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
    steps_done = max((r.get("step", 0) for r in records), default=0)
    carried, windowed = final.get("valid/loss", float("nan")), final.get("valid/loss_window", float("nan"))
    beats = windowed < NANOGPT_VAL_LOSS
    full = not dry and train_s >= TWIN_FULL_S
    if dry:
        verdict: Any = "n/a (dry run)"
    else:
        verdict = beats if full else f"{beats} (not checked: {train_s:.0f} s of training)"
    out["rows"] = [
        {
            "run": f"{TWIN}.yaml" + (" (dry run, shrunk)" if dry else ""),
            "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(dev),
            "steps": steps_done,
            "prepare (s)": prepare_s,
            "pretrain (s, with start and evaluation)": pretrain_s,
            "tokens/s (median of logs)": sorted(speeds)[len(speeds) // 2] if speeds else None,
            "valid loss (carried)": carried,
            "valid loss (256-windows)": windowed,
            "nanoGPT": NANOGPT_VAL_LOSS,
            "beats nanoGPT": verdict,
        }
    ]
    out["log"] = str(log)
    checks = out.setdefault("checks", [])
    checks.append({"name": "twin valid loss finite", "pass": math.isfinite(carried), "value": carried})
    checks.append({"name": "twin windowed loss finite", "pass": math.isfinite(windowed), "value": windowed})
    if full:
        checks.append({"name": "twin beats nanoGPT's 1.4697 (windowed)", "pass": beats, "value": windowed})
    print(f"  twin: valid loss {carried:.4f} carried, {windowed:.4f} in windows", flush=True)
