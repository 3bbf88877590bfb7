"""``rnnpipe plot RUN_DIR... --out FILE.png``: loss curves of pretrain runs as one PNG.

Every run's train bits per byte (a thin line) and valid bits per byte (a thicker line with
markers) against tokens seen, one colour per run, labelled by its model (mixer, hybrid attention,
layers × width). A pretrain run dir holds ``config.yaml`` (the resolved config) and
``metrics.jsonl``; valid lines carry no token count, so it is taken from the train lines (or, with
none, from the config's tokens per step).

matplotlib is optional (``pip install 'rnnpipe[plot]'``): it is imported only here, on the Agg
canvas (no display), and the figure has a fixed size and dpi, so the PNG is always
:data:`FIGSIZE` × :data:`DPI` pixels. The benchmarks' charts (``benchmarks/charts.py``) draw with
the same helpers.
"""

from __future__ import annotations

import argparse
import bisect
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.errors import ConfigError, PipelineError

FIGSIZE = (8.0, 4.5)  # inches
DPI = 100  # so every PNG is 800 × 450 pixels
METRICS, CONFIG = "metrics.jsonl", "config.yaml"


@dataclass
class Curve:
    """One run's points: (tokens seen, bits per byte) for train and valid, in step order."""

    run_dir: str
    label: str
    train: list[tuple[float, float]] = field(default_factory=list)
    valid: list[tuple[float, float]] = field(default_factory=list)


# ------------------------------------------------------------------------------- matplotlib


def new_figure(figsize: tuple[float, float] = FIGSIZE, dpi: int = DPI) -> Any:
    """A matplotlib Figure on an Agg canvas (no display, no pyplot global state).

    Raises PipelineError saying how to install matplotlib when it is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PipelineError(
            f"drawing a figure needs matplotlib ({e}): pip install 'rnnpipe[plot]' (or matplotlib)"
        ) from e
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, out: str) -> str:
    """Render ``fig`` as a PNG and write it to ``out`` atomically (a temp name, then renamed).

    No ``bbox_inches="tight"``: it would crop the canvas and the pixel size would vary.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    fsio.write_bytes_atomic(out, buf.getvalue())
    return out


def check_png(out: str) -> None:
    """ConfigError unless ``out`` names a .png file."""
    if not str(out).lower().endswith(".png"):
        raise ConfigError(f"--out {out}: must end in .png (the figure is written as a PNG)")


# ------------------------------------------------------------------------------- reading runs


def read_config(run_dir: str) -> dict[str, Any]:
    """The run's resolved config (``config.yaml``); PipelineError naming what is missing."""
    import yaml

    path = fsio.join(run_dir, CONFIG)
    if not fsio.exists(path):
        raise PipelineError(
            f"{run_dir}: not a pretrain run directory: it has no {CONFIG} (the resolved config that "
            f"pretrain writes first){_hint(run_dir)}"
        )
    try:
        cfg = yaml.safe_load(fsio.read_text(path))
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise PipelineError(f"{path}: not a pretrain config (a mapping of sections)")
    return cfg


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The JSON lines of ``metrics.jsonl``; a truncated last line (a run still writing) is skipped."""
    path = fsio.join(run_dir, METRICS)
    if not fsio.exists(path):
        raise PipelineError(
            f"{path}: missing: the run has logged nothing yet, or {run_dir} is not a pretrain run "
            f"directory{_hint(run_dir)}"
        )
    lines = fsio.read_text(path).splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # being appended to right now
                continue
            raise PipelineError(f"{path}, line {n}: not JSON ({e})") from e
    if not out:
        raise PipelineError(f"{path}: empty: the run has logged no step yet")
    return out


def _hint(run_dir: str) -> str:
    """A pipeline run dir holds its pretrain run in pretrain/: say so when that is what was given."""
    inner = fsio.join(run_dir, "pretrain")
    return f" (did you mean {inner}?)" if fsio.exists(fsio.join(inner, METRICS)) else ""


def world_size(run_dir: str, cfg: dict[str, Any]) -> int:
    """The ranks the run trained on: its latest checkpoint's marker, else the config's nproc × nodes."""
    root = fsio.join(run_dir, "checkpoints")
    try:
        tag = fsio.read_text(fsio.join(root, "latest")).strip()
        return int(json.loads(fsio.read_text(fsio.join(root, tag, "COMPLETE")))["world"])
    except (OSError, ValueError, KeyError, TypeError):
        dist = cfg.get("distributed") or {}
        return int(dist.get("nproc") or 1) * int(dist.get("nodes") or 1)


def config_tokens_per_step(run_dir: str, cfg: dict[str, Any]) -> int | None:
    """batch_size × seq_len × world size × grad_accum, or None when the config lacks one of them."""
    data, train = cfg.get("data") or {}, cfg.get("train") or {}
    try:
        n = int(data["batch_size"]) * int(data["seq_len"]) * int(train.get("grad_accum") or 1)
    except (KeyError, TypeError, ValueError):
        return None
    return n * world_size(run_dir, cfg)


def tokens_at(steps: list[int], tokens: list[float], step: int) -> float:
    """Tokens seen at ``step``, from the train lines' (step, tokens_seen) (sorted by step).

    Between two logged steps: linear (exact while tokens per step is constant; an elastic resume
    can change it). Outside them: the nearest line's tokens per step.
    """
    i = bisect.bisect_left(steps, step)
    if i < len(steps) and steps[i] == step:
        return tokens[i]
    if i == 0:
        return step * tokens[0] / steps[0]
    if i == len(steps):
        last = (tokens[-1] - tokens[-2]) / (steps[-1] - steps[-2]) if len(steps) > 1 else 0.0
        rate = last or tokens[-1] / steps[-1]
        return tokens[-1] + (step - steps[-1]) * rate
    s0, s1, t0, t1 = steps[i - 1], steps[i], tokens[i - 1], tokens[i]
    return t0 + (t1 - t0) * (step - s0) / (s1 - s0)


def by_step(lines: list[dict[str, Any]], key: str) -> dict[int, dict[str, Any]]:
    """The lines that have ``key``, by step; a step logged twice (a resumed run) keeps the later line."""
    return {int(x["step"]): x for x in lines if key in x and "step" in x and _finite(x[key])}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def load_curve(run_dir: str, label: str = "", cfg: dict[str, Any] | None = None) -> Curve:
    """A run's train and valid bits per byte against tokens seen (``cfg``: its config, if read)."""
    cfg = read_config(run_dir) if cfg is None else cfg
    lines = read_metrics(run_dir)
    path = fsio.join(run_dir, METRICS)
    train, valid = by_step(lines, "train/bpb"), by_step(lines, "valid/bpb")
    if not train and not valid:
        raise PipelineError(f"{path}: no train/bpb or valid/bpb line yet ({len(lines)} other lines)")
    seen = sorted((s, float(x["train/tokens_seen"])) for s, x in train.items() if "train/tokens_seen" in x)
    seen = [(s, t) for s, t in seen if s > 0]
    if seen:
        steps, tokens = [s for s, _ in seen], [t for _, t in seen]

        def at(step: int) -> float:
            return tokens_at(steps, tokens, step)
    else:  # no token counts logged: the config's tokens per step
        per_step = config_tokens_per_step(run_dir, cfg)
        if per_step is None:
            raise PipelineError(
                f"{path}: no train/tokens_seen, and {run_dir}/{CONFIG} lacks data.batch_size or "
                "data.seq_len: cannot place the points on a tokens axis"
            )

        def at(step: int) -> float:
            return float(step * per_step)

    curve = Curve(run_dir, label or run_label(cfg))
    curve.train = [(at(s), float(train[s]["train/bpb"])) for s in sorted(train) if s > 0]
    curve.valid = [(at(s), float(valid[s]["valid/bpb"])) for s in sorted(valid) if s > 0]
    return curve


# ------------------------------------------------------------------------------- labels


def run_label(cfg: dict[str, Any]) -> str:
    """The model in a few words: mixer (+ attention every k for hybrids), layers × width; a
    huggingface-kind model: its backbone and the recurrence added to it."""
    model = cfg.get("model") or {}
    if model.get("kind") == "huggingface":
        hf, rec = model.get("hf") or {}, model.get("recurrence") or {}
        name = hf.get("path") or hf.get("model_type") or "?"
        parts = name.rstrip("/").split("/")
        name = "/".join(parts[-2:]) if parts[-1] == "export" else parts[-1]  # an export: its run's name
        return f"{name} + {rec.get('kind', 'none')}, segments of {rec.get('segment_len', '?')}"
    mixer = str(model.get("mixer", "?"))
    every = int(model.get("attention_every") or 0)
    if every and mixer != "attention":
        mixer += f" + attention every {every}"
    return f"{mixer}, {model.get('n_layers', '?')}×{model.get('d_model', '?')}"


def unique_labels(labels: list[str], run_dirs: list[str]) -> list[str]:
    """``labels``, with the run dir's name (or as many trailing parts as tell them apart) after
    each label that more than one run shares."""
    out = list(labels)
    for label in set(labels):
        group = [i for i, x in enumerate(labels) if x == label]
        if len(group) < 2:
            continue
        parts = [PurePath(str(run_dirs[i]).rstrip("/")).parts for i in group]
        for k in range(1, max(len(p) for p in parts) + 1):
            tails = ["/".join(p[-k:]) for p in parts]
            if len(set(tails)) == len(tails):
                break
        for i, tail in zip(group, tails, strict=True):
            out[i] = f"{label} ({tail})"
    return out


# ------------------------------------------------------------------------------- drawing


def draw(curves: list[Curve], out: str, title: str | None = None) -> str:
    """Overlay the curves in one figure and write it to ``out`` (a PNG)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    fig = new_figure()
    ax = fig.add_subplot()
    colours = [f"C{i % 10}" for i in range(len(curves))]
    for curve, colour in zip(curves, colours, strict=True):
        if curve.train:
            x, y = zip(*curve.train, strict=True)
            ax.plot(x, y, color=colour, lw=1.0, alpha=0.6)
        if curve.valid:
            x, y = zip(*curve.valid, strict=True)
            ax.plot(x, y, color=colour, lw=2.2, marker="o", ms=4.5, label=curve.label)
        else:  # no evaluation yet: the legend entry is the train line
            ax.plot([], [], color=colour, lw=2.2, label=curve.label)
    xs = [x for c in curves for x, _ in c.train + c.valid if x > 0]
    if xs and max(xs) / min(xs) > 100:  # more than 2 decades: the early steps would be a sliver
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set_ylim(*_ylim(curves))
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("bits per byte")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="0.4", lw=1.0, alpha=0.6),
        Line2D([], [], color="0.4", lw=2.2, marker="o", ms=4.5),
    ]
    labels += ["train (thin)", "valid"]
    ax.legend(handles, labels, loc="upper right", fontsize=9, framealpha=0.9)
    return save_png(fig, out)


def _ylim(curves: list[Curve]) -> tuple[float, float]:
    """Bottom: under the lowest point. Top: the valid curves' highest point, or the train curves'
    after their first tenth: the first steps' 6–8 bits would squash the rest into a line."""
    ys = [y for c in curves for _, y in c.train + c.valid]
    tops = [y for c in curves for _, y in c.valid]
    for c in curves:
        tops += [y for _, y in c.train[len(c.train) // 10 :]]
    lo, hi = min(ys), max(tops or ys)
    pad = 0.05 * (hi - lo) or 0.1
    return lo - pad, min(max(ys), hi + 2 * pad) + pad


def run(args: argparse.Namespace) -> int:
    """The ``plot`` command: read every run dir, draw, write ``args.out``, print its path."""
    check_png(args.out)
    run_dirs = [fsio.absolute(d) for d in args.run_dirs]
    for d in run_dirs:
        if fsio.is_local(d) and not fsio.exists(d):
            raise PipelineError(f"{d}: no such run directory")
    cfgs = [read_config(d) for d in run_dirs]
    labels = unique_labels([run_label(c) for c in cfgs], run_dirs)
    curves = [load_curve(d, lb, c) for d, lb, c in zip(run_dirs, labels, cfgs, strict=True)]
    print(draw(curves, args.out, args.title))
    return 0
