"""``rnnpipe evaluate EXPORT [eval.key=value ...]``: an export's static and dynamic evaluation.

    rnnpipe evaluate EXPORT [--data DATASET] [--split test] [--streams 1] [--seq-len 512]
                     [--device auto] [--json FILE] [eval.dynamic_method=rms eval.dynamic_lr=1e-4 ...]

The split (by default the test split of the dataset the export was trained on, from its
header rnnpipe.json, or the config.json of an export from before it) is read as the pretrain
stage's final evaluation reads it, the state carried through
each of ``--streams`` contiguous streams; then, unless ``eval.dynamic=false``, again with dynamic
evaluation (:mod:`rnnpipe.pipeline.train.dynamic_eval`), the ``eval.dynamic_*`` keys as in a pretrain
config; with ``eval.window=N``, again with the state reset every N tokens (as a fixed-context
model of block size N scores the split: :func:`rnnpipe.pipeline.train.evaluate.window_batches`). One
process on one device: this is how a ZeRO-3 run gets its dynamic figures (the loop skips them
under ZeRO-3), from its consolidated export. Stdout gets one line per evaluation; ``--json``
writes the results (``loss``, ``bpb``, ``ppl``, ``tokens``, ``*_window``, ``*_dynamic``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rnnpipe.pipeline.config import check_range, load_config
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.fsio import write_text_atomic
from rnnpipe.pipeline.train.config import EvalConfig

if TYPE_CHECKING:  # (the parser is built without torch: every rnnpipe command builds it)
    import torch

log = logging.getLogger("rnnpipe")


@dataclass
class EvaluateOptions:
    """The ``key=value`` words of the command line: the pretrain config's ``eval`` section, with
    dynamic evaluation on."""

    eval: EvalConfig = field(default_factory=lambda: EvalConfig(dynamic=True))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments, on the ``evaluate`` sub-parser (or a parser of its own)."""
    p.add_argument("export", help="an export directory (rnnpipe export RUN OUT)")
    p.add_argument("overrides", nargs="*", help="eval.key=value, e.g. eval.dynamic_lr=3e-4")
    p.add_argument("--data", help="a prepared dataset (default: the one the export was trained on)")
    p.add_argument("--split", default="test", help="the split to evaluate (test)")
    p.add_argument("--streams", type=int, default=1, help="contiguous streams, the state carried (1)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per segment (512)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    p.add_argument("--json", help="also write the results to this JSON file")


def run(args: argparse.Namespace) -> int:
    """``rnnpipe evaluate``: 0 when the results were printed."""
    from rnnpipe.launch.commands.sample import pick_device
    from rnnpipe.pipeline.train.dynamic_eval import evaluate_export

    check_range("--streams", args.streams, ge=1)
    check_range("--seq-len", args.seq_len, ge=1)
    bad = [x for x in args.overrides if not x.startswith("eval.")]
    if bad:
        raise ConfigError(f"{' '.join(bad)}: only eval.* keys are read here (e.g. eval.dynamic_lr=1e-4)")
    opts = load_config(EvaluateOptions, None, args.overrides).eval
    if not (Path(args.export) / "config.json").is_file():
        raise PipelineError(
            f"{args.export} is not an export directory (no config.json): export a run first "
            "(rnnpipe export RUN_DIR OUT)"
        )
    if args.json:  # before the work: a results file that cannot be written fails now, not after it
        _check_writable(args.json)
    device = pick_device(args.device)
    result = evaluate_export(args.export, args.data, args.split, opts, args.streams, args.seq_len, device)
    print(
        f"{args.split} ({int(result['tokens']):,} tokens): loss {result['loss']:.4f}, "
        f"{result['bpb']:.4f} bits per byte, perplexity {result['ppl']:.2f}"
    )
    if opts.dynamic:
        print(
            f"{args.split}, dynamic ({opts.dynamic_method}, lr {opts.dynamic_lr:g}, decay "
            f"{opts.dynamic_decay:g}): loss {result['loss_dynamic']:.4f}, "
            f"{result['bpb_dynamic']:.4f} bits per byte, perplexity {result['ppl_dynamic']:.2f}"
        )
    if opts.window:
        win = evaluate_window(
            args.export, args.data, args.split, opts.window, args.streams, args.seq_len, device
        )
        result.update({f"{k}_window": v for k, v in win.items() if k != "tokens"})
        print(
            f"{args.split}, in {opts.window}-token windows: loss {win['loss']:.4f}, "
            f"{win['bpb']:.4f} bits per byte, perplexity {win['ppl']:.2f}"
        )
    if args.json:
        write_text_atomic(str(Path(args.json).absolute()), json.dumps(result, indent=1) + "\n")
    return 0


def _check_writable(path: str) -> None:
    """ConfigError naming ``--json`` unless ``path``'s directory exists and this user may write
    there (checked before minutes of evaluation, not after them)."""
    parent = Path(path).absolute().parent
    if not parent.is_dir():
        raise ConfigError(f"--json {path}: no directory {parent}: create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--json {path}: {parent} is not writable: choose another path")


def evaluate_window(
    export: str,
    data: str | None,
    split: str,
    window: int,
    streams: int,
    seq_len: int,
    device: torch.device,
) -> dict[str, float]:
    """An export's evaluation of ``split`` (of ``data``, by default the dataset it was trained on)
    with the state reset every ``window`` tokens: ``{"loss", "bpb", "ppl", "tokens"}``; at most
    ``streams`` × ``seq_len`` tokens per forward pass. The tokenizer check is
    :func:`rnnpipe.pipeline.train.dynamic_eval.evaluate_export`'s, which runs first."""
    from rnnpipe.pipeline.data.config import DEFAULT_VERIFY
    from rnnpipe.pipeline.data.reader import open_split
    from rnnpipe.pipeline.engine.rank import RankContext
    from rnnpipe.pipeline.models.exported import export_direction, export_source
    from rnnpipe.pipeline.models.pretrained import load_pretrained
    from rnnpipe.pipeline.train.evaluate import evaluate

    reader = open_split(
        data or export_source(str(export))["data"], split, DEFAULT_VERIFY, export_direction(export)
    )
    model = load_pretrained(Path(export), device)
    result = evaluate(model, reader, RankContext.single(device), streams, seq_len, window=window)
    assert result is not None  # (no should_stop)
    return result
