"""One fine-tuning job: (task, hyper-parameters, seed, init) → ``result.json``.

Read top to bottom: the task's kind (:mod:`rnnpipe.pipeline.finetune.kinds`) reads its files with
the pretrained model's tokenizer; the model (pretrained or from scratch) gets the kind's head; then
AdamW (warm-up, linear decay, layer-wise rate decay, optional frozen backbone) trains it on the
kind's batches (:mod:`rnnpipe.pipeline.finetune.feeds`), evaluates on dev every ``eval_every``
steps, keeps the best weights (better as the kind says), stops after ``patience`` evaluations
without improvement, and scores the best weights on dev and test.

Resumable: every evaluation writes ``checkpoint.pt`` (weights, optimiser, schedule, best weights and
the job's :class:`~rnnpipe.pipeline.engine.state.FinetuneState`: counters, data position, LM state, RNG
states) atomically; a job started again (a requeue, a re-run) continues from it and ends with the
same result as an uninterrupted run. ``result.json`` is written last and records what the result
was made from (:mod:`rnnpipe.pipeline.finetune.identity`: the backbone's sha256, the task files' sha256,
the config) with its fingerprint; the checkpoint is then removed. A result or checkpoint with
another fingerprint is stale: the job runs again from the start.
RNNPIPE_TEST_STEP_DELAY (seconds slept after each step) exists for tests that kill a job mid-way.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import fingerprint, flatten, to_dict
from rnnpipe.pipeline.engine.metrics import Metrics, Tags
from rnnpipe.pipeline.engine.schedule import lambda_lr, warmup_linear_decay
from rnnpipe.pipeline.engine.signals import StopFlag
from rnnpipe.pipeline.engine.state import FinetuneState
from rnnpipe.pipeline.engine.statefile import load_state, save_state
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.finetune import kinds
from rnnpipe.pipeline.finetune.backward import check_backward
from rnnpipe.pipeline.finetune.build import build_model, scalar_mix
from rnnpipe.pipeline.finetune.config import JobConfig, TaskKind
from rnnpipe.pipeline.finetune.feeds import Feed, feed_for
from rnnpipe.pipeline.finetune.identity import CHECKPOINT, RESULT, job_identity, read_result, stale_reason
from rnnpipe.pipeline.finetune.kinds import Kind, TaskData
from rnnpipe.pipeline.finetune.model import FinetuneModel, parameter_groups
from rnnpipe.pipeline.models.exported import CONFIG, WEIGHTS
from rnnpipe.pipeline.models.pretrained import load_pretrained_tokenizer
from rnnpipe.pipeline.provenance import provenance

__all__ = ["LOG", "METRICS", "TaskData", "build_model", "run_job", "tensorboard_tags"]

log = logging.getLogger("rnnpipe.finetune")
LOG = "log.txt"
# rnnpipe's own kinds' metrics (docs/finetune.md lists their TensorBoard tags; a test checks it)
METRICS = {k: kinds.get(k).metrics for k in TaskKind}


def tensorboard_tags(kind: str, metrics: tuple[str, ...] | None = None) -> Tags:
    """What a job of the task kind ``kind`` logs to its ``tensorboard/`` (docs/finetune.md lists
    them); ``metrics``: its evaluation's, where not the kind's own (a GLUE task's)."""
    names = kinds.get(kind).metrics if metrics is None else metrics
    dev = [f"dev/{m}" for m in names]
    final = [f"final/{split}_{m}" for split in ("dev", "test") for m in names]
    return Tags(frozenset(["train/loss", "train/grad_norm", "train/lr", *dev, *final]))


def _check_exports(cfg: JobConfig, identity: dict[str, Any]) -> None:
    """PipelineError when an export's weights are not those its identity recorded (changed after
    it was written); for elmo, ConfigError unless the backward LM fits the forward one."""
    exports = {"backbone": cfg.pretrained}
    if "backward.sha256" in identity:  # elmo: the backward LM, of the forward LM's tokenizer
        exports["backward"] = cfg.pretrained_backward
        check_backward(cfg.pretrained, cfg.pretrained_backward)
    for name, export in exports.items():
        weights = fsio.join(export, WEIGHTS)
        if fsio.sha256_of(weights)[0] != identity[f"{name}.sha256"]:
            raise PipelineError(
                f"{weights}: its sha256 is not the one its {CONFIG} records: the export was changed "
                "after it was written; export it again"
            )


def _log_vectors(cfg: JobConfig, vectors: dict[str, Any], elmo: bool) -> None:
    """``embeddings.init``'s coverage, in the job's log."""
    log.info(
        "embeddings.init: %s of %s ids found in %s (coverage %.1f%%, %d through the lowercased "
        "word); freeze=%s%s",
        f"{vectors['found']:,}",
        f"{vectors['vocab']:,}",
        cfg.embeddings.init,
        100 * vectors["coverage"],
        vectors["found_lowercased"],
        vectors["freeze"],
        " (both LMs)" if elmo else "",
    )


def lr_schedule(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at step ``total``: each
    group's rate × min((s + 1) / warmup, (total − s) / (total − warmup)) after ``s`` steps
    (:func:`rnnpipe.pipeline.engine.schedule.warmup_linear_decay`, pretrain's module)."""
    return lambda_lr(opt, functools.partial(warmup_linear_decay, warmup=warmup, total=total))


class _Training:
    """A job's training, from its model on: the optimiser and schedule, the kind's feed (batches,
    loss, evaluation), the job state (counters, data position, early stopping, RNGs), the best
    weights so far and the checkpoint that holds them all; TensorBoard (and W&B) beside it."""

    def __init__(
        self, cfg: JobConfig, kind: Kind, data: TaskData, model: FinetuneModel, fp: str, device: torch.device
    ) -> None:
        self.cfg, self.kind, self.data, self.model, self.fp, self.device = cfg, kind, data, model, fp, device
        self.out = cfg.out_dir
        self.opt = torch.optim.AdamW(parameter_groups(model, cfg.optim), lr=cfg.optim.lr, betas=(0.9, 0.98))
        self.sched = lr_schedule(self.opt, cfg.optim.warmup_steps, cfg.max_steps)
        self.feed: Feed = feed_for(kind, data, cfg)
        self.st = FinetuneState(loader=self.feed.loader)
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.ckpt = fsio.join(self.out, CHECKPOINT)
        self.frozen: bool | None = None
        self._resume()
        # TensorBoard in tensorboard/, events past the checkpoint's step purged on resume
        # W&B (when a project is set): one run per job, grouped by the sweep's directory
        wandb = dataclasses.replace(cfg.wandb, group=cfg.wandb.group or Path(self.out).parent.parent.name)
        hp = {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith("wandb.")}
        tags = tensorboard_tags(kind.name, kind.reported)
        self.tb = Metrics(
            Path(self.out), True, self.st.step, cfg.max_steps, tags=tags, jsonl=False, wandb=wandb, config=hp
        )

    def _resume(self) -> None:
        """Continue from the job's checkpoint when it has one of this fingerprint; else seed."""
        # On the CPU: the RNG states must stay there; load_state_dict moves the rest to the model's device.
        ck = load_state(self.ckpt) if fsio.exists(self.ckpt) else None
        if ck is not None and ck.get("fingerprint") != self.fp:
            log.info("%s: its checkpoint is of another job config or backbone: starting afresh", self.out)
            ck = None
        if ck is None:
            random.seed(self.cfg.seed)
            np.random.seed(self.cfg.seed)
            torch.manual_seed(self.cfg.seed)
            return
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.best_weights = ck["best_weights"]
        self.st.load_state_dict(ck["state"], self.device)
        log.info("resumed %s at step %d", self.out, self.st.step)

    def save(self) -> None:
        """``checkpoint.pt``: everything a run started again continues from."""
        save_state(
            self.ckpt,
            {
                "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "best_weights": self.best_weights,
                "state": self.st.state_dict(),
                "fingerprint": self.fp,
                "config": to_dict(self.cfg),
            },
        )

    def step(self) -> torch.Tensor:
        """One optimiser step on the feed's next batch; returns its loss (a scalar)."""
        cfg, model, st = self.cfg, self.model, self.st
        frozen = cfg.optim.freeze_steps == -1 or st.step < cfg.optim.freeze_steps
        if frozen != self.frozen:  # frozen parameters get no gradients and skip the optimiser
            self.frozen = frozen
            model.freeze_backbones(frozen)
        loss = self.feed.loss(model, st, self.device)
        if not torch.isfinite(loss):
            raise PipelineError(
                f"{self.out}: the loss is {loss.item()} at step {st.step + 1}; lower job.optim.lr"
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        clip = cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip else torch.tensor(0.0)
        self.opt.step()
        self.sched.step()
        st.step += 1
        if st.step % 10 == 0 or st.step == 1:
            logged = {"train/loss": loss.item(), "train/grad_norm": float(grad_norm)}
            self.tb.scalars(st.step, {**logged, "train/lr": self.opt.param_groups[0]["lr"]})
        return loss

    def evaluate_dev(self, loss: torch.Tensor) -> None:
        """Score dev; keep the weights when they are the best so far (better as the kind says),
        else count towards ``patience``."""
        st, metric = self.st, self.kind.primary
        dev = self.feed.evaluate(self.model, self.data.dev, self.device)
        self.tb.scalars(st.step, {f"dev/{k}": v for k, v in dev.items()})
        score = dev[metric]
        if self.kind.improves(score, st.best):
            st.best, st.best_step, st.bad = score, st.step, 0
            self.best_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
            }
        else:
            st.bad += 1
            st.done = bool(self.cfg.patience) and st.bad >= self.cfg.patience
        log.info(
            "step %d/%d loss %.4f dev %s %.3f (best %.3f at %d)",
            st.step,
            self.cfg.max_steps,
            loss.item(),
            metric,
            score,
            st.best,
            st.best_step,
        )

    def train(self) -> None:
        """Steps until ``max_steps`` or early stopping, dev scored (and checkpointed) every
        ``eval_every`` steps and at the last. Ctrl-C: checkpoint after the step in progress, then
        stop (a second one stops at once); USR2/TERM stay with the executor (submitit requeues the
        job; it resumes from the last evaluation)."""
        cfg, st = self.cfg, self.st
        delay = float(os.environ.get("RNNPIPE_TEST_STEP_DELAY", "0"))
        t0 = time.time()
        interrupt = StopFlag().install((signal.SIGINT,))
        try:
            while st.step < cfg.max_steps and not st.done:
                loss = self.step()
                if delay:
                    time.sleep(delay)
                if interrupt:
                    st.wall += time.time() - t0
                    self.save()
                    log.warning("%s: interrupted: checkpointed at step %d", self.out, st.step)
                    raise KeyboardInterrupt
                if st.step % cfg.eval_every and st.step < cfg.max_steps:
                    continue
                self.evaluate_dev(loss)
                st.wall += time.time() - t0
                t0 = time.time()
                self.save()
        finally:
            interrupt.restore()
        st.wall += time.time() - t0

    def finish(self) -> tuple[dict[str, float], dict[str, float] | None]:
        """The best weights back in the model (and in ``model.pt`` with ``save_model``), scored on
        dev and (where labelled) test; returns (dev, test or None)."""
        model, data = self.model, self.data
        if self.best_weights is not None:
            model.load_state_dict(self.best_weights)
        if self.cfg.save_model:
            buf = io.BytesIO()
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
            fsio.write_bytes_atomic(fsio.join(self.out, "model.pt"), buf.getvalue())
        dev = self.feed.evaluate(model, data.dev, self.device)
        test = self.feed.evaluate(model, data.test, self.device) if data.test else None
        for split, m in (("dev", dev), ("test", test or {})):
            self.tb.scalars(self.st.step, {f"final/{split}_{k}": v for k, v in m.items()})
        self.tb.close()
        return dev, test


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run (or finish, or skip when complete) one job; returns its result (also in result.json)."""
    out = cfg.out_dir
    identity = job_identity(cfg)
    fp = fingerprint(identity)
    result = read_result(out)
    if result is not None and result.get("fingerprint") == fp:
        return result
    fsio.makedirs(out)
    handler = logging.FileHandler(os.path.join(out, LOG)) if fsio.is_local(out) else None
    if handler:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        if result is not None:  # stale: made from other weights, files or config; kept aside
            log.info("%s: its result is %s; running the job again", out, stale_reason(result, identity))
            fsio.write_text_atomic(fsio.join(out, "result.stale.json"), json.dumps(result, indent=2) + "\n")
            fsio.remove(fsio.join(out, RESULT))
        return _run(cfg, identity, fp)
    except Exception as e:  # in log.txt too: a sweep reports the failed job's log tail
        log.error("job failed: %s", e, exc_info=not isinstance(e, PipelineError))
        raise
    finally:
        if handler:
            log.removeHandler(handler)
            handler.close()


def _run(cfg: JobConfig, identity: dict[str, Any], fp: str) -> dict[str, Any]:
    """The job: its kind's data, the model, training, the best weights' scores → ``result.json``."""
    _check_exports(cfg, identity)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = kinds.of(cfg.task_config)
    tok = load_pretrained_tokenizer(cfg.pretrained)
    data = kind.load(cfg, tok)
    model, vectors = build_model(cfg, data, tok)
    model = model.to(device).train()
    if vectors is not None:
        _log_vectors(cfg, vectors, model.backward is not None)
    training = _Training(cfg, kind, data, model, fp, device)
    training.train()
    dev, test = training.finish()
    st, metric = training.st, kind.primary
    result = {
        "task": cfg.task,
        "kind": kind.name,
        "init": cfg.init.value,
        "seed": cfg.seed,
        "hparams": cfg.hparams,
        "metric": metric,
        "glue": cfg.task_config.glue or None,  # the GLUE task it is, for the table's GLUE score
        "dev": dev,
        "test": test,
        "best_step": st.best_step,
        "steps": st.step,
        "epochs": training.feed.epochs(st),
        "early_stopped": st.done,
        "wall_s": round(st.wall, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "train_examples": kind.train_size(data),
        "device": str(device),
        "embeddings": vectors,  # what embeddings.init's file gave (coverage, ...), or null
        "backbone": {
            "path": cfg.pretrained,
            **{k: identity.get(f"backbone.{k}") for k in ("sha256", "step")},
        },
        **(
            {
                "backward": {
                    "path": cfg.pretrained_backward,
                    **{k: identity.get(f"backward.{k}") for k in ("sha256", "step")},
                }
            }
            if "backward.sha256" in identity
            else {}
        ),
        **({"scalar_mix": scalar_mix(model)} if model.mix is not None else {}),
        "fingerprint": fp,
        "identity": identity,
        "provenance": provenance(world_size=1),
        "config": to_dict(cfg),
    }
    fsio.write_text_atomic(fsio.join(cfg.out_dir, RESULT), json.dumps(result, indent=2) + "\n")
    fsio.remove(training.ckpt)
    tested = f", test {test[metric]:.3f}" if test else ""
    log.info("%s: dev %s %.3f%s", cfg.out_dir, metric, dev[metric], tested)
    return result
