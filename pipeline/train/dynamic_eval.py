"""Dynamic evaluation of a language model: it adapts to the text it reads (Krause et al. 2018,
"Dynamic Evaluation of Neural Sequence Models").

A split is read as :func:`rnnpipe.pipeline.train.evaluate.evaluate` reads it (world × ``streams``
contiguous streams, each from its start, the state carried from segment to segment), but after
scoring segment s_i the weights take one step on that segment's loss L(s_i), the mean over its
target tokens (over every stream and rank): segment i + 1 is predicted by weights adapted to all
the text before it. With θ₀ the trained weights and g = ∇L(s_i), the two rules are

- ``sgd``: θ ← θ − η g + λ (θ₀ − θ);
- ``rms`` (Krause's "RMS with an RMS global prior"): θ ← θ − η g / (√MS + ε) + λ r ⊙ (θ₀ − θ),
  where MS is the mean square of the gradient over training batches (:func:`gradient_mean_square`,
  at θ₀, segments shaped as the evaluation's) and r = min(√MS / mean(√MS), 1/λ) element-wise
  (the mean over every element of every adapted parameter): weights whose training gradients are
  large decay faster, and the clip keeps the decay from overshooting θ₀.

Only a copy of the model is adapted: the model passed in (and so the checkpoints and the export
made from it) is left bit for bit as it was. The copy's forward runs in the model's dtype (bf16
under ``train.precision=bf16``, as the static evaluation does) and its updates accumulate in fp32
master weights. Parameters that require no gradient (``model.freeze``) stay fixed. On several ranks
the gradients are summed across them (one all-reduce per segment), so every rank keeps the same
adapted weights and the result is that of one rank reading all world × streams streams.

ZeRO-3's partitioned parameters are refused: under ZeRO-3 it runs on the consolidated export
(:func:`evaluate_export`, ``rnnpipe evaluate EXPORT``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from rnnpipe.pipeline.data.config import DEFAULT_VERIFY
from rnnpipe.pipeline.data.reader import SplitReader, open_split
from rnnpipe.pipeline.engine.rank import RankContext
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.models.mixers import detach_state
from rnnpipe.pipeline.train.config import DYNAMIC_METHODS, EvalConfig, PretrainConfig
from rnnpipe.pipeline.train.data import IGNORE, Batch, StreamBatches, eval_batches
from rnnpipe.pipeline.train.evaluate import (
    PROGRESS_FRACTION,
    PROGRESS_MIN_S,
    _Progress,
    eval_batch_count,
    evaluate,
    split_name,
    summarize,
)

log = logging.getLogger("rnnpipe.train")
SUFFIX = "_dynamic"  # the loop's results: test/bpb (static) beside test/bpb_dynamic


class DynamicUpdate:
    """One step of the rule on ``params`` (a model's parameters, any dtype): their fp32 masters
    (the parameters themselves when fp32), the trained values θ₀, and for ``rms`` the per-element
    step scale 1 / (√MS + ε) and decay rate min(λ √MS / mean √MS, 1), from ``mean_square`` (MS,
    one tensor per parameter, its shape)."""

    def __init__(
        self,
        params: list[torch.Tensor],
        method: str,
        lr: float,
        decay: float,
        eps: float = 1e-5,
        mean_square: list[torch.Tensor] | None = None,
    ):
        if method not in DYNAMIC_METHODS:
            raise ValueError(f"method {method!r}: expected one of {', '.join(DYNAMIC_METHODS)}")
        self.params, self.lr, self.decay = params, lr, decay
        self.shared = [p.dtype == torch.float32 for p in params]  # updated in place, no master copy
        with torch.no_grad():
            self.masters = [
                p.detach() if s else p.detach().float() for p, s in zip(params, self.shared, strict=True)
            ]
            self.theta0 = [m.clone() for m in self.masters]
        self.step_scale: list[torch.Tensor] | None = None
        self.decay_rate: list[torch.Tensor] | None = None
        if method == "rms":
            if mean_square is None or len(mean_square) != len(params):
                raise ValueError("the rms rule needs the gradients' mean square, one tensor per parameter")
            rms = [ms.float().sqrt() for ms in mean_square]
            numel = sum(r.numel() for r in rms)
            mean = float(sum(r.sum() for r in rms)) / max(numel, 1) if rms else 0.0
            self.step_scale = [1.0 / (r + eps) for r in rms]
            # (all-zero statistics: no gradient was seen; the decay is then λ everywhere)
            self.decay_rate = [
                (decay * r / mean).clamp(max=1.0) if mean > 0 else torch.full_like(r, decay) for r in rms
            ]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        """θ ← θ − η g (÷ (√MS + ε)) + λ (r ⊙) (θ₀ − θ), with ``grads`` (fp32, the parameters' shapes)
        the gradient of the segment's mean loss; the parameters get the masters' new values."""
        for i, (p, m, t0, g) in enumerate(zip(self.params, self.masters, self.theta0, grads, strict=True)):
            if self.decay_rate is not None:
                m.add_((t0 - m) * self.decay_rate[i])
            elif self.decay:
                m.add_(t0 - m, alpha=self.decay)
            m.add_(g if self.step_scale is None else g * self.step_scale[i], alpha=-self.lr)
            if not self.shared[i]:
                p.copy_(m)


def working_copy(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A deep copy of ``model`` in eval mode (no dropout), and the copy's parameters that require a
    gradient, in ``parameters()`` order (a tied embedding is one of them). The model is not touched."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise PipelineError(
            "dynamic evaluation needs the whole weights, and these are partitioned by ZeRO-3: run it "
            "on the consolidated export (rnnpipe export RUN OUT, then rnnpipe evaluate OUT)"
        )
    work = copy.deepcopy(model).eval()
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        raise PipelineError("dynamic evaluation: no parameter of the model requires a gradient")
    return work, params


def _segment(
    model: torch.nn.Module, params: list[torch.nn.Parameter], batch: Batch, state: Any, device: torch.device
) -> tuple[torch.Tensor, list[torch.Tensor], Any]:
    """(the nats summed over the batch's targets, [] float64; their gradient with respect to
    ``params``, fp32, each its parameter's shape (zeros where unused); the state after the batch,
    detached)."""
    with torch.enable_grad():
        logits_BTV, state = model(batch.inputs_BT.to(device), state)
        targets_BT = batch.targets_BT.to(device)
        nats = F.cross_entropy(
            logits_BTV.float().flatten(0, 1), targets_BT.flatten(), ignore_index=IGNORE, reduction="sum"
        )
        grads = torch.autograd.grad(nats, params, allow_unused=True)
    out = [
        torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
        for p, g in zip(params, grads, strict=True)
    ]
    return nats.detach().double(), out, detach_state(state)


def _mean_gradient(
    grads: list[torch.Tensor], targets: int, world: int, device: torch.device
) -> list[torch.Tensor]:
    """The gradient of the mean loss over every rank's targets, from this rank's gradient of its
    summed nats (``grads``, scaled in place) and its ``targets``: one all-reduce of both."""
    count = float(targets)
    if world > 1:
        flat = torch.cat([g.flatten() for g in grads] + [torch.tensor([count], device=device)])
        dist.all_reduce(flat)
        count = float(flat[-1].item())
        parts = flat[:-1].split([g.numel() for g in grads])
        grads = [x.view_as(g) for x, g in zip(parts, grads, strict=True)]
    return [g.mul_(1.0 / max(count, 1.0)) for g in grads]


def _finite(grads: list[torch.Tensor]) -> bool:
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def gradient_mean_square(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    reader: SplitReader,
    ctx: RankContext,
    streams: int,
    seq_len: int,
    *,
    batches: int = 100,
    should_stop: Callable[[], bool] | None = None,
    check_every: int = 16,
) -> list[torch.Tensor] | None:
    """MS: per parameter of ``params`` (fp32, its shape), the mean over the first ``batches`` batches
    of ``reader`` (the training split; 0 or more than an epoch = one epoch) of the squared gradient of
    each batch's mean loss, at the model's current weights, which it leaves as they are. The split is
    read as training reads it in stream mode: ``ctx.world`` × ``streams`` streams of ``seq_len``
    tokens per batch, the state carried; the model runs on ``ctx.device``. None when ``should_stop``
    said to stop (asked every ``check_every`` batches, all ranks agreeing)."""
    rank, world, device = ctx.rank, ctx.world, ctx.device
    loader = StreamBatches(reader, rank, world, streams, seq_len)
    n = min(batches, loader.steps_per_epoch) if batches else loader.steps_per_epoch
    mean_square = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    progress = _Progress("train (gradient statistics)", n, world, PROGRESS_MIN_S, PROGRESS_FRACTION)
    state = None
    for i in range(n):
        if should_stop is not None and i % check_every == check_every - 1 and ctx.any(should_stop()):
            return None
        batch = next(loader)
        _, grads, state = _segment(model, params, batch, None if batch.reset else state, device)
        for ms, g in zip(mean_square, _mean_gradient(grads, batch.targets, world, device), strict=True):
            ms.addcmul_(g, g)
        if rank == 0:
            progress.update(i + 1, batch.targets)
    return [ms.div_(max(n, 1)) for ms in mean_square]


def evaluate_dynamic(
    model: torch.nn.Module,
    reader: SplitReader,
    ctx: RankContext,
    streams: int,
    seq_len: int,
    *,
    max_tokens: int = 0,
    should_stop: Callable[[], bool] | None = None,
    check_every: int = 16,
    progress_every_s: float = PROGRESS_MIN_S,
    options: EvalConfig | None = None,
    stats_reader: SplitReader | None = None,
    mean_square: list[torch.Tensor] | None = None,
) -> dict[str, float] | None:
    """:func:`~rnnpipe.pipeline.train.evaluate.evaluate` with the model adapting as it reads: the same
    arguments (``ctx``: this rank, of ``ctx.world``, on ``ctx.device``; ``streams`` × ``seq_len``
    tokens per rank per segment; ``max_tokens``: the split's first this many tokens, 0 = all) and
    result (loss in nats per token, bpb, ppl, tokens; None when ``should_stop`` cut it short), each
    segment scored before the step on it. ``model`` is left untouched (a copy adapts).

    ``options``: the rule and its settings (``eval.dynamic_*``; by default ``EvalConfig()``'s). The
    ``rms`` rule needs the gradients' mean square: ``mean_square`` (from :func:`gradient_mean_square`
    on a copy of the same model) or ``stats_reader``, the training split it is computed from
    (``options.dynamic_stat_batches`` batches of ``streams`` × ``seq_len`` per rank). Every rank
    must call it (the gradients are all-reduced when ``ctx.world`` > 1).
    """
    rank, world, device = ctx.rank, ctx.world, ctx.device
    opts = options or EvalConfig()
    work, params = working_copy(model)
    if opts.dynamic_method == "rms" and mean_square is None:
        if stats_reader is None:
            raise PipelineError("eval.dynamic_method=rms needs training data for its gradient statistics")
        mean_square = gradient_mean_square(
            work,
            params,
            stats_reader,
            ctx,
            streams,
            seq_len,
            batches=opts.dynamic_stat_batches,
            should_stop=should_stop,
            check_every=check_every,
        )
        if mean_square is None:
            return None
    rule = DynamicUpdate(
        params, opts.dynamic_method, opts.dynamic_lr, opts.dynamic_decay, opts.dynamic_eps, mean_square
    )
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # nats, targets
    progress = None
    if rank == 0:
        total = eval_batch_count(reader.tokens, world, streams, seq_len, max_tokens)
        name = f"{split_name(reader)} (dynamic)"
        progress = _Progress(name, total, world, progress_every_s, PROGRESS_FRACTION)
    state, skipped = None, 0
    for i, batch in enumerate(eval_batches(reader, rank, world, streams, seq_len, max_tokens)):
        if should_stop is not None and i % check_every == check_every - 1 and ctx.any(should_stop()):
            return None
        nats, grads, state = _segment(work, params, batch, state, device)
        totals[0] += nats
        totals[1] += batch.targets
        grads = _mean_gradient(grads, batch.targets, world, device)
        if _finite(grads):  # (the same on every rank: the gradients are all-reduced)
            rule.step(grads)
        else:
            skipped += 1
        if progress is not None:
            progress.update(i + 1, batch.targets)
    if world > 1:
        dist.all_reduce(totals)
    if skipped and rank == 0:
        log.warning("dynamic evaluation: %d segment(s) with a non-finite gradient made no update", skipped)
    nats_sum, targets = totals.tolist()
    return summarize(nats_sum, targets, reader)


def dynamic_results(
    module: torch.nn.Module,
    cfg: PretrainConfig,
    splits: list[str],
    ctx: RankContext,
    train_reader: SplitReader,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, dict[str, float]] | None:
    """The pretrain loop's final dynamic figures: per split of ``splits`` of the run's dataset,
    ``{"loss_dynamic": ..., "bpb_dynamic": ..., "ppl_dynamic": ...}`` (nats per token, bits per
    byte, perplexity; merged into the static results, they are logged as ``test/bpb_dynamic`` ...).
    ``{}`` when ``eval.dynamic`` is off, or under ZeRO-3 (a warning says to run it on the export);
    None when a signal cut it short (``should_stop``). Every rank of ``ctx.world`` calls it. The
    ``rms`` rule's statistics come from ``train_reader`` once, for every split."""
    e = cfg.eval
    if not e.dynamic:
        return {}
    if cfg.train.zero_stage == 3:
        if ctx.main:
            log.warning(
                "eval.dynamic: skipped under ZeRO-3 (the weights are partitioned); run it on the "
                "export: rnnpipe evaluate %s/export",
                cfg.run_dir,
            )
        return {}
    streams, seq_len = cfg.train.eval_batch_size, e.dynamic_seq_len or cfg.data.seq_len
    mean_square = None
    if e.dynamic_method == "rms":
        work, params = working_copy(module)
        mean_square = gradient_mean_square(
            work,
            params,
            train_reader,
            ctx,
            streams,
            seq_len,
            batches=e.dynamic_stat_batches,
            should_stop=should_stop,
        )
        del work, params
        if mean_square is None:
            return None
    out: dict[str, dict[str, float]] = {}
    for split in splits:
        reader = open_split(cfg.data.path, split, cfg.data.verify, cfg.data.direction)
        result = evaluate_dynamic(
            module,
            reader,
            ctx,
            streams,
            seq_len,
            max_tokens=0,
            should_stop=should_stop,
            options=e,
            mean_square=mean_square,
        )
        if result is None:
            return None
        if ctx.main:
            log.info(
                "%s, dynamic evaluation (%s): loss %.4f, %.4f bits per byte, perplexity %.2f",
                split,
                e.dynamic_method,
                result["loss"],
                result["bpb"],
                result["ppl"],
            )
        out[split] = {f"{k}{SUFFIX}": v for k, v in result.items() if k != "tokens"}
    return out


def evaluate_export(
    export: str | Path,
    data: str | None = None,
    split: str = "test",
    options: EvalConfig | None = None,
    streams: int = 1,
    seq_len: int = 512,
    device: str | torch.device = "cpu",
    verify: str = DEFAULT_VERIFY,
) -> dict[str, float]:
    """An export's static evaluation of ``split`` of a prepared dataset (``data``; by default the
    one it was trained on, from its header rnnpipe.json) and, with ``options.dynamic``, its dynamic one
    beside it: ``{"loss", "bpb", "ppl", "tokens"}`` plus ``loss_dynamic``, ``bpb_dynamic``,
    ``ppl_dynamic``. One process, no process group; the ``rms`` rule reads the dataset's train
    split. A backward LM's export (``data.direction=backward``, :func:`~rnnpipe.pipeline.models.exported.
    export_direction`) reads every split in reverse, as its run did. PipelineError when the
    dataset's tokenizer is not the export's."""
    from rnnpipe.pipeline.models.exported import HEADER, export_direction, export_meta
    from rnnpipe.pipeline.models.pretrained import load_pretrained

    opts = options or EvalConfig(dynamic=True)
    path = Path(export)
    try:
        meta = export_meta(str(path))  # config.json with its header rnnpipe.json's source
    except PipelineError as e:
        raise PipelineError(f"{path}: not an rnnpipe export ({e})") from e
    data = data or (meta.get("source") or {}).get("data")
    if not data:
        raise PipelineError(f"{path}: its {HEADER} names no dataset: give one")
    direction = export_direction(str(path))
    reader = open_split(data, split, verify, direction)
    mine, theirs = meta.get("tokenizer") or {}, reader.manifest["tokenizer"]
    key = ("kind", "vocab_size", "model_sha256")
    if [mine.get(k) for k in key] != [theirs.get(k) for k in key]:
        raise PipelineError(
            f"{data} is tokenized by {theirs.get('kind')} (vocabulary {theirs.get('vocab_size')}), "
            f"the export {path} by {mine.get('kind')} (vocabulary {mine.get('vocab_size')}): "
            "evaluate it on a dataset prepared with its tokenizer"
        )
    ctx = RankContext.single(torch.device(device))
    model = load_pretrained(path, ctx.device)
    result = evaluate(model, reader, ctx, streams, seq_len)
    assert result is not None  # (no should_stop)
    if opts.dynamic:
        stats = open_split(data, "train", verify, direction) if opts.dynamic_method == "rms" else None
        dyn_len = opts.dynamic_seq_len or seq_len
        dyn = evaluate_dynamic(model, reader, ctx, streams, dyn_len, options=opts, stats_reader=stats)
        assert dyn is not None
        result.update({f"{k}{SUFFIX}": v for k, v in dyn.items() if k != "tokens"})
    return result
