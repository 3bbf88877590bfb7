"""rnnpipe's CPU recipe against nanoGPT's, on the same machine, back to back; and LM training
tokens/s against nanoGPT's GPT at equal parameter count.

    python benchmarks/nanogpt.py --nanogpt PATH [--data input.txt] [--write docs/benchmarks.md]
        [--work DIR] [--tables recipe,speed] [--speed-lengths 256,1024] [--speed-rounds 5]

PATH is a checkout of https://github.com/karpathy/nanoGPT (its ``train.py`` and ``model.py`` are
run as they are). Without one the script says why it skipped and exits 0.

The recipe table: nanoGPT's CPU recipe from its README (``train.py config/train_shakespeare_char.py
--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``) on
``data/shakespeare_char`` written here exactly as its ``prepare.py`` writes it (first 90 % of the
characters train, the rest val, the sorted 65 characters), then rnnpipe's
``configs/prepare/tinyshakespeare-cpu.yaml`` + ``configs/pretrain/tinyshakespeare-cpu.yaml``
(inline executor, one process), each timed from process start to exit. Both are scored on the
same val characters (nanoGPT's val split is rnnpipe's valid split, token for token): nanoGPT's
own estimate (its last ``val loss``: 20 random batches of 12 blocks of 64), its checkpoint on the
whole split in 64-character windows (every character once, from 1–64 characters of context:
``eval.window=64``'s scoring), rnnpipe's final evaluation with the state carried and in
64-character windows.

The speed table: one training step (forward, backward, AdamW) of rnnpipe's minGRU and LRN LMs
and nanoGPT's GPT (4 layers each, widths giving ~3 M parameters, 65 symbols) at T = 256 and
1024 with the same tokens per step, interleaved in one process, medians of ``--speed-rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from kernel_speed import machine, others_share, replace_section  # noqa: E402

BEGIN, END = "<!-- nanogpt:begin -->", "<!-- nanogpt:end -->"
SPEED_BEGIN, SPEED_END = "<!-- nanogpt-speed:begin -->", "<!-- nanogpt-speed:end -->"
PREPARE = REPO / "configs/prepare/tinyshakespeare-cpu.yaml"
RECIPE = REPO / "configs/pretrain/tinyshakespeare-cpu.yaml"
DEFAULT_DATA = REPO.parent / "shared/data/tinyshakespeare/input.txt"
NANOGPT_ARGS = [  # its README's CPU recipe, on config/train_shakespeare_char.py
    *("--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64"),
    *("--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000"),
    *("--lr_decay_iters=2000", "--dropout=0.0"),
]
WINDOW = 64  # nanoGPT's block size in its CPU recipe: the windowed scoring's context


def missing(nanogpt: str | None) -> str:
    """Why nanoGPT cannot run from ``nanogpt`` ("" when it can)."""
    if not nanogpt:
        return "no nanoGPT checkout given (--nanogpt PATH, a clone of https://github.com/karpathy/nanoGPT)"
    gone = [f for f in ("train.py", "model.py", "configurator.py") if not (Path(nanogpt) / f).is_file()]
    return f"{nanogpt} has no {', '.join(gone)}: not a nanoGPT checkout" if gone else ""


def write_nanogpt_data(text_path: Path, out: Path) -> np.ndarray:
    """``train.bin``, ``val.bin`` (uint16 ids) and ``meta.pkl`` in ``out``, exactly as nanoGPT's
    ``data/shakespeare_char/prepare.py`` writes them (without its download); returns val's ids."""
    data = text_path.read_text()
    chars = sorted(set(data))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(data)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"train": data[: int(n * 0.9)], "val": data[int(n * 0.9) :]}
    ids = {k: np.array([stoi[c] for c in v], dtype=np.uint16) for k, v in splits.items()}
    for k, v in ids.items():
        v.tofile(out / f"{k}.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    (out / "meta.pkl").write_bytes(pickle.dumps(meta))
    return ids["val"].astype(np.int64)


def timed(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> float:
    """Run ``cmd`` (output to ``log``); its wall time in seconds, process start to exit."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    if code:
        sys.exit(f"{' '.join(cmd)} failed with status {code}: see {log}")
    return wall


def run_nanogpt(nanogpt: Path, work: Path, text: Path) -> dict:
    """nanoGPT's CPU recipe in ``work``: wall time, its last val estimate, its checkpoint scored in
    64-character windows on the whole val split."""
    val = write_nanogpt_data(text, work / "data/shakespeare_char")
    (work / "configurator.py").write_bytes((nanogpt / "configurator.py").read_bytes())  # (exec'd from cwd)
    cmd = [sys.executable, str(nanogpt / "train.py"), str(nanogpt / "config/train_shakespeare_char.py")]
    share = others_share()
    wall = timed(cmd + NANOGPT_ARGS, work, work / "nanogpt.log")
    log = (work / "nanogpt.log").read_text()
    steps = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", log)
    params = re.search(r"number of parameters: ([\d.]+)M", log)
    ckpt = score_nanogpt(nanogpt, work / "out-shakespeare-char/ckpt.pt", val)
    return {
        "wall_s": wall,
        "others": share(),
        "val_estimate": float(steps[-1][2]),
        "params_m": float(params.group(1)) if params else None,
        **ckpt,
    }


def score_nanogpt(nanogpt: Path, ckpt_path: Path, val: np.ndarray) -> dict:
    """nanoGPT's checkpoint (loaded with its ``model.py``) on every character of ``val`` after the
    first, in windows of :data:`WINDOW` from the split's start: nats per character."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's

    # (a pickle with nanoGPT's config: only the checkpoint this script's own nanoGPT run just wrote)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    model.eval()
    x = torch.from_numpy(val)
    nats, count = 0.0, 0
    starts = list(range(0, len(val) - 1, WINDOW))
    with torch.no_grad():
        for lo in range(0, len(starts), 256):  # 256 windows per forward
            group = starts[lo : lo + 256]
            full = [s for s in group if s + WINDOW < len(val)]
            rows = [(torch.stack([x[s : s + WINDOW] for s in full]), full)] if full else []
            rows += [(x[s : len(val) - 1][None], [s]) for s in group if s + WINDOW >= len(val)]
            for inputs, ss in rows:
                n = inputs.shape[1]
                targets = torch.stack([x[s + 1 : s + 1 + n] for s in ss])
                logits, _ = model(inputs, targets)  # (with targets: the logits at every position)
                nats += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
                count += targets.numel()
    assert count == len(val) - 1
    return {"val_window": nats / count, "ckpt_iter": int(ckpt["iter_num"])}


def run_recipe(work: Path, text: Path) -> dict:
    """rnnpipe's recipe (prepare + pretrain, inline executor) in ``work``: wall time (and the part
    before the first training step), its final valid figures."""
    env = {**os.environ, "RNNPIPE_PROGRESS": "0"}
    rnnpipe = [sys.executable, "-m", "launch", "-q"]
    data, run = work / "data", work / "run"
    work.mkdir(parents=True, exist_ok=True)
    share = others_share()
    prep = timed(
        [
            *rnnpipe,
            "prepare",
            str(PREPARE),
            f"output={data}",
            f"source.paths=[{text}]",
            "--executor",
            "inline",
        ],
        REPO,
        work / "prepare.log",
        env,
    )
    t0 = time.time()
    train = timed(
        [*rnnpipe, "pretrain", str(RECIPE), f"run_dir={run}", f"data.path={data}", "--executor", "inline"],
        REPO,
        work / "pretrain.log",
        env,
    )
    return {"wall_s": prep + train, "prepare_s": prep, "others": share(), **read_recipe(run, data, t0)}


def read_recipe(run: Path, data: Path, t0: float) -> dict:
    """The recipe run's final valid figures, model and startup (seconds from ``t0``, the pretrain
    process's start, to its first training step) from its run dir."""
    from rnnpipe.launch.stages.pretrain import PretrainJob
    from rnnpipe.pipeline.config import load_config
    from rnnpipe.pipeline.models.flops import model_params

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in reversed(records) if "valid/loss_window" in r)
    logged = [r for r in records if "train/loss" in r]
    first = logged[0]  # the first logged step: startup is the time until the first step began
    startup = first["time"] - first["step"] * first["train/step_time_s"] - t0
    cfg = load_config(PretrainJob, str(RECIPE), [f"data.path={data}"])
    vocab = json.loads((data / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    return {
        "startup_s": startup,
        "train_steps": int(logged[-1]["step"]),
        "val_carried": final["valid/loss"],
        "val_window": final["valid/loss_window"],
        "params_m": model_params(cfg.model, vocab) / 1e6,
        "model": f"{cfg.model.mixer}, {cfg.model.n_layers} × {cfg.model.d_model}",
    }


def recipe_table(ng: dict, ours: dict, command: str) -> str:
    """The recipe table's markdown (machine, command, date, the rows, what they mean)."""
    head = (
        f"{machine()}, Python {sys.version.split()[0]}; {date.today().isoformat()}; `{command}`. "
        "Wall time: each run's processes from start to exit, back to back (rnnpipe: prepare + "
        f"pretrain, inline executor, of which {ours['startup_s']:.0f} s before its first training step). "
        f"Other processes took {max(ng['others'], ours['others']):.0%} of the CPU time at most while "
        "they ran. "
        "Val loss in nats per character on the same 111,540 val characters."
    )
    rows = [
        "| run | model | params | wall s | nanoGPT's estimate (20 × 12 random blocks) "
        "| whole split, 64-char windows | whole split, state carried |",
        "|---|---|---|---|---|---|---|",
        f"| nanoGPT CPU recipe | GPT, 4 × 128, block 64 | {ng['params_m']:.2f} M | {ng['wall_s']:.0f} "
        f"| {ng['val_estimate']:.4f} | {ng['val_window']:.4f} (iter {ng['ckpt_iter']} checkpoint) | – |",
        f"| rnnpipe `tinyshakespeare-cpu` | {ours['model']} | {ours['params_m']:.2f} M "
        f"| {ours['wall_s']:.0f} | – | {ours['val_window']:.4f} | {ours['val_carried']:.4f} |",
    ]
    return head + "\n\n" + "\n".join(rows)


def speed_rows(nanogpt: Path, lengths: list[int], tokens: int, rounds: int) -> list[dict]:
    """Training tokens/s of minGRU, LRN and nanoGPT's GPT (~3 M parameters each) at each T, the
    models' steps interleaved round by round; medians."""
    import torch
    import torch.nn.functional as F
    from kernel_speed import width_for

    from rnnpipe.pipeline.models import LanguageModel, MixerKind, ModelConfig
    from rnnpipe.pipeline.models.flops import model_params

    sys.path.insert(0, str(nanogpt))
    from model import GPT, GPTConfig  # nanoGPT's

    vocab, layers, out = 65, 4, []
    for T in lengths:
        B = max(1, tokens // T)
        x = torch.randint(0, vocab, (B, T + 1))
        gpt = GPT(
            GPTConfig(block_size=T, vocab_size=vocab, n_layer=layers, n_head=4, n_embd=256, dropout=0.0)
        )
        target = sum(p.numel() for p in gpt.parameters())
        models = {"nanoGPT GPT": (gpt, target)}
        for kind in (MixerKind.mingru, MixerKind.lrn):
            d = width_for(kind, target, layers, vocab)
            cfg = ModelConfig(mixer=kind, n_layers=layers, d_model=d, mlp_ratio=4.0, n_heads=4, dropout=0.0)
            models[f"rnnpipe {kind.value}"] = (LanguageModel(cfg, vocab), model_params(cfg, vocab))
        steps = {}
        for name, (model, _) in models.items():
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

            def step(model=model, opt=opt, x=x, gpt=model is gpt) -> None:
                if gpt:  # (nanoGPT views its targets: they must be contiguous)
                    _, loss = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
                else:
                    logits, _ = model(x[:, :-1])
                    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step()  # (warm-up)
            steps[name] = step
        times: dict[str, list[float]] = {n: [] for n in models}
        share = others_share()
        for _ in range(rounds):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
        others = share()
        base = B * T / statistics.median(times["nanoGPT GPT"])
        for name, (_, params) in models.items():
            tps = B * T / statistics.median(times[name])
            out.append(
                {"T": T, "B": B, "model": name, "params_m": params / 1e6, "tok_s": tps, "x": tps / base}
            )
        out[-1]["others"] = others
    return out


def speed_table(rows: list[dict], rounds: int, command: str) -> str:
    """The speed table's markdown."""
    others = max(r.get("others", 0.0) for r in rows)
    head = (
        f"{machine()}, Python {sys.version.split()[0]}; {date.today().isoformat()}; `{command}`. "
        "One training step (forward, backward, AdamW) in float32, the models interleaved step by "
        f"step in one process, median of {rounds}; 4 layers each, 65 symbols. Other processes took "
        f"{others:.0%} of the CPU time while it ran."
    )
    lines = ["| T | batch | model | params | tokens/s | × nanoGPT |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['B']} | {r['model']} | {r['params_m']:.2f} M | {r['tok_s']:,.0f} "
            f"| {r['x']:.2f} |"
        )
    return head + "\n\n" + "\n".join(lines)


def write_tables(path: Path, sections: dict[tuple[str, str], str]) -> None:
    """Each body between its (begin, end) markers in ``path`` (appended when absent); the rest of the
    file is left as it was."""
    for (begin, end), body in sections.items():
        replace_section(path, begin, end, body)


def main(argv: list[str] | None = None) -> int:
    """The benchmark; 0 also when it skipped (no nanoGPT checkout)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", help="a nanoGPT checkout (its train.py and model.py are run)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="tinyshakespeare's input.txt")
    p.add_argument("--write", help="write the tables between their markers in this markdown file")
    p.add_argument("--work", help="where the runs go (default: a temporary directory)")
    p.add_argument("--tables", default="recipe,speed", help="recipe, speed or both (recipe,speed)")
    p.add_argument("--speed-lengths", default="256,1024", help="sequence lengths of the speed table")
    p.add_argument("--speed-tokens", type=int, default=4096, help="tokens per training step")
    p.add_argument("--speed-rounds", type=int, default=5, help="interleaved rounds (the median)")
    args = p.parse_args(argv)
    why = missing(args.nanogpt)
    if why:
        print(f"benchmarks/nanogpt.py: skipped: {why}")
        return 0
    nanogpt, text = Path(args.nanogpt).resolve(), Path(args.data).resolve()
    if not text.is_file():
        print(f"benchmarks/nanogpt.py: skipped: {text} not found (--data: tinyshakespeare's input.txt)")
        return 0
    tables = set(args.tables.split(","))
    command = "python benchmarks/nanogpt.py " + " ".join(a for a in (argv or sys.argv[1:]))
    sections: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if "recipe" in tables:
            (work / "nanogpt").mkdir(parents=True, exist_ok=True)
            ng = run_nanogpt(nanogpt, work / "nanogpt", text)
            print(json.dumps({"nanogpt": ng}), flush=True)
            ours = run_recipe(work / "rnnpipe", text)
            print(json.dumps({"rnnpipe": ours}), flush=True)
            sections[(BEGIN, END)] = recipe_table(ng, ours, command)
            print(sections[(BEGIN, END)] + "\n")
        if "speed" in tables:
            lengths = [int(t) for t in args.speed_lengths.split(",")]
            rows = speed_rows(nanogpt, lengths, args.speed_tokens, args.speed_rounds)
            sections[(SPEED_BEGIN, SPEED_END)] = speed_table(rows, args.speed_rounds, command)
            print(sections[(SPEED_BEGIN, SPEED_END)] + "\n")
    if args.write:
        write_tables(Path(args.write), sections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
