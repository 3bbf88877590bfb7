"""Recurrence added to a pretrained transformer (seed 002): every variant on the same GPT-2.

    python benchmarks/recurrence.py [--data ../shared/data] [--runs DIR] [--steps 300] [--quick]
        [--write docs/results.md] [--plot docs/figures/recurrence-convergence.png]

Stage 1 pretrains a small GPT-2 (``configs/pretrain/gpt2-tiny-cpu.yaml``, random init) on
enwik8-head as bytes and exports it; stage 2 (``configs/pretrain/gpt2-recurrence-cpu.yaml``)
trains on from that export with ``model.recurrence.kind`` none and each variant, in two settings:
(a) an equal segment length S = 64, and (b) equal positions per backbone pass (S + the variant's
extra positions = 128, the baseline's). Each run is a real ``rnnpipe pretrain`` (one process,
inline, ``--export``); a run dir whose export is complete is reused. Then, per run: valid and test
bits per byte (the final evaluation: whole splits, state carried), the memory of one training
micro-step (measured on the export, see :func:`step_memory`), training tokens/s, tokens and time
to a common train bits per byte, and generation tokens/s from the export. Writes the section
between MARKERS in ``--write`` and the convergence figure (``--plot``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

from kernel_speed import machine, others_share, replace_section  # noqa: E402
from pretrain import prepare  # noqa: E402

from rnnpipe.pipeline.models.config import RecurrenceConfig, RecurrenceKind  # noqa: E402

BEGIN, END = "<!-- recurrence:begin -->", "<!-- recurrence:end -->"
STAGE1, STAGE2 = "configs/pretrain/gpt2-tiny-cpu.yaml", "configs/pretrain/gpt2-recurrence-cpu.yaml"
SEQ_LEN, BATCH = 128, 8  # both configs' data.seq_len and data.batch_size (a step: 1,024 tokens)
EQUAL_S = 64  # setting (a)'s segment length
MEMORY = {"none": 0, "memory_tokens": 8, "recurrent_summary": 4, "kv_memory": 64}  # m, k, M
LETTER = {"memory_tokens": "m", "recurrent_summary": "k", "kv_memory": "M"}
GENERATE, REPEATS, PROMPT = 256, 3, 32  # generation: tokens, best of, the prompt's bytes
SETTINGS = {"a": "equal segment length (S = 64)", "b": "equal positions per pass (S + extra = 128)"}


@dataclass(frozen=True)
class Variant:
    """One stage-2 run: the recurrence kind, its segment length S and memory (m, k or M)."""

    kind: str
    segment_len: int
    memory: int

    @property
    def extra(self) -> int:
        """Positions a pass takes besides the segment's tokens (pipeline's own arithmetic)."""
        r = RecurrenceConfig(kind=RecurrenceKind(self.kind), segment_len=self.segment_len, memory=self.memory)
        return r.extra_positions()

    @property
    def bptt(self) -> int:
        """2 segments of gradient where a 128-token window holds 2 (none at S = 128 has one)."""
        return min(2, -(-SEQ_LEN // self.segment_len))

    @property
    def name(self) -> str:
        return f"{self.kind}-S{self.segment_len}" + (f"-m{self.memory}" if self.memory else "")

    def overrides(self) -> list[str]:
        values = {"kind": self.kind, "segment_len": self.segment_len, "memory": self.memory}
        return [f"model.recurrence.{k}={v}" for k, v in {**values, "bptt_segments": self.bptt}.items()]


def settings() -> dict[str, list[Variant]]:
    """(a) S = 64 for all; (b) S = 128 - the variant's extra positions (none: 128)."""
    out: dict[str, list[Variant]] = {"a": [], "b": []}
    for kind, m in MEMORY.items():
        out["a"].append(Variant(kind, EQUAL_S, m))
        out["b"].append(Variant(kind, SEQ_LEN - Variant(kind, SEQ_LEN, m).extra, m))
    return out


def pretrain(config: str, run_dir: Path, *overrides: str) -> dict[str, Any]:
    """``rnnpipe pretrain CONFIG ... --export`` (inline, one process); the run's metrics and wall
    time, and the share of the CPUs other processes took meanwhile (None: reused, not run)."""
    reused = (run_dir / "export" / "config.json").exists()
    cmd = [sys.executable, "-m", "launch", "-q", "pretrain", str(REPO / config), f"run_dir={run_dir}"]
    share, t0 = others_share(), time.perf_counter()
    subprocess.run(
        [*cmd, *overrides, "--executor", "inline", "--export"],
        check=True,
        env={**os.environ, "RNNPIPE_PROGRESS": "0"},
    )
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    record = run_dir / "benchmark.json"  # the first run's wall time and CPU share, for a reuse
    if reused and record.exists():
        first = json.loads(record.read_text())
        return {"metrics": lines, "wall_s": first["wall_s"], "others": first["others"], "dir": run_dir}
    out = {"wall_s": time.perf_counter() - t0, "others": None if reused else share()}
    if not reused:
        record.write_text(json.dumps(out) + "\n")
    return {"metrics": lines, **out, "dir": run_dir}


def train_log(metrics: list[dict]) -> list[dict]:
    return [x for x in metrics if "train/bpb" in x]


def final(metrics: list[dict], key: str) -> float:
    return [x[key] for x in metrics if key in x][-1]


def to_target(metrics: list[dict], target: float) -> tuple[int, float] | None:
    """(tokens seen, seconds of training) at the first logged train bpb ≤ ``target``; None if never.
    The clock starts where the first window began: its time less its steps × step time."""
    log = train_log(metrics)
    t0 = log[0]["time"] - log[0]["train/step_time_s"] * log[0]["step"]
    hit = next((x for x in log if x["train/bpb"] <= target), None)
    return None if hit is None else (int(hit["train/tokens_seen"]), hit["time"] - t0)


def step_memory(model: Any, batch: int, seq_len: int) -> dict[str, int]:
    """Bytes of one training micro-step of ``model`` on [batch, seq_len] tokens, deterministically:
    ``saved``: the distinct storages autograd saves for backward (parameters excluded), the most
    over consecutive windows covering every alignment of a window to the segments (S / gcd(S, T)
    of them, plus the first, from the empty state); ``state``: the carried state in; ``model``:
    fp32 parameters + gradients + AdamW's two moments (trainable parameters only)."""
    import torch
    import torch.nn.functional as F

    from rnnpipe.pipeline.models.mixers import detach_state

    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    windows = model.segment_len // math.gcd(model.segment_len, seq_len) + 1
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.vocab_size, (batch, windows * seq_len + 1), generator=gen)
    state, peak = None, {"saved": 0, "state": 0}
    for i in range(windows):
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor, saved: dict[int, int] = saved) -> torch.Tensor:
            s = t.untyped_storage()
            if s.data_ptr() not in params and s.nbytes():
                saved[s.data_ptr()] = s.nbytes()
            return t

        x = tokens[:, i * seq_len : (i + 1) * seq_len].clone()
        y = tokens[:, i * seq_len + 1 : (i + 1) * seq_len + 1].clone()
        carried = 0 if state is None else sum(t.untyped_storage().nbytes() for t in state)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, state = model(x, state)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        if sum(saved.values()) + carried > peak["saved"] + peak["state"]:
            peak = {"saved": sum(saved.values()), "state": carried}
        loss.backward()
        model.zero_grad(set_to_none=True)
        state = detach_state(state)
    n = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**peak, "model": 4 * n + 4 * trainable + 8 * trainable, "params": n}


def generation_speed(model: Any, prompt: Any, n: int, repeats: int) -> float:
    """Tokens/s of ``model.generate`` (greedy, batch 1, the prompt's read included): the best of
    ``repeats``, on one thread (a batch-1 step of a small model is too small to split: on a busy
    machine two threads made it 20× slower)."""
    import torch

    model.eval()
    threads, best = torch.get_num_threads(), math.inf
    torch.set_num_threads(1)
    try:
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(prompt, n, temperature=0.0)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return n / best


BINS = ((0, 16), (16, 32), (32, 64), (64, 96), (96, 128))


def by_position(export: Path, reader: Any, n: int = 16384) -> list[float]:
    """Bits per token of ``export`` (kind none, its trained segments of 128) at each position bin
    of :data:`BINS` within a segment, over the first ``n`` tokens of ``reader``: whether the
    model uses more context at all (if later positions are not better, no carried state can help)."""
    import torch
    import torch.nn.functional as F

    from rnnpipe.pipeline.models.pretrained import load_pretrained

    model = load_pretrained(export)
    S = model.segment_len
    tokens = torch.from_numpy(reader.read(0, n + 1)).long()[None]
    per = torch.zeros(S)
    with torch.no_grad():
        for i in range(0, n - S + 1, S):
            logits, _ = model(tokens[:, i : i + S])
            per += F.cross_entropy(logits[0].float(), tokens[0, i + 1 : i + S + 1], reduction="none")
    per /= n // S
    return [per[a:b].mean().item() / math.log(2) for a, b in BINS if b <= S]


def measure(run: dict[str, Any], prompt: Any) -> dict[str, Any]:
    """The export's step memory and generation speed, and the run's logged numbers."""
    from rnnpipe.pipeline.models.pretrained import load_pretrained

    model = load_pretrained(run["dir"] / "export")
    m = run["metrics"]
    logged = train_log(m)
    mem = step_memory(model, BATCH, SEQ_LEN)
    return {
        **run,
        **mem,
        "total": mem["saved"] + mem["state"] + mem["model"],
        "gen": generation_speed(model, prompt, GENERATE, REPEATS),
        "valid": final(m, "valid/bpb"),
        "test": final(m, "test/bpb"),
        "train_final": logged[-1]["train/bpb"],
        "tok_s": statistics.median(x["train/tokens_per_s"] for x in logged[1:] or logged),
        "rss_gb": max(x["train/memory_gb"] for x in logged),
        "curve": [(x["train/tokens_seen"], x["train/bpb"]) for x in logged],
    }


def mb(n: float) -> str:
    return f"{n / 2**20:.1f}"


def table(rows: list[tuple[Variant, dict]], base_params: int, target: float) -> list[str]:
    head = (
        "| variant | S | extra pos. | bptt | added params | valid bpb | test bpb | saved MB | "
        "total MB | RSS GB | train tok/s | tokens to target | s to target | generate tok/s | others' CPU |"
    )
    out = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for v, r in rows:
        hit = to_target(r["metrics"], target)
        reach = ("not reached", "–") if hit is None else (f"{hit[0]:,}", f"{hit[1]:.0f}")
        label = v.kind + (f" ({LETTER[v.kind]}={v.memory})" if v.memory else "")
        others = "reused" if r["others"] is None else f"{r['others']:.0%}"
        out.append(
            f"| {label} | {v.segment_len} | {v.extra} | {v.bptt} | {r['params'] - base_params:,} | "
            f"{r['valid']:.3f} | {r['test']:.3f} | {mb(r['saved'])} | {mb(r['total'])} | {r['rss_gb']:.2f} | "
            f"{r['tok_s']:,.0f} | {reach[0]} | {reach[1]} | {r['gen']:,.0f} | {others} |"
        )
    return out


def plot_convergence(
    out: str, results: dict[str, list[tuple[Variant, dict]]], target: float, note: str
) -> str:
    """Train bits per byte against tokens seen, one panel per setting, one line per variant."""
    from charts import _finish

    from rnnpipe.launch.commands.plot import check_png, new_figure, save_png

    check_png(out)
    fig = new_figure()
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (key, rows) in zip(axes, results.items(), strict=True):
        for i, (v, r) in enumerate(rows):
            x, y = zip(*r["curve"], strict=True)
            ax.plot(x, y, color=f"C{i}", lw=1.6, label=f"{v.kind} S={v.segment_len}")
        ax.axhline(target, color="0.3", ls="--", lw=1, label=f"target {target:.2f}")
        ax.set_title(f"({key}) {SETTINGS[key]}", fontsize=9.5)
        ax.set_xlabel("tokens seen (stage 2)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5)
    axes[0].set_ylabel("train bits per byte")
    _finish(fig, axes[0], None, note)
    return save_png(fig, out)


def section(args: argparse.Namespace, s1: dict, results: dict, target: float, extra: dict) -> str:
    """The markdown between the markers: what was run, the tables, the discussion, the command."""
    quick = args.quick
    tokens = args.steps * BATCH * SEQ_LEN
    label = (
        f"> **Quick run** (`--quick`: stage 1 {extra['s1_steps']} steps, stage 2 {args.steps} steps): "
        "a check "
        "that the benchmark runs end to end, not a result. `make bench-recurrence` rewrites this section "
        "full size.\n\n"
        if quick
        else ""
    )
    lines = [
        "## Recurrence added to a pretrained transformer (seed 002)",
        "",
        label + f"Made by `python benchmarks/recurrence.py{' --quick' if quick else ''}` on "
        f"{machine()}, {time.strftime('%Y-%m-%d')}; its runs took {extra['wall'] / 60:.1f} minutes.",
        "",
        "**What was run.** Stage 1: `rnnpipe pretrain configs/pretrain/gpt2-tiny-cpu.yaml "
        f"data.path=DATA {' '.join(extra['s1_over'])} --export`: a GPT-2 of 4 layers × 128 (4 heads, "
        f"256 positions, {s1['params']:,} parameters, random init) on enwik8-head bytes, "
        f"{extra['s1_steps']} steps of {BATCH} × {SEQ_LEN} tokens; it ends at valid "
        f"{s1['valid']:.3f}, test {s1['test']:.3f} bits per byte, the starting point of every stage-2 "
        "run. Its bits per token by position in a 128-byte segment (valid, "
        + ", ".join(f"{a}–{b - 1}: {v:.2f}" for (a, b), v in zip(BINS, s1["by_position"], strict=False))
        + ") say how much it reads context at all: where later positions are no better than early "
        "ones, no carried state can help yet. Stage 2: `rnnpipe pretrain "
        "configs/pretrain/gpt2-recurrence-cpu.yaml data.path=DATA "
        f"model.hf.path=STAGE1/export {' '.join(extra['s2_over'])}` plus each row's "
        "`model.recurrence.kind`, `segment_len` (S), `memory` (m/k/M) and `bptt_segments`: "
        f"{args.steps} steps of {BATCH} × {SEQ_LEN} tokens ({tokens:,} tokens), AdamW lr 1e-3, "
        "nothing frozen, one process, fp32. Data: enwik8-head (bytes) with "
        f"{args.split:.1%} valid and test splits ({extra['split_bytes']:,} bytes each), not enwik8's 5 %, "
        "so that the final evaluation, which reads the whole split with the state carried through "
        f"{extra['streams']} streams, covers the same bytes for every run. Setting (b)'s kv_memory row is "
        "the same run as (a)'s (S = 64, M = 64 already fills 128 positions).",
        "",
        "Columns: *extra pos.* the positions a pass uses besides its S tokens (memory_tokens 2m, "
        "recurrent_summary k, kv_memory up to M); *added params* beyond the stage-1 model; *valid / "
        "test bpb* the run's final evaluation; *saved MB* the tensors autograd saves for backward in one "
        f"training micro-step of {BATCH} × {SEQ_LEN} tokens (the export reloaded, "
        "`torch.autograd.graph.saved_tensors_hooks`, distinct storages, parameters excluded; the most "
        "over windows covering every alignment of a window to the segments); *total MB* that plus the "
        "carried state and fp32 parameters, gradients and AdamW's two moments: deterministic, the "
        "CPU stand-in for a GPU's peak memory; *RSS GB* the run's logged `train/memory_gb`, on CPU the "
        "training process's resident size (Python, torch, DeepSpeed included): it hardly moves with "
        "the model; *train tok/s* the median of the logged windows after the first; *tokens / s to "
        f"target* when the logged train bits per byte (a {extra['log_every']}-step window's mean) first "
        f"reached {target:.3f}, the higher of the two `none` runs' final values (seconds from the "
        "start of training); *generate tok/s* `generate` of the export, greedy, batch 1, "
        f"{GENERATE} tokens after a {PROMPT}-byte prompt, one thread, best of {REPEATS}; "
        "*others' CPU* the share of the machine's CPU time other processes took during the run "
        "(throughput and times are only as good as it is small).",
    ]
    for key, rows in results.items():
        lines += ["", f"**({key}) {SETTINGS[key]}**", "", *table(rows, s1["params"], target)]
    lines += [
        "",
        "![Train bits per byte against tokens seen for every variant, both settings]"
        "(figures/recurrence-convergence.png)",
        "",
        "### Beside Yoshida et al. and the thesis's questions",
        "",
        *findings(results),
        "",
        "Yoshida, Ettinger & Gimpel (2020) add a small recurrence module to GPT-2 (124M, pretrained "
        "on WebText) and find it beats the unmodified model on PG-19 and WikiText-103 at equal compute "
        "or memory; RMT (Bulatov et al. 2022) and Transformer-XL are the memory-token and cached-state "
        "designs. What is measured here is the same question at toy scale: a 4-layer, 128-wide GPT-2 "
        "pretrained by rnnpipe itself on 4 MB of bytes for minutes, continued for a few hundred "
        "steps on 2 CPU cores, with segments of 64–128 bytes. Its bits per byte are far from "
        "converged, so small differences between variants are within what another seed or budget "
        "would change; the memory columns are exact for these shapes; throughput and timings are "
        "CPU figures (and the attention cost a longer pass adds is small at 128 positions). "
        "What waits for a GPU is the experiment itself: `configs/pretrain/gpt2-recurrence.yaml`, GPT-2 "
        "small from the hub continued on the whole of enwik8 in GPT-2 tokens (segments of 512, "
        "16 memory vectors, 16 × 1,024 tokens a step, bf16) on one 80 GB GPU, with "
        "`torch.cuda.max_memory_allocated` as the peak memory and long-range figures at contexts "
        "where the carried state matters.",
        "",
        "Regenerate (the runs go to `--runs`; a complete run there is reused):",
        "",
        "```bash",
        "make bench-recurrence     # python benchmarks/recurrence.py --data ../shared/data",
        "```",
    ]
    return "\n".join(lines)


def findings(results: dict[str, list[tuple[Variant, dict]]]) -> list[str]:
    """One line per setting, from the numbers: each variant's valid bpb and total memory against none."""
    out = []
    for key, rows in results.items():
        base = rows[0][1]
        parts = []
        for v, r in rows[1:]:
            mem = r["total"] / base["total"]
            parts.append(
                f"{v.kind} {r['valid'] - base['valid']:+.3f} bits per byte at {mem:.2f}× the memory "
                f"and {r['tok_s'] / base['tok_s']:.2f}× the training speed"
            )
        out.append(
            f"- ({key}) {SETTINGS[key]}: against `none` (valid {base['valid']:.3f}), "
            + "; ".join(parts)
            + "."
        )
    a, b = results["a"][0][1], results["b"][0][1]
    out.append(
        f"- Memory: `none` saves {mb(a['saved'])} MB for backward at S = 64 and {mb(b['saved'])} MB at "
        "S = 128. GPT-2's attention here is SDPA, which keeps no S × S matrix for backward, so a step's "
        "activations grow with the positions the backbone reads per window (its tokens, plus each "
        "segment's extra positions and RMT's write pass), not with S²: equal positions per pass, "
        "setting (b), still leaves each variant its extra positions' activations, as the ratios show."
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data root")
    parser.add_argument("--runs", default=str(REPO / "runs" / "bench-recurrence"), help="datasets and runs")
    parser.add_argument("--steps", type=int, help="stage-2 steps per run (default 300; --quick 20)")
    parser.add_argument("--quick", action="store_true", help="tiny runs: an end-to-end check in minutes")
    parser.add_argument("--write", default=str(REPO / "docs" / "results.md"), help="'' to write no doc")
    parser.add_argument("--plot", default=str(REPO / "docs" / "figures" / "recurrence-convergence.png"))
    args = parser.parse_args()
    started = time.perf_counter()
    q = args.quick
    args.steps = args.steps or (20 if q else 300)
    s1_steps, log_every = (40, 5) if q else (600, 10)
    args.split = 0.002 if q else 0.01
    if args.steps < 2 * log_every:
        parser.error(f"--steps must be at least {2 * log_every}: the first logged window is warm-up")
    root = Path(args.runs).resolve() / ("quick" if q else "full")
    src = Path(args.data).resolve() / "enwik8-head" / "enwik8-head.txt"
    split = f"{args.split:g}"
    print(f"recurrence: preparing enwik8-head ({args.split:.1%} valid and test) in {root}", flush=True)
    data = prepare(
        root / f"data-{split}", src, f"source.valid_fraction={split}", f"source.test_fraction={split}"
    )
    common = [f"data.path={data}", f"train.log_every={log_every}", "train.sample_tokens=0"]
    s1_over = [f"train.steps={s1_steps}"] + ([f"optim.warmup_steps={s1_steps // 4}"] if q else [])
    print(f"recurrence: stage 1, {STAGE1}, {s1_steps} steps", flush=True)
    stage1 = pretrain(STAGE1, root / f"stage1-{s1_steps}", *common, *s1_over)
    print(f"recurrence: stage 1 done in {stage1['wall_s']:.0f} s", flush=True)

    import torch
    import yaml

    from rnnpipe.pipeline.data.reader import SplitReader
    from rnnpipe.pipeline.models.pretrained import load_pretrained

    reader = SplitReader(str(data), "valid")
    prompt = torch.from_numpy(reader.read(0, PROMPT))
    s1 = {
        "params": sum(p.numel() for p in load_pretrained(stage1["dir"] / "export").parameters()),
        "valid": final(stage1["metrics"], "valid/bpb"),
        "test": final(stage1["metrics"], "test/bpb"),
        "by_position": by_position(stage1["dir"] / "export", reader),
    }
    s2_over = [f"train.steps={args.steps}"] + ([f"optim.warmup_steps={args.steps // 4}"] if q else [])
    done: dict[str, dict] = {}
    results: dict[str, list[tuple[Variant, dict]]] = {}
    for key, variants in settings().items():
        results[key] = []
        for v in variants:
            if v.name not in done:
                print(f"recurrence: ({key}) {v.name}: {' '.join(v.overrides())}", flush=True)
                run = pretrain(
                    STAGE2,
                    root / f"{v.name}-{args.steps}",
                    *common,
                    f"model.hf.path={stage1['dir'] / 'export'}",
                    *s2_over,
                    *v.overrides(),
                )
                r = done[v.name] = measure(run, prompt)
                print(
                    f"recurrence: ({key}) {v.name}: valid {r['valid']:.3f} test {r['test']:.3f} bpb, "
                    f"{r['tok_s']:,.0f} tok/s, total {mb(r['total'])} MB, "
                    f"generate {r['gen']:,.0f} tok/s, {r['wall_s']:.0f} s",
                    flush=True,
                )
            results[key].append((v, done[v.name]))
    target = max(rows[0][1]["train_final"] for rows in results.values())  # the none runs' finals
    extra = {  # the runs' own times (a reused run's as first measured)
        "wall": stage1["wall_s"] + sum(r["wall_s"] for r in done.values()),
        "s1_steps": s1_steps,
        "s1_over": [*s1_over, *common[1:]],
        "s2_over": [*s2_over, *common[1:]],
        "split_bytes": reader.bytes,
        "streams": yaml.safe_load((stage1["dir"] / "config.yaml").read_text())["train"]["eval_batch_size"],
        "log_every": log_every,
    }
    body = section(args, s1, results, target, extra)
    print(body)
    if args.plot:
        note = (
            f"{'QUICK RUN (--quick), not a result. ' if q else ''}Stage 2 from one stage-1 GPT-2 (4 × 128, "
            f"valid {s1['valid']:.2f} bpb); {args.steps} steps of {BATCH} × {SEQ_LEN} enwik8-head bytes; "
            f"train bpb = the mean of each {log_every}-step window; {machine()}."
        )
        print(plot_convergence(args.plot, results, target, note), flush=True)
    if args.write:
        replace_section(Path(args.write), BEGIN, END, body)
        print(f"recurrence: wrote {args.write} in {(time.perf_counter() - started) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
