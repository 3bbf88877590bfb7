"""One fine-tuning job: (task, hyper-parameters, seed, init) → ``result.json``.

Read top to bottom: load the task and the tokenizer, build the model (pretrained or from scratch),
then train with AdamW (warm-up, linear decay, layer-wise rate decay, optional frozen backbone),
evaluate on dev every ``eval_every`` steps, keep the best weights, stop after ``patience``
evaluations without improvement, and score the best weights on dev and test.

Resumable: every evaluation writes ``checkpoint.pt`` (weights, optimiser, schedule, best weights and
the job's :class:`~rnnpipe.pipeline.train.state.FinetuneState`: counters, data position, LM state, RNG
states) atomically; a job started again (a requeue, a re-run) continues from it and ends with the
same result as an uninterrupted run. ``result.json`` is written last and records what the result
was made from (:mod:`rnnpipe.pipeline.finetune.identity`: the backbone's sha256, the task files' sha256,
the config) with its fingerprint; the checkpoint is then removed. A result or checkpoint with
another fingerprint is stale: the job runs again from the start.
RNNPIPE_TEST_STEP_DELAY (seconds slept after each step) exists for tests that kill a job mid-way.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import fingerprint, flatten, to_dict
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.finetune import glue, tasks
from rnnpipe.pipeline.finetune.build import build_model, scalar_mix
from rnnpipe.pipeline.finetune.config import JobConfig, TaskConfig, TaskKind
from rnnpipe.pipeline.finetune.conlleval import conlleval
from rnnpipe.pipeline.finetune.identity import CHECKPOINT, RESULT, job_identity, read_result, stale_reason
from rnnpipe.pipeline.finetune.model import FinetuneModel, parameter_groups
from rnnpipe.pipeline.models.exported import CONFIG, WEIGHTS
from rnnpipe.pipeline.models.mixers import detach_state
from rnnpipe.pipeline.models.pretrained import load_pretrained_tokenizer
from rnnpipe.pipeline.provenance import provenance
from rnnpipe.pipeline.train.checkpoint import load_state, save_state
from rnnpipe.pipeline.train.data import IGNORE, StreamBatches
from rnnpipe.pipeline.train.evaluate import evaluate as evaluate_stream
from rnnpipe.pipeline.train.metrics import Metrics, Tags
from rnnpipe.pipeline.train.signals import StopFlag
from rnnpipe.pipeline.train.state import FinetuneState

log = logging.getLogger("rnnpipe.finetune")
LOG = "log.txt"
EVAL_BATCH, EVAL_STREAMS = 64, 8
HIGHER_IS_BETTER = {k: k is not TaskKind.lm for k in TaskKind}  # lm: perplexity
# What :func:`evaluate` returns for each kind of task without ``glue`` (a GLUE task: its own, see
# :mod:`rnnpipe.pipeline.finetune.glue`), and the metric early stopping and the table use.
METRICS = {
    TaskKind.classification: glue.DEFAULT_METRICS[TaskKind.classification],
    TaskKind.regression: glue.DEFAULT_METRICS[TaskKind.regression],
    TaskKind.tagging: ("f1", "precision", "recall", "accuracy"),
    TaskKind.lm: ("ppl", "bpb", "loss"),
}
PRIMARY = {k: names[0] for k, names in METRICS.items()}


def task_metrics(t: TaskConfig) -> tuple[tuple[str, ...], str]:
    """(what :func:`evaluate` returns for task ``t``, its main metric)."""
    if t.kind in (TaskKind.classification, TaskKind.regression):
        spec = glue.sentence_task(t)
        return spec.reported, spec.primary
    return METRICS[t.kind], PRIMARY[t.kind]


def tensorboard_tags(kind: TaskKind, metrics: tuple[str, ...] | None = None) -> Tags:
    """What a job of ``kind`` logs to its ``tensorboard/`` (docs/finetune.md lists them);
    ``metrics``: its evaluation's, where not the kind's own (a GLUE task's)."""
    names = METRICS[kind] if metrics is None else metrics
    dev = [f"dev/{m}" for m in names]
    final = [f"final/{split}_{m}" for split in ("dev", "test") for m in names]
    return Tags(frozenset(["train/loss", "train/grad_norm", "train/lr", *dev, *final]))


@dataclass
class TaskData:
    kind: TaskKind
    labels: list[str]  # label vocabulary (sorted from train, or GLUE's); empty for lm and regression
    # classification: [(ids, label index)]; regression: [(ids, score)]; tagging: [(ids, first, tag
    # ids)]; lm: LMText
    train: Any
    dev: Any  # classification, regression, lm: as train; tagging: [(ids, first, gold tags)]
    test: Any  # like dev, or None when the test file is absent or unlabelled
    sentences: glue.SentenceTask | None = None  # classification and regression: reader and metrics


def load_task(cfg: JobConfig, tok) -> TaskData:
    """The task's three splits, read and tokenized; see :class:`TaskData` for their forms."""
    t = cfg.task_config
    if t.kind is TaskKind.lm:
        read = tasks.read_lm_lines
        dev = tasks.encode_lm(tok, read(t.dev, t.max_dev))
        test = tasks.encode_lm(tok, read(t.test, t.max_test)) if t.test else None
        return TaskData(t.kind, [], tasks.encode_lm(tok, read(t.train, t.max_train)), dev, test)
    if t.kind in (TaskKind.classification, TaskKind.regression):
        d = glue.load_sentences(t, tok, cfg.max_len)
        if d.separator:
            log.info("sentence pairs: the segments are joined by the %s", d.separator)
        return TaskData(t.kind, d.labels, d.train, d.dev, d.test, d.spec)
    sents = [(w, tasks.to_iob2(g)) for w, g in tasks.read_conll(t.train, t.tag_column, t.max_train)]
    vocab = sorted({tag for _, tags in sents for tag in tags})
    train = []
    for words, tags in sents:
        ids, first = tasks.encode_words(tok, words, cfg.max_len)
        train.append((ids, first, np.array([vocab.index(g) for g in tags[: len(first)]], dtype=np.int64)))

    def gold(path: str, limit: int) -> list:
        out = []
        for words, tags in tasks.read_conll(path, t.tag_column, limit):
            ids, first = tasks.encode_words(tok, words, cfg.max_len)
            out.append((ids, first, tasks.to_iob2(tags)))
        return out

    return TaskData(
        t.kind, vocab, train, gold(t.dev, t.max_dev), gold(t.test, t.max_test) if t.test else None
    )


# ------------------------------------------------------------------------------------ evaluation


def _batches(examples: list, size: int) -> list[list[int]]:
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # less padding
    return [order[i : i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def evaluate(model: FinetuneModel, data: TaskData, examples: Any, device: torch.device) -> dict[str, float]:
    """Metrics of ``model`` on one split: the sentence task's (accuracy, F1, MCC, Pearson, Spearman:
    :func:`rnnpipe.pipeline.finetune.glue.score`); conlleval precision/recall/F1 (%); or per-word perplexity,
    bits per byte and nats per token with the state carried through the text."""
    was = model.training
    model.eval()
    try:
        if data.kind is TaskKind.lm:
            m = evaluate_stream(model.backbone, tasks.ArrayReader(examples), 0, 1, EVAL_STREAMS, 256, device)
            nats = m["loss"] * m["tokens"]
            return {
                "ppl": math.exp(min(nats / examples.words, 50.0)),
                "bpb": nats / math.log(2) / examples.bytes,
                "loss": m["loss"],
            }
        regression = data.kind is TaskKind.regression
        preds = np.zeros(len(examples), dtype=np.float64 if regression else np.int64)
        gold_tags, guessed_tags = [None] * len(examples), [None] * len(examples)
        for idx in _batches(examples, EVAL_BATCH):
            ids, lengths = tasks.pad([examples[i][0] for i in idx])
            out = model(torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device))
            if data.sentences is not None:
                preds[idx] = (out.float() if regression else out.argmax(-1)).cpu().numpy()
                continue
            pred = out.argmax(-1).cpu().numpy()
            for row, i in enumerate(idx):
                _, first, gold = examples[i]
                guess = [data.labels[k] for k in pred[row][first]]
                guessed_tags[i] = guess + ["O"] * (len(gold) - len(guess))  # cut-off words: O
                gold_tags[i] = gold
        if data.sentences is not None:
            gold_values = np.array([e[1] for e in examples], dtype=preds.dtype)
            return glue.score(data.sentences, data.labels, preds, gold_values)
        s = conlleval(gold_tags, guessed_tags)
        return {"f1": s.f1, "precision": s.precision, "recall": s.recall, "accuracy": s.accuracy}
    finally:
        model.train(was)


# -------------------------------------------------------------------------------------- training


def _train_batch(data: TaskData, order: np.ndarray, pos: int, size: int) -> tuple[np.ndarray, ...]:
    """(ids [B, T], lengths [B], targets) of batch ``pos`` of an epoch's order."""
    chosen = [data.train[i] for i in order[pos * size : (pos + 1) * size]]
    ids, lengths = tasks.pad([c[0] for c in chosen])
    if data.kind is TaskKind.classification:
        return ids, lengths, np.array([c[1] for c in chosen], dtype=np.int64)
    if data.kind is TaskKind.regression:
        return ids, lengths, np.array([c[1] for c in chosen], dtype=np.float32)
    targets = np.full(ids.shape, IGNORE, dtype=np.int64)
    for row, (_, first, tags) in enumerate(chosen):
        targets[row, first] = tags[: len(first)]
    return ids, lengths, targets


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).numpy()


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
    out, kind = cfg.out_dir, cfg.task_config.kind
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    exports = {"backbone": cfg.pretrained}
    if "backward.sha256" in identity:  # elmo: the backward LM, of the forward LM's tokenizer
        from rnnpipe.pipeline.finetune.sweep import check_backward

        exports["backward"] = cfg.pretrained_backward
        check_backward(cfg.pretrained, cfg.pretrained_backward)
    for name, export in exports.items():
        weights = fsio.join(export, WEIGHTS)
        if fsio.sha256_of(weights)[0] != identity[f"{name}.sha256"]:
            raise PipelineError(
                f"{weights}: its sha256 is not the one its {CONFIG} records: the export was changed "
                "after it was written; export it again"
            )
    tok = load_pretrained_tokenizer(cfg.pretrained)
    data = load_task(cfg, tok)
    model, vectors = build_model(cfg, data, tok)
    model = model.to(device).train()
    if vectors is not None:
        log.info(
            "embeddings.init: %s of %s ids found in %s (coverage %.1f%%, %d through the lowercased "
            "word); freeze=%s%s",
            f"{vectors['found']:,}",
            f"{vectors['vocab']:,}",
            cfg.embeddings.init,
            100 * vectors["coverage"],
            vectors["found_lowercased"],
            vectors["freeze"],
            " (both LMs)" if model.backward is not None else "",
        )
    opt = torch.optim.AdamW(parameter_groups(model, cfg.optim), lr=cfg.optim.lr, betas=(0.9, 0.98))
    warm, total = cfg.optim.warmup_steps, cfg.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / max(1, warm), max(0.0, (total - s) / max(1, total - warm)))
    )
    higher = HIGHER_IS_BETTER[kind]
    names, metric = task_metrics(cfg.task_config)
    streams = None
    if kind is TaskKind.lm:
        streams = StreamBatches(tasks.ArrayReader(data.train), 0, 1, cfg.batch_size, cfg.seq_len)
    st = FinetuneState(loader=streams)
    best_weights: dict[str, torch.Tensor] | None = None
    ckpt_path = fsio.join(out, CHECKPOINT)
    # On the CPU: the RNG states must stay there; load_state_dict moves the rest to the model's device.
    ck = load_state(ckpt_path) if fsio.exists(ckpt_path) else None
    if ck is not None and ck.get("fingerprint") != fp:
        log.info("%s: its checkpoint is of another job config or backbone: starting afresh", out)
        ck = None
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        best_weights = ck["best_weights"]
        st.load_state_dict(ck["state"], device)
        log.info("resumed %s at step %d", out, st.step)
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    # TensorBoard in tensorboard/, events past the checkpoint's step purged on resume
    # W&B (when a project is set): one run per job, grouped by the sweep's directory
    wandb = dataclasses.replace(cfg.wandb, group=cfg.wandb.group or Path(out).parent.parent.name)
    hp = {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith("wandb.")}
    tags = tensorboard_tags(kind, names)
    tb = Metrics(Path(out), True, st.step, cfg.max_steps, tags=tags, jsonl=False, wandb=wandb, config=hp)
    delay = float(os.environ.get("RNNPIPE_TEST_STEP_DELAY", "0"))
    n_train = len(data.train) if kind is not TaskKind.lm else 0
    steps_per_epoch = math.ceil(n_train / cfg.batch_size) if n_train else 0
    order = _epoch_order(cfg.seed, st.epoch, n_train) if n_train else None
    t0 = time.time()
    frozen = None

    def save() -> None:
        save_state(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "best_weights": best_weights,
                "state": st.state_dict(),
                "fingerprint": fp,
                "config": to_dict(cfg),
            },
        )

    # Ctrl-C: checkpoint after the step in progress, then stop (a second one stops at once).
    # USR2/TERM stay with the executor (submitit requeues the job; it resumes from the last evaluation).
    interrupt = StopFlag().install((signal.SIGINT,))
    try:
        while st.step < cfg.max_steps and not st.done:
            want_frozen = cfg.optim.freeze_steps == -1 or st.step < cfg.optim.freeze_steps
            if want_frozen != frozen:  # frozen parameters get no gradients and skip the optimiser
                frozen = want_frozen
                model.freeze_backbones(frozen)
            if kind is TaskKind.lm:
                assert streams is not None
                batch = next(streams)
                if batch.reset:
                    st.hidden = None
                logits, new_state = model.backbone(batch.inputs_BT.to(device), st.hidden)
                st.hidden = detach_state(new_state)
                loss = F.cross_entropy(
                    logits.flatten(0, 1), batch.targets_BT.to(device).flatten(), ignore_index=IGNORE
                )
            else:
                ids, lengths, targets = _train_batch(data, order, st.pos, cfg.batch_size)
                logits = model(torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device))
                y = torch.from_numpy(targets).to(device)
                if kind is TaskKind.regression:  # logits: the predicted scores [B]
                    loss = F.mse_loss(logits.float(), y)
                else:
                    loss = F.cross_entropy(
                        logits.flatten(0, -2) if y.dim() == 2 else logits, y.flatten(), ignore_index=IGNORE
                    )
                st.pos += 1
                if st.pos == steps_per_epoch:
                    st.epoch, st.pos = st.epoch + 1, 0
                    order = _epoch_order(cfg.seed, st.epoch, n_train)
            if not torch.isfinite(loss):
                raise PipelineError(
                    f"{out}: the loss is {loss.item()} at step {st.step + 1}; lower job.optim.lr"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                if cfg.optim.grad_clip
                else torch.tensor(0.0)
            )
            opt.step()
            sched.step()
            st.step += 1
            step = st.step
            if step % 10 == 0 or step == 1:
                logged = {"train/loss": loss.item(), "train/grad_norm": float(grad_norm)}
                tb.scalars(step, {**logged, "train/lr": opt.param_groups[0]["lr"]})
            if delay:
                time.sleep(delay)
            if interrupt:
                st.wall += time.time() - t0
                save()
                log.warning("%s: interrupted: checkpointed at step %d", out, st.step)
                raise KeyboardInterrupt
            if step % cfg.eval_every and step < cfg.max_steps:
                continue
            dev = evaluate(model, data, data.dev, device)
            tb.scalars(step, {f"dev/{k}": v for k, v in dev.items()})
            score = dev[metric]
            if st.best is None or (score > st.best if higher else score < st.best):
                st.best, st.best_step, st.bad = score, step, 0
                best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                st.bad += 1
                st.done = bool(cfg.patience) and st.bad >= cfg.patience
            log.info(
                "step %d/%d loss %.4f dev %s %.3f (best %.3f at %d)",
                step,
                cfg.max_steps,
                loss.item(),
                metric,
                score,
                st.best,
                st.best_step,
            )
            st.wall += time.time() - t0
            t0 = time.time()
            save()
    finally:
        interrupt.restore()
    st.wall += time.time() - t0
    if best_weights is not None:
        model.load_state_dict(best_weights)
    if cfg.save_model:
        buf = io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
        fsio.write_bytes_atomic(fsio.join(out, "model.pt"), buf.getvalue())
    dev = evaluate(model, data, data.dev, device)
    test = evaluate(model, data, data.test, device) if data.test else None
    for split, m in (("dev", dev), ("test", test or {})):
        tb.scalars(st.step, {f"final/{split}_{k}": v for k, v in m.items()})
    tb.close()
    result = {
        "task": cfg.task,
        "kind": kind.value,
        "init": cfg.init.value,
        "seed": cfg.seed,
        "hparams": cfg.hparams,
        "metric": metric,
        "glue": cfg.task_config.glue or None,  # the GLUE task it is, for the table's GLUE score
        "dev": dev,
        "test": test,
        "best_step": st.best_step,
        "steps": st.step,
        "epochs": st.epoch + st.pos / max(1, steps_per_epoch) if n_train else None,
        "early_stopped": st.done,
        "wall_s": round(st.wall, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "train_examples": n_train or len(data.train.ids),
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
    fsio.write_text_atomic(fsio.join(out, RESULT), json.dumps(result, indent=2) + "\n")
    fsio.remove(ckpt_path)
    log.info("%s: dev %s %.3f%s", out, metric, dev[metric], f", test {test[metric]:.3f}" if test else "")
    return result
