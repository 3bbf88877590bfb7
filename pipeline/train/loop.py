"""The pretrain loop, top to bottom: model, DeepSpeed engine, data, resume, then steps.

``train(cfg)`` runs in every rank's process after the process group is set up (see
:mod:`rnnpipe.launch.processes.distributed`); it knows nothing of Slurm. Its result says ``"done"`` or
``"preempted"`` (a signal arrived: checkpointed, run again to continue) and holds the model.
Inside, a :class:`Trainer` sets up (model, engine, data, resume), then takes steps
(:meth:`Trainer.step`), each followed by :meth:`Trainer.after_step` (log, evaluate, checkpoint,
stop); a :class:`StepGuard` keeps a non-finite step from updating the weights, and a
:class:`~rnnpipe.pipeline.engine.rank.RankContext` says where the process sits (rank, world,
device, run dir).

A step costs the host one synchronisation outside logging, evaluation and checkpoint steps: what
the loop needs to know of it is read in one go at its end (:mod:`rnnpipe.pipeline.train.stepsync`). A step
with a non-finite loss or gradient norm is skipped (no update) and counted; train.max_nonfinite
of them in a row stop the run.

Five environment variables exist for tests only: RNNPIPE_TEST_STEP_DELAY (seconds to sleep after
each step, so a test can signal or kill a run mid-way), RNNPIPE_TEST_EVAL_DELAY (the same per
evaluation batch, see :mod:`rnnpipe.pipeline.train.evaluate`), RNNPIPE_TEST_CHECKPOINT_DELAY (see
:mod:`rnnpipe.pipeline.train.checkpoint`), RNNPIPE_TEST_HUGE_GRAD_AT (micro-steps, comma-separated,
whose gradient is scaled by 1e30: a finite loss with a non-finite gradient norm) and
RNNPIPE_TEST_COMPILE_BACKEND (train.compile's torch.compile backend, ``inductor`` without it:
``aot_eager`` traces the same graphs without compiling C++).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import torch.distributed as dist
import torch.nn.functional as F

from rnnpipe import __version__
from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import flatten, to_dict
from rnnpipe.pipeline.data.manifest import dataset_digest
from rnnpipe.pipeline.data.reader import SplitReader, open_split
from rnnpipe.pipeline.engine.metrics import Metrics
from rnnpipe.pipeline.engine.rank import RankContext
from rnnpipe.pipeline.engine.schedule import step_scheduler
from rnnpipe.pipeline.engine.signals import StopFlag
from rnnpipe.pipeline.engine.state import TrainState
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.locking import exclusive
from rnnpipe.pipeline.models import embeddings
from rnnpipe.pipeline.models.backbone import backbone_source, build_model
from rnnpipe.pipeline.models.config import ModelKind
from rnnpipe.pipeline.models.mixers import detach_state
from rnnpipe.pipeline.provenance import describe_code, provenance
from rnnpipe.pipeline.train import checkpoint, divergence, elastic, init_from, stepsync
from rnnpipe.pipeline.train.config import (
    RESUME_SCHEDULE,
    DataMode,
    Precision,
    PretrainConfig,
    deepspeed_config,
    run_fingerprint,
)
from rnnpipe.pipeline.train.data import IGNORE, PrefetchedBatches, ShuffleBatches, StreamBatches
from rnnpipe.pipeline.train.evaluate import evaluate
from rnnpipe.pipeline.train.report import FinalReaders, final_evaluation, report

log = logging.getLogger("rnnpipe.train")


@dataclass
class TrainResult:
    status: str  # done | preempted
    model: torch.nn.Module  # the trained module (partitioned under ZeRO-3 outside a forward)
    step: int
    exit_status: int = 0  # 0; 75 (USR2/TERM) or 130 (Ctrl-C) when preempted


def train(cfg: PretrainConfig, stop: StopFlag | None = None) -> TrainResult:
    """Train on this rank until ``train.steps`` or a signal. ``stop``: a flag the caller installed
    earlier (so a signal that arrives while this process starts up is not lost); by default the
    loop installs its own for its duration. Rank 0 holds the run dir's lock throughout."""
    # The device the launcher set for this rank (its local rank, or 0 where each task sees one GPU)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    ctx = RankContext(dist.get_rank(), dist.get_world_size(), device, Path(cfg.run_dir))
    if device.type == "cuda":
        gpu_matmul_precision(cfg.train.precision)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    # One writer per run dir: a second run would interleave checkpoints and log every step twice.
    held = contextlib.ExitStack()
    refused = ""
    if ctx.main:
        try:
            held.enter_context(exclusive(str(ctx.run_dir), checkpoint.RUN_LOCK, "pretrain"))
        except PipelineError as e:
            refused = str(e)
    if ctx.any(bool(refused)):
        raise PipelineError(
            refused or f"{ctx.run_dir} is in use by another pretrain (rank 0 could not lock it)"
        )
    try:
        return Trainer(cfg, ctx).run(stop)
    finally:
        held.close()


class StepGuard:
    """What keeps a bad step from touching the weights: the gradient norm where the loop takes it,
    the clip, the held update (rate 0) of a step with a non-finite loss or gradient norm, and the
    count of such steps in a row (train.max_nonfinite of them stop the run).

    DeepSpeed keeps the gradient norm where its optimizer wrappers clip (ZeRO >= 1, and bf16 at
    ZeRO-0), and skips the update when it is not finite; for fp32 at ZeRO-0 it does neither (only
    clips, taking the norm again), so the loop takes the norm and clips with it there (the
    gradients are already all-reduced: every rank gets the same norm)."""

    def __init__(self, cfg: PretrainConfig, ds_config: dict[str, Any]):
        t = cfg.train
        self.own_grad_norm = t.zero_stage == 0
        self.own_clip = self.own_grad_norm and t.precision is Precision.fp32
        self.clip = float(ds_config.get("gradient_clipping") or 0.0)
        if self.own_clip:
            ds_config["gradient_clipping"] = 0.0
        self.max_nonfinite, self.grad_accum = t.max_nonfinite, t.grad_accum
        self.norm_D: torch.Tensor | None = None  # the loop's own gradient norm of the last step
        self.run = 0  # skipped steps in a row
        self.kinds: set[str] = set()  # of the current run of skipped steps

    def take_norm(self, engine: Any) -> torch.Tensor | None:
        """At the accumulation boundary, before anything clips: the loop's own norm (ZeRO-0)."""
        if self.own_grad_norm:
            self.norm_D = stepsync.grad_norm(engine.module)
        return self.norm_D

    def step(self, engine: Any, facts: stepsync.StepFacts) -> str | None:
        """``engine.step()``, held (no update: every weight stays as it is) when the step's loss or
        norm is not finite, clipped by the loop where it owns the clip. Returns what made the
        step a skipped one (``"loss"``, ``"gradient norm"``, also when DeepSpeed skipped it) or None."""
        rates = None
        if facts.nonfinite or facts.bad_norm:
            rates = stepsync.hold(engine, zero_grads=self.own_grad_norm)
        elif self.own_clip and self.norm_D is not None:
            stepsync.clip_(engine.module, self.norm_D, self.clip)
        skipped = engine.skipped_steps
        engine.step()
        ds_skipped = engine.skipped_steps > skipped
        if ds_skipped and rates is not None:
            stepsync.release(engine, rates)  # DeepSpeed skipped it too: its scheduler did not run
        if facts.nonfinite:
            return "loss"
        if facts.bad_norm or ds_skipped:
            return "gradient norm"  # the update was skipped (above, or by DeepSpeed)
        return None

    def follow(
        self, what: str | None, step: int, state: TrainState, metrics: Metrics, ctx: RankContext
    ) -> None:
        """Count a skipped step (``what``: its cause) or end a run of them: a skipped step restarts
        the streams' state; train.max_nonfinite in a row stop the run."""
        if what is None:
            self.run = 0
            self.kinds.clear()
            return
        state.nonfinite_total += 1
        self.run += 1
        self.kinds.add(what)
        state.hidden = None  # the state may be non-finite too: restart the streams' state
        if ctx.main:
            first = state.micro_index - self.grad_accum + 1  # (the step's micro-steps)
            micro = f"micro-steps {first}-{state.micro_index}" if first < state.micro_index else ""
            log.warning(
                "non-finite %s at %s (step %d): skipped (%d in a row, %d in all)",
                what,
                micro or f"micro-step {state.micro_index}",
                step,
                self.run,
                state.nonfinite_total,
            )
        metrics.scalars(step, {"train/nonfinite_total": state.nonfinite_total})
        if self.run >= self.max_nonfinite:
            plural = {"loss": "losses", "gradient norm": "gradient norms"}
            kinds = " or ".join(plural[k] for k in sorted(self.kinds, reverse=True))
            raise PipelineError(
                f"{self.run} non-finite {kinds} in a row at step {step}: stopping; "
                f"{divergence.advice(ctx.run_dir / 'checkpoints')}"
            )


class Trainer:
    """One rank's pretrain: :meth:`setup` (model, DeepSpeed engine, data, resume, records), then
    :meth:`step` until ``train.steps`` or a stop, each followed by :meth:`after_step` (log,
    evaluate, checkpoint, stop), then the final evaluation."""

    def __init__(self, cfg: PretrainConfig, ctx: RankContext):
        self.cfg, self.ctx, self.t = cfg, ctx, cfg.train
        self.stop: Any = None  # the StopFlag, from run()
        self.status, self.exit_status = "done", 0
        self.setup()

    # ------------------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything before the first step, in the order every rank must take it (the model is
        initialised from the seeded generator; resume and conversion are collectives)."""
        cfg, ctx, t = self.cfg, self.ctx, self.t
        # Model: identical on every rank (same seed), then each rank its own random stream (dropout).
        # (data.direction=backward: every split read in reverse, pipeline.data.reader.ReversedReader)
        self.train_reader = open_split(cfg.data.path, "train", cfg.data.verify, cfg.data.direction)
        self.valid_reader = open_split(cfg.data.path, "valid", cfg.data.verify, cfg.data.direction)
        self.vocab = vocab = int(self.train_reader.manifest["tokenizer"]["vocab_size"])
        torch.manual_seed(t.seed)
        model = build_model(cfg.model, vocab)
        self.resume_from = checkpoint.resolve(ctx.run_dir, t.resume)
        self.values = to_dict(cfg)
        dataset, backbone, hf_backbone = self._identity(model)
        ds_config = deepspeed_config(cfg, ctx.device.type == "cuda")
        check, plan = self._check_resume(ds_config, dataset, backbone)
        init = None
        if t.init_from and self.resume_from is None:
            init = init_from.load(model, cfg, vocab, self.train_reader.manifest["tokenizer"])
            if ctx.main:
                log.info("train.init_from: starting from %s (step %s)", init["path"], init["step"])
        # Pretrained word vectors: copied in a fresh run only, frozen either way; before DeepSpeed.
        fresh = self.resume_from is None and not init
        vectors = embeddings.apply(model, cfg.model, cfg.data.path, fresh, ctx.main)
        self.engine = self._engine(model, ds_config)
        random.seed(t.seed + ctx.rank)
        np.random.seed(t.seed + ctx.rank)
        torch.manual_seed(t.seed + ctx.rank)
        self.loader = _loader(cfg, self.train_reader, ctx)
        self.state = TrainState(loader=self.loader)  # all but weights and optimizer, per rank
        self.header = self._header(dataset, backbone, vectors, init, hf_backbone)
        if self.resume_from is not None and check is not None and plan is not None:
            self._resume(model, check, plan)
        self._records(vectors)

    def _identity(self, model: torch.nn.Module) -> tuple[str, str, dict[str, Any] | None]:
        """(the dataset's digest, a huggingface-kind backbone's digest or "", what it was made
        from and how to rebuild it offline)."""
        dataset = dataset_digest(self.train_reader.manifest)
        hf_backbone = None
        if self.cfg.model.kind is ModelKind.huggingface:
            hf_backbone = {
                "source": backbone_source(self.cfg.model.hf),
                "config": model.backbone.config.to_dict(),
            }
        backbone = hf_backbone["source"]["sha256"] if hf_backbone else ""
        return dataset, backbone, hf_backbone

    def _check_resume(self, ds_config: dict[str, Any], dataset: str, backbone: str) -> tuple[Any, Any]:
        """The checkpoint's header checked before anything loads, and how to load it: on another
        world size ZeRO's partitioned optimizer state goes through DeepSpeed's universal checkpoint
        (converted once, by rank 0), which the engine must be configured to load."""
        if self.resume_from is None:
            return None, None
        ctx = self.ctx
        check = checkpoint.check_resume(self.resume_from, self.values, dataset, ctx.world, backbone)
        plan = elastic.plan(self.resume_from, check.saved_world, ctx.world, self.t.zero_stage, ctx.rank)
        for key, value in plan.overrides.items():
            ds_config[key] = {**ds_config.get(key, {}), **value}
        return check, plan

    def _engine(self, model: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
        """The DeepSpeed engine, with the schedule as its client scheduler and the step guard."""
        import deepspeed

        t = self.t
        model.gradient_checkpointing = t.activation_checkpointing
        self.flops_per_token = model.training_flops_per_token(self.cfg.data.seq_len)  # before ZeRO-3
        self.guard = StepGuard(self.cfg, ds_config)
        self.schedule = self.cfg.optim.build_schedule(t.steps)  # the rate as a pure function of the step
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=model.param_groups(),
            config=ds_config,
            lr_scheduler=step_scheduler(self.schedule),
        )
        if t.compile:  # in place (nn.Module.compile): the state dict's keys stay the module's own
            backend = os.environ.get("RNNPIPE_TEST_COMPILE_BACKEND", "inductor")
            engine.compile(backend=backend)
            if self.ctx.main:
                log.info("train.compile: the model runs under torch.compile (%s)", backend)
        return engine

    def _header(
        self,
        dataset: str,
        backbone: str,
        vectors: dict[str, Any] | None,
        init: dict[str, Any] | None,
        hf_backbone: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """What every checkpoint (and so the export) records it was made from."""
        world = self.ctx.world
        hosts: list[Any] = [None] * world
        dist.all_gather_object(hosts, socket.gethostname())
        self.prov = provenance(world_size=world, hosts=hosts)
        header = {
            "config": self.values,
            "dataset": dataset,
            "dataset_config": self.train_reader.manifest.get("fingerprint"),  # what prepare made it from
            "fingerprint": run_fingerprint(self.values, dataset, world, backbone),
            "provenance": self.prov,
            "rnnpipe": __version__,
            **({"embeddings": vectors} if vectors else {}),  # what the vectors file gave
        }
        if init is not None:
            header["init_from"] = init
        if hf_backbone is not None:
            header["hf_backbone"] = hf_backbone
        return header

    def _resume(self, model: Any, check: Any, plan: Any) -> None:
        """Load the checkpoint: weights, optimizer, the scheduler's position, this rank's state."""
        engine, main = self.engine, self.ctx.main
        if main:  # DeepSpeed's files are pickles: say where the code-bearing files come from
            log.info(
                "loading checkpoint %s (a checkpoint is code: load only ones you trust)", self.resume_from
            )
        checkpoint.load(engine, self.resume_from, self.state, self.ctx.device, plan, model.state_kinds())
        if main:
            log.info(
                "resumed from %s at step %d (%s)", self.resume_from, engine.global_steps, check.describe()
            )
        if main and set(check.allowed) & set(RESUME_SCHEDULE):  # (the rate follows the config)
            lr = engine.get_lr()[0]
            log.info(
                "schedule recomputed at step %d: lr %.6g, %s",
                engine.global_steps,
                lr,
                self.schedule.describe(),
            )

    def _records(self, vectors: dict[str, Any] | None) -> None:
        """The metrics' writers, the run's provenance files, and what the steps measure against."""
        cfg, ctx, t = self.cfg, self.ctx, self.t
        start = self.engine.global_steps
        self.metrics = Metrics(
            ctx.run_dir, ctx.main, start, t.steps, wandb=cfg.metrics.wandb, config=self.values
        )
        if ctx.main:
            prov = json.dumps(self.prov, indent=1)
            fsio.write_text_atomic(str(ctx.run_dir / "provenance.json"), prov + "\n")
            if vectors is not None:  # (and in every checkpoint's header)
                text = json.dumps(vectors, indent=1) + "\n"
                fsio.write_text_atomic(str(ctx.run_dir / "embeddings.json"), text)
            self.metrics.text(start, "provenance", "```\n" + prov + "\n```")
        # tokens/s below is summed over ranks
        self.peak = _peak_flops(ctx.device, t.precision, t.peak_tflops) * ctx.world
        self.bytes_per_token = self.train_reader.bytes / self.train_reader.tokens

    # ------------------------------------------------------------------------------ steps

    def run(self, stop: StopFlag | None) -> TrainResult:
        """Steps until ``train.steps`` or a stop, then the final evaluation. ``stop``: see :func:`train`."""
        own_flag = stop is None
        self.stop = StopFlag().install() if stop is None else stop
        # The speed since the last log line (not carried over a resume; the loss window is, in state).
        self.window = {"timed": 0, "tokens": 0, "t": time.time()}
        self.step_delay = float(os.environ.get("RNNPIPE_TEST_STEP_DELAY", "0"))
        self.loss_cap = divergence.ceiling(self.vocab)
        self.huge_grad_at = {int(x) for x in os.environ.get("RNNPIPE_TEST_HUGE_GRAD_AT", "").split(",") if x}
        self.tally = stepsync.StepTally(self.ctx.device)  # the step's losses and tokens, on the device
        self.started = time.time()
        try:
            while self.engine.global_steps < self.t.steps:
                if self.after_step(self.step()):
                    break
            if self.status == "done":
                self.final_evaluation()
        finally:
            if own_flag:
                self.stop.restore()
            self.metrics.close()
            if isinstance(self.loader, PrefetchedBatches):
                self.loader.close()  # its thread done before the interpreter is (an error exit included)
        return TrainResult(self.status, self.engine.module, self.engine.global_steps, self.exit_status)

    def step(self) -> stepsync.StepFacts:
        """One optimizer step: its micro-steps, the step's one host synchronisation, the update
        (held, clipped, or skipped by the guard), the counters and the divergence watch."""
        engine, state, t, device = self.engine, self.state, self.t, self.ctx.device
        while True:
            batch = next(self.loader)
            state.micro_index += 1
            if batch.reset:
                state.hidden = None
            logits, new_hidden = engine(stepsync.to_device(batch.inputs_BT, device), state.hidden)
            loss = F.cross_entropy(
                logits.float().flatten(0, 1),
                stepsync.to_device(batch.targets_BT, device).flatten(),
                ignore_index=IGNORE,
            )
            if state.micro_index in t.inject_nan_at:
                loss = loss * float("nan")
            # Read at the step's end: a non-finite loss skips the whole step (its gradient is
            # non-finite too, and already summed into the step's by then).
            self.tally.add(loss.detach(), batch.targets)
            engine.backward(loss * 1e30 if state.micro_index in self.huge_grad_at else loss)
            state.hidden = detach_state(new_hidden)
            self.window["timed"] += 1
            if engine.is_gradient_accumulation_boundary():
                break
            engine.step()
        norm_D = self.guard.take_norm(engine)  # before anything clips the gradients
        late = bool(t.time_limit_min) and time.time() - self.started > 60 * t.time_limit_min
        facts = self.tally.read(norm_D, bool(self.stop), late)  # the step's one host synchronisation
        skipped = self.guard.step(engine, facts)
        step = state.step = engine.global_steps
        state.tokens_seen += facts.tokens
        self.window["tokens"] += facts.tokens
        # Sums over ranks (the mean is what the gradient averages: runs on any world size compare).
        state.loss_window[0] += facts.loss_sum
        state.loss_window[1] += facts.finite
        self.guard.follow(skipped, step, state, self.metrics, self.ctx)
        divergence.follow(state, facts.mean_loss, step, self.ctx.main, self.loss_cap)
        if self.step_delay:
            time.sleep(self.step_delay)
        return facts

    def after_step(self, facts: stepsync.StepFacts) -> bool:
        """Log, evaluate and checkpoint as the step's number asks; True when the run stops here (a
        signal: preempted; the time limit: done)."""
        t, step, ctx = self.t, self.state.step, self.ctx
        if step % t.log_every == 0 or step == t.steps:
            self.log_line(step)
        stopping, out_of_time = facts.stop, facts.late  # (read with the step's facts)
        if t.eval_every and step % t.eval_every == 0 and step < t.steps:
            result = self.evaluate_split(self.valid_reader)
            if result is not None:  # else a signal came: checkpoint below, without it
                report(
                    self.engine,
                    self.cfg,
                    "valid",
                    step,
                    result,
                    self.metrics,
                    ctx.rank,
                    ctx.device,
                    self.valid_reader,
                )
            stopping = ctx.any(bool(self.stop))  # (a signal during the evaluation)
        if (
            stopping
            or out_of_time
            or step == t.steps
            or (t.checkpoint_every and step % t.checkpoint_every == 0)
        ):
            self.save()
        if out_of_time and not stopping:
            if ctx.main:
                log.info("train.time_limit_min=%g reached at step %d", t.time_limit_min, step)
            return True
        if stopping:
            self.status, self.exit_status = "preempted", self.stop.exit_status()
            if ctx.main:
                log.warning(
                    "signal %s: checkpointed at step %d, exiting to be requeued", self.stop.signal, step
                )
            return True
        return False

    def log_line(self, step: int) -> None:
        """The train scalars since the last line (to the metrics' writers and the console)."""
        state, window = self.state, self.window
        elapsed = time.time() - window["t"]
        tok_s = window["tokens"] / max(elapsed, 1e-9)
        scalars = {}
        if state.loss_window[1]:  # (none when every step since the last line was skipped)
            mean_loss = state.loss_window[0] / state.loss_window[1]
            scalars["train/loss"] = mean_loss
            scalars["train/bpb"] = mean_loss / math.log(2) / self.bytes_per_token
        scalars |= {
            "train/lr": self.engine.get_lr()[0],
            "train/grad_norm": _first_known(self.engine.get_global_grad_norm(), self.guard.norm_D),
            "train/tokens_per_s": tok_s,
            "train/tokens_seen": state.tokens_seen,
            "train/step_time_s": elapsed / max(window["timed"] / self.t.grad_accum, 1e-9),
            "train/mfu": tok_s * self.flops_per_token / self.peak,
            "train/memory_gb": _memory_gb(self.ctx.device),
            "train/nonfinite_total": state.nonfinite_total,
        }
        self.metrics.scalars(step, scalars)
        self.metrics.console(step, scalars)
        state.loss_window = [0.0, 0]
        self.window = {"timed": 0, "tokens": 0, "t": time.time()}

    def save(self) -> Path:
        """A checkpoint of this step (a collective)."""
        header = {**self.header, "diverging_since": self.state.diverging_since}
        return checkpoint.save(self.engine, self.ctx.run_dir, self.state, header, self.t.keep_checkpoints)

    def evaluate_split(self, reader: SplitReader, full: bool = False) -> dict[str, float] | None:
        """The split's metrics; None when a signal cut the evaluation short."""
        t, ctx = self.t, self.ctx
        return evaluate(
            self.engine.module,
            reader,
            ctx,
            t.eval_batch_size,
            self.cfg.data.seq_len,
            max_tokens=self.cfg.eval.max_tokens if full else t.eval_max_tokens,
            should_stop=lambda: bool(self.stop),
        )

    def final_evaluation(self) -> None:
        """valid and test in full (and dynamic evaluation, ...). The last checkpoint is already
        written: a signal during it ends the job to be requeued (it evaluates again) rather than
        risk its time limit."""
        ctx, code = self.ctx, self.prov["code"]
        params = {
            **flatten(self.values),
            "code.version": describe_code(code),
            "code.dirty": bool((code.get("git") or {}).get("dirty")),
            "world_size": ctx.world,
            "fingerprint": self.header["fingerprint"][:12],
        }
        readers = FinalReaders(train=self.train_reader, valid=self.valid_reader)
        done = final_evaluation(
            self.engine,
            self.cfg,
            ctx,
            readers,
            self.evaluate_split,
            should_stop=lambda: bool(self.stop),
            metrics=self.metrics,
            params=params,
        )
        if not done:
            self.status, self.exit_status = "preempted", self.stop.exit_status()
            if ctx.main:
                log.warning("signal %s during the final evaluation: exiting to be requeued", self.stop.signal)


def _loader(cfg: PretrainConfig, reader: SplitReader, ctx: RankContext) -> Any:
    """This rank's training batches: stream mode reads the next step's batch in a thread while
    this one trains (the same batches); shuffle mode, independent windows."""
    d = cfg.data
    if d.mode is DataMode.stream:
        return PrefetchedBatches(StreamBatches(reader, ctx.rank, ctx.world, d.batch_size, d.seq_len))
    return ShuffleBatches(reader, ctx.rank, ctx.world, d.batch_size, d.seq_len, d.seed, d.workers)


def _peak_flops(device: torch.device, precision: Precision, override_tflops: float) -> float:
    """One rank's FLOP/s for MFU: the config's, a GPU's datasheet figure, or a measured CPU matmul rate."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        bf16 = dense_bf16_flops(torch.cuda.get_device_name(device))
        if bf16:
            return bf16 if precision is Precision.bf16 else bf16 / 2  # TF32 runs at half the bf16 rate
    # Its own generator: drawing from the global one would shift dropout after a resume. The best
    # of several rounds: one timing on a shared CPU varies by 2x.
    a = torch.randn(2048, 2048, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    a @ a
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best


def gpu_matmul_precision(precision: Precision) -> None:
    """fp32 on a GPU means TF32 matrix products and convolutions (torch's "high" precision): the
    tensor-core rate MFU is stated against (half the bf16 one), where torch's default is plain
    fp32 at a fraction of it. NVIDIA_TF32_OVERRIDE=0 in the environment keeps full fp32 products."""
    if precision is Precision.fp32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# Dense bf16 tensor-core FLOP/s from NVIDIA's datasheets, by what torch.cuda.get_device_name says;
# the first key the name contains wins (the PCIe and NVL H100s are slower than the SXM one).
DENSE_BF16 = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
    "V100": 125e12,  # (fp16: V100 has no bf16 tensor cores)
}


def dense_bf16_flops(device_name: str) -> float | None:
    """A GPU's dense bf16 FLOP/s from its name (None for a GPU not in :data:`DENSE_BF16`)."""
    return next((flops for key, flops in DENSE_BF16.items() if key in device_name), None)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def _first_known(*values: Any) -> float:
    return float(next((v for v in values if v is not None), 0.0))
