"""What a pretrain run reports of its evaluations: each one logged and recorded (with, for the
valid split, a sample generated from its start), and the final evaluation at the end of a
finished run (valid and test, whole; ``eval.window`` and ``eval.dynamic`` beside them; the run's
hparams session).

Used by :mod:`rnnpipe.pipeline.train.loop`; it sees the engine only through ``engine.module``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rnnpipe.pipeline.data.manifest import load_tokenizer
from rnnpipe.pipeline.data.reader import SplitReader, open_split
from rnnpipe.pipeline.engine.metrics import Metrics
from rnnpipe.pipeline.engine.rank import RankContext
from rnnpipe.pipeline.train.config import Direction, PretrainConfig
from rnnpipe.pipeline.train.dynamic_eval import dynamic_results
from rnnpipe.pipeline.train.evaluate import evaluate

log = logging.getLogger("rnnpipe.train")

# (reader, whole split?) -> the split's metrics, or None when a signal cut the evaluation short
EvaluateSplit = Callable[[SplitReader, bool], "dict[str, float] | None"]
WINDOW_SUFFIX = "_window"  # eval.window's results: valid/bpb (carried) beside valid/bpb_window


def report(
    engine: Any,
    cfg: PretrainConfig,
    split: str,
    step: int,
    result: dict[str, float],
    metrics: Metrics,
    rank: int,
    device: torch.device,
    reader: SplitReader,
) -> dict[str, float]:
    """Log and record a split's evaluation (and, for valid, a sample generated from the start of
    ``reader``, the valid split as the run reads it); returns the recorded ``{split/key: value}``.

    A backward run's sample is shown in reading order: its generated text (which precedes the
    prompt in the text) ⟵ the prompt."""
    t = cfg.train
    metrics.scalars(step, {f"{split}/{k}": v for k, v in result.items() if k != "tokens"})
    if rank == 0:
        log.info(
            "%s at step %d: loss %.4f, %.4f bits per byte, perplexity %.2f",
            split,
            step,
            result["loss"],
            result["bpb"],
            result["ppl"],
        )
    if split == "valid" and t.sample_tokens:
        prompt = torch.from_numpy(reader.read(0, min(64, reader.tokens))).to(device)
        gen = torch.Generator(device=device).manual_seed(t.seed)
        engine.module.eval()
        new = engine.module.generate(prompt, t.sample_tokens, temperature=0.8, top_k=40, generator=gen)
        engine.module.train()
        tok = load_tokenizer(cfg.data.path)

        def text(ids: list[int]) -> str:
            return tok.decode(ids).decode("utf-8", "replace")

        if Direction(cfg.data.direction) is Direction.backward:
            sample = text(new[0].tolist()[::-1]) + " ⟵ " + text(prompt.tolist()[::-1])
        else:
            sample = text(prompt.tolist()) + " ⟶ " + text(new[0].tolist())
        metrics.text(step, f"{split}/sample", "```\n" + sample + "\n```")
    return {f"{split}/{k}": v for k, v in result.items() if k != "tokens"}


@dataclass(frozen=True)
class FinalReaders:
    """The run's readers the final evaluation needs: ``train`` (the manifest of its dataset lists
    the splits; ``eval.dynamic``'s ``rms`` statistics are computed on it) and ``valid`` (evaluated
    whole; the prompt of the sample reported with it is read from its start). Both in the run's
    ``data.direction``."""

    train: SplitReader
    valid: SplitReader


def final_evaluation(
    engine: Any,
    cfg: PretrainConfig,
    ctx: RankContext,
    readers: FinalReaders,
    evaluate_split: EvaluateSplit,
    *,
    should_stop: Callable[[], bool],
    metrics: Metrics,
    params: dict[str, Any],
) -> bool:
    """The finished run's final evaluation: valid and (when the dataset has one) test, whole, each
    read in the run's ``data.direction``; with ``eval.window`` the windowed figures
    (:func:`window_results`) and with ``eval.dynamic`` the dynamic ones beside the static ones.
    Reported (:func:`report`, on ``ctx.rank`` 0's log) and recorded with ``params`` as the run's
    hparams session. False, and nothing recorded, when a signal cut it short (the job is then
    requeued and evaluates again).

    ``ctx``: this rank (every rank calls it: the evaluations are collectives). ``readers``: the
    run's train and valid splits (test is opened here). ``evaluate_split(reader, whole)``: the
    static evaluation of a split (loss in nats per token, bpb, ppl, tokens; None when cut short).
    ``should_stop``: asked during the windowed and dynamic evaluations (a signal arrived).
    ``metrics``: where the figures are recorded."""
    splits = {"valid": readers.valid}
    if "test" in readers.train.manifest["splits"]:
        splits["test"] = open_split(cfg.data.path, "test", cfg.data.verify, cfg.data.direction)
    results: dict[str, dict[str, float] | None] = {}
    for split, reader in splits.items():
        result = evaluate_split(reader, True)
        if result is not None and cfg.eval.window:  # eval.window: beside the carried figures
            extra = window_results(engine.module, cfg, split, reader, ctx, should_stop=should_stop)
            result = None if extra is None else {**result, **extra}
        results[split] = result
        if result is None:
            break
    if all(r is not None for r in results.values()):  # eval.dynamic: beside the static figures
        extra = dynamic_results(
            engine.module, cfg, list(results), ctx, readers.train, should_stop=should_stop
        )
        results = {k: None if extra is None else {**r, **extra.get(k, {})} for k, r in results.items()}
    if any(r is None for r in results.values()):
        return False
    final: dict[str, float] = {}
    for split, result in results.items():
        step = engine.global_steps
        final.update(report(engine, cfg, split, step, result, metrics, ctx.rank, ctx.device, readers.valid))
    metrics.hparams(params, final)
    return True


def window_results(
    module: torch.nn.Module,
    cfg: PretrainConfig,
    split: str,
    reader: SplitReader,
    ctx: RankContext,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float] | None:
    """``eval.window``'s figures of a split: ``{"loss_window", "bpb_window", "ppl_window"}`` (nats
    per token, bits per byte, perplexity), the whole split scored with the state reset every
    ``cfg.eval.window`` tokens (:func:`rnnpipe.pipeline.train.evaluate.window_batches`),
    ``train.eval_batch_size`` × ``data.seq_len`` tokens per forward pass on each of ``ctx.world``
    ranks; logged on rank 0. None when a signal cut it short (``should_stop``)."""
    n = cfg.eval.window
    streams, seq_len = cfg.train.eval_batch_size, cfg.data.seq_len
    result = evaluate(module, reader, ctx, streams, seq_len, should_stop=should_stop, window=n)
    if result is None:
        return None
    if ctx.main:
        log.info(
            "%s in %d-token windows (the state reset at each): loss %.4f, %.4f bits per byte, "
            "perplexity %.2f",
            split,
            n,
            result["loss"],
            result["bpb"],
            result["ppl"],
        )
    return {f"{k}{WINDOW_SUFFIX}": v for k, v in result.items() if k != "tokens"}
