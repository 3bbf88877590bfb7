"""The pretrain loop, top to bottom: model, DeepSpeed engine, data, resume, then steps.

``train(cfg)`` runs in every rank's process after the process group is set up (see
:mod:`rnnpipe.launch.distributed`); it knows nothing of Slurm. Its result says ``"done"`` or
``"preempted"`` (a signal arrived: checkpointed, run again to continue) and holds the model.

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
from rnnpipe.pipeline.train.data import (
    IGNORE,
    PrefetchedBatches,
    ShuffleBatches,
    SplitReader,
    StreamBatches,
    open_split,
)
from rnnpipe.pipeline.train.evaluate import evaluate
from rnnpipe.pipeline.train.metrics import Metrics
from rnnpipe.pipeline.train.report import final_evaluation, report
from rnnpipe.pipeline.train.signals import StopFlag
from rnnpipe.pipeline.train.state import TrainState

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
    rank, world = dist.get_rank(), dist.get_world_size()
    # The device the launcher set for this rank (its local rank, or 0 where each task sees one GPU)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    if device.type == "cuda":
        gpu_matmul_precision(cfg.train.precision)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # One writer per run dir: a second run would interleave checkpoints and log every step twice.
    held = contextlib.ExitStack()
    refused = ""
    if rank == 0:
        try:
            held.enter_context(exclusive(str(run_dir), checkpoint.RUN_LOCK, "pretrain"))
        except PipelineError as e:
            refused = str(e)
    if _any(bool(refused), device):
        raise PipelineError(refused or f"{run_dir} is in use by another pretrain (rank 0 could not lock it)")
    try:
        return _train(cfg, stop, rank, world, device, run_dir)
    finally:
        held.close()


def _train(
    cfg: PretrainConfig, stop: StopFlag | None, rank: int, world: int, device: torch.device, run_dir: Path
) -> TrainResult:
    import deepspeed

    t = cfg.train

    # Model: identical on every rank (same seed), then each rank its own random stream (dropout).
    # (data.direction=backward: every split read in reverse, pipeline.train.data.ReversedReader)
    train_reader = open_split(cfg.data.path, "train", cfg.data.verify, cfg.data.direction)
    valid_reader = open_split(cfg.data.path, "valid", cfg.data.verify, cfg.data.direction)
    vocab = int(train_reader.manifest["tokenizer"]["vocab_size"])
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, vocab)
    resume_from = checkpoint.resolve(run_dir, t.resume)
    dataset = dataset_digest(train_reader.manifest)
    hf_backbone = None
    if cfg.model.kind is ModelKind.huggingface:  # what it was made from, and how to rebuild it offline
        hf_backbone = {"source": backbone_source(cfg.model.hf), "config": model.backbone.config.to_dict()}
    backbone = hf_backbone["source"]["sha256"] if hf_backbone else ""
    values = to_dict(cfg)
    ds_config = deepspeed_config(cfg, device.type == "cuda")
    check = plan = None
    if resume_from is not None:  # checked from its header before anything loads
        check = checkpoint.check_resume(resume_from, values, dataset, world, backbone)
        # Another world size: ZeRO's partitioned optimizer state goes through DeepSpeed's universal
        # checkpoint (converted once, by rank 0), which the engine must be configured to load.
        plan = elastic.plan(resume_from, check.saved_world, world, t.zero_stage, rank)
        for key, value in plan.overrides.items():
            ds_config[key] = {**ds_config.get(key, {}), **value}
    init = None
    if t.init_from and resume_from is None:
        init = init_from.load(model, cfg, vocab, train_reader.manifest["tokenizer"])
        if rank == 0:
            log.info("train.init_from: starting from %s (step %s)", init["path"], init["step"])
    # Pretrained word vectors: copied in a fresh run only, frozen either way; before DeepSpeed.
    vectors = embeddings.apply(model, cfg.model, cfg.data.path, resume_from is None and not init, rank == 0)
    model.gradient_checkpointing = t.activation_checkpointing
    flops_per_token = model.training_flops_per_token(cfg.data.seq_len)  # before ZeRO-3 partitions it
    # DeepSpeed keeps the gradient norm where its optimizer wrappers clip (ZeRO >= 1, and bf16 at
    # ZeRO-0), and skips the update when it is not finite; for fp32 at ZeRO-0 it does neither
    # (only clips, taking the norm again), so the loop takes the norm and clips with it there
    # (the gradients are already all-reduced: every rank gets the same norm).
    own_grad_norm = t.zero_stage == 0
    own_clip = own_grad_norm and t.precision is Precision.fp32
    clip = float(ds_config.get("gradient_clipping") or 0.0)
    if own_clip:
        ds_config["gradient_clipping"] = 0.0
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.param_groups(), config=ds_config
    )
    if t.compile:  # in place (nn.Module.compile): the state dict's keys stay the module's own
        backend = os.environ.get("RNNPIPE_TEST_COMPILE_BACKEND", "inductor")
        engine.compile(backend=backend)
        if rank == 0:
            log.info("train.compile: the model runs under torch.compile (%s)", backend)
    random.seed(t.seed + rank)
    np.random.seed(t.seed + rank)
    torch.manual_seed(t.seed + rank)

    if cfg.data.mode is DataMode.stream:
        # The next step's batch is read in a thread while this one trains (the same batches).
        batches = StreamBatches(train_reader, rank, world, cfg.data.batch_size, cfg.data.seq_len)
        loader: Any = PrefetchedBatches(batches)
    else:
        loader = ShuffleBatches(
            train_reader, rank, world, cfg.data.batch_size, cfg.data.seq_len, cfg.data.seed, cfg.data.workers
        )
    state = TrainState(loader=loader)  # everything but the weights and optimizer, checkpointed per rank
    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    prov = provenance(world_size=world, hosts=hosts)
    # What every checkpoint (and so the export) records it was made from.
    header = {
        "config": values,
        "dataset": dataset,
        "dataset_config": train_reader.manifest.get("fingerprint"),  # what prepare made it from
        "fingerprint": run_fingerprint(values, dataset, world, backbone),
        "provenance": prov,
        "rnnpipe": __version__,
        **({"embeddings": vectors} if vectors else {}),  # what the vectors file gave
    }

    if init is not None:
        header["init_from"] = init
    if hf_backbone is not None:
        header["hf_backbone"] = hf_backbone
    if resume_from is not None and check is not None and plan is not None:
        if rank == 0:  # DeepSpeed's files are pickles: say where the code-bearing files come from
            log.info("loading checkpoint %s (a checkpoint is code: load only ones you trust)", resume_from)
        kinds = model.state_kinds()
        checkpoint.load(engine, resume_from, state, device, plan, kinds)
        if rank == 0:
            log.info("resumed from %s at step %d (%s)", resume_from, engine.global_steps, check.describe())
        if set(check.allowed) & set(RESUME_SCHEDULE):
            _recompute_schedule(engine, rank)

    start = engine.global_steps
    metrics = Metrics(run_dir, rank == 0, start, t.steps, wandb=cfg.metrics.wandb, config=values)
    if rank == 0:
        fsio.write_text_atomic(str(run_dir / "provenance.json"), json.dumps(prov, indent=1) + "\n")
        if vectors is not None:  # (and in every checkpoint's header)
            fsio.write_text_atomic(str(run_dir / "embeddings.json"), json.dumps(vectors, indent=1) + "\n")
        metrics.text(start, "provenance", "```\n" + json.dumps(prov, indent=1) + "\n```")
    peak = _peak_flops(device, t.precision, t.peak_tflops) * world  # tokens/s below is summed over ranks
    bytes_per_token = train_reader.bytes / train_reader.tokens
    own_flag = stop is None
    if stop is None:
        stop = StopFlag().install()
    # The speed since the last log line (not carried over a resume; the loss window is, in state).
    window = {"timed": 0, "tokens": 0, "t": time.time()}
    nonfinite_run = 0
    nonfinite_kinds: set[str] = set()  # of the current run of skipped steps
    status = "done"
    exit_status = 0
    step_delay = float(os.environ.get("RNNPIPE_TEST_STEP_DELAY", "0"))
    loss_cap = divergence.ceiling(vocab)
    huge_grad_at = {int(x) for x in os.environ.get("RNNPIPE_TEST_HUGE_GRAD_AT", "").split(",") if x}
    tally = stepsync.StepTally(device)  # the step's losses and tokens, on the device until its end
    own_norm = None
    started = time.time()

    def save() -> Path:
        return checkpoint.save(
            engine, run_dir, state, {**header, "diverging_since": state.diverging_since}, t.keep_checkpoints
        )

    def nonfinite(what: str, step: int) -> None:
        """A step skipped for a non-finite loss or gradient norm (no update): count it, restart
        the streams' state, and stop after train.max_nonfinite in a row."""
        nonlocal nonfinite_run
        state.nonfinite_total += 1
        nonfinite_run += 1
        nonfinite_kinds.add(what)
        state.hidden = None  # the state may be non-finite too: restart the streams' state
        if rank == 0:
            first = state.micro_index - t.grad_accum + 1  # (the step's micro-steps)
            micro = f"micro-steps {first}-{state.micro_index}" if first < state.micro_index else ""
            log.warning(
                "non-finite %s at %s (step %d): skipped (%d in a row, %d in all)",
                what,
                micro or f"micro-step {state.micro_index}",
                step,
                nonfinite_run,
                state.nonfinite_total,
            )
        metrics.scalars(step, {"train/nonfinite_total": state.nonfinite_total})
        if nonfinite_run >= t.max_nonfinite:
            plural = {"loss": "losses", "gradient norm": "gradient norms"}
            kinds = " or ".join(plural[k] for k in sorted(nonfinite_kinds, reverse=True))
            raise PipelineError(
                f"{nonfinite_run} non-finite {kinds} in a row at step {step}: stopping; "
                f"{divergence.advice(run_dir / 'checkpoints')}"
            )

    def evaluate_split(reader: SplitReader, full: bool = False) -> dict[str, float] | None:
        """The split's metrics; None when a signal cut the evaluation short."""
        return evaluate(
            engine.module,
            reader,
            rank,
            world,
            t.eval_batch_size,
            cfg.data.seq_len,
            device,
            cfg.eval.max_tokens if full else t.eval_max_tokens,
            should_stop=lambda: bool(stop),
        )

    try:
        while engine.global_steps < t.steps:
            batch = next(loader)
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
            tally.add(loss.detach(), batch.targets)
            engine.backward(loss * 1e30 if state.micro_index in huge_grad_at else loss)
            state.hidden = detach_state(new_hidden)
            window["timed"] += 1
            if not engine.is_gradient_accumulation_boundary():
                engine.step()
                continue
            if own_grad_norm:
                own_norm = stepsync.grad_norm(engine.module)  # before anything clips the gradients
            late = bool(t.time_limit_min) and time.time() - started > 60 * t.time_limit_min
            facts = tally.read(own_norm, bool(stop), late)  # the step's one host synchronisation
            rates = None
            if facts.nonfinite or facts.bad_norm:  # no update: every weight stays as it is
                rates = stepsync.hold(engine, zero_grads=own_grad_norm)
            elif own_clip and own_norm is not None:
                stepsync.clip_(engine.module, own_norm, clip)
            skipped = engine.skipped_steps
            engine.step()
            step = state.step = engine.global_steps
            if engine.skipped_steps > skipped and rates is not None:
                stepsync.release(engine, rates)  # DeepSpeed skipped it too: its scheduler did not run
            state.tokens_seen += facts.tokens
            window["tokens"] += facts.tokens
            # Sums over ranks (the mean is what the gradient averages: runs on any world size compare).
            state.loss_window[0] += facts.loss_sum
            state.loss_window[1] += facts.finite
            if facts.nonfinite:
                nonfinite("loss", step)
            elif facts.bad_norm or engine.skipped_steps > skipped:
                nonfinite("gradient norm", step)  # the update was skipped (above, or by DeepSpeed)
            else:
                nonfinite_run = 0
                nonfinite_kinds.clear()
            divergence.follow(state, facts.mean_loss, step, rank == 0, loss_cap)
            if step_delay:
                time.sleep(step_delay)

            if step % t.log_every == 0 or step == t.steps:
                elapsed = time.time() - window["t"]
                tok_s = window["tokens"] / max(elapsed, 1e-9)
                scalars = {}
                if state.loss_window[1]:  # (none when every step since the last line was skipped)
                    mean_loss = state.loss_window[0] / state.loss_window[1]
                    scalars["train/loss"] = mean_loss
                    scalars["train/bpb"] = mean_loss / math.log(2) / bytes_per_token
                scalars |= {
                    "train/lr": engine.get_lr()[0],
                    "train/grad_norm": _first_known(engine.get_global_grad_norm(), own_norm),
                    "train/tokens_per_s": tok_s,
                    "train/tokens_seen": state.tokens_seen,
                    "train/step_time_s": elapsed / max(window["timed"] / t.grad_accum, 1e-9),
                    "train/mfu": tok_s * flops_per_token / peak,
                    "train/memory_gb": _memory_gb(device),
                    "train/nonfinite_total": state.nonfinite_total,
                }
                metrics.scalars(step, scalars)
                metrics.console(step, scalars)
                state.loss_window = [0.0, 0]
                window = {"timed": 0, "tokens": 0, "t": time.time()}

            stopping, out_of_time = facts.stop, facts.late  # (read with the step's facts)
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                result = evaluate_split(valid_reader)
                if result is not None:  # else a signal came: checkpoint below, without it
                    report(engine, cfg, "valid", step, result, metrics, rank, device, valid_reader)
                stopping = _any(bool(stop), device)  # (a signal during the evaluation)
            if (
                stopping
                or out_of_time
                or step == t.steps
                or (t.checkpoint_every and step % t.checkpoint_every == 0)
            ):
                save()
            if out_of_time and not stopping:
                if rank == 0:
                    log.info("train.time_limit_min=%g reached at step %d", t.time_limit_min, step)
                break
            if stopping:
                status = "preempted"
                exit_status = stop.exit_status()
                if rank == 0:
                    log.warning(
                        "signal %s: checkpointed at step %d, exiting to be requeued", stop.signal, step
                    )
                break

        if status == "done":
            # The last checkpoint is already written: a signal during the final evaluation ends
            # the job to be requeued (it evaluates again) rather than risk its time limit.
            code = prov["code"]
            params = {
                **flatten(values),
                "code.version": describe_code(code),
                "code.dirty": bool((code.get("git") or {}).get("dirty")),
                "world_size": world,
                "fingerprint": header["fingerprint"][:12],
            }
            args = (engine, cfg, rank, world, device, train_reader, valid_reader, evaluate_split)
            if not final_evaluation(*args, lambda: bool(stop), metrics, params):
                status = "preempted"
                exit_status = stop.exit_status()
                if rank == 0:
                    log.warning("signal %s during the final evaluation: exiting to be requeued", stop.signal)
    finally:
        if own_flag:
            stop.restore()
        metrics.close()
        if isinstance(loader, PrefetchedBatches):
            loader.close()  # its thread done before the interpreter is (an error exit included)
    return TrainResult(status, engine.module, engine.global_steps, exit_status)


def _recompute_schedule(engine: Any, rank: int) -> None:
    """After resuming with a changed schedule (train.steps, optim.lr, ...): the scheduler keeps only
    its position in the checkpoint, so it already follows the new config from the next step on; set
    this step's rate from it too, instead of the one the optimizer state brought back."""
    sched = engine.lr_scheduler
    was = engine.get_lr()[0]
    sched.step(sched.last_batch_iteration)
    if rank == 0:
        log.info(
            "schedule recomputed at step %d: lr %.6g (was %.6g), over %d steps (warm-up %d)",
            engine.global_steps,
            engine.get_lr()[0],
            was,
            sched.total_num_steps,
            sched.warmup_num_steps,
        )


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


def _any(flag: bool, device: torch.device) -> bool:
    x = torch.tensor([int(flag)], device=device)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item())


def _first_known(*values: Any) -> float:
    return float(next((v for v in values if v is not None), 0.0))
