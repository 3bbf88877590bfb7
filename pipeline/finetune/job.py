"""One fine-tuning job: (task, hyper-parameters, seed, init) → ``result.json``.

Read top to bottom: load the task and the tokenizer, build the model (pretrained or from scratch),
then train with AdamW (warm-up, linear decay, layer-wise rate decay, optional frozen backbone),
evaluate on dev every ``eval_every`` steps, keep the best weights, stop after ``patience``
evaluations without improvement, and score the best weights on dev and test.

Resumable: every evaluation writes ``checkpoint.pt`` (weights, optimiser, schedule, data position,
LM state, best weights, RNG states) atomically; a job started again (a requeue, a re-run) continues
from it and ends with the same result as an uninterrupted run. ``result.json`` is written last, so
its presence means the job is complete, and the checkpoint is then removed.
RNNPIPE_TEST_STEP_DELAY (seconds slept after each step) exists for tests that kill a job mid-way.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import fsio
from pipeline.config import to_dict
from pipeline.errors import PipelineError
from pipeline.finetune import tasks
from pipeline.finetune.config import Init, JobConfig, TaskKind
from pipeline.finetune.conlleval import conlleval
from pipeline.finetune.model import FinetuneModel, parameter_groups, set_dropout
from pipeline.models.lm import LanguageModel
from pipeline.models.mixers import detach_state
from pipeline.models.pretrained import load_pretrained, load_pretrained_tokenizer
from pipeline.train.checkpoint import rng_state, set_rng_state
from pipeline.train.data import IGNORE, StreamBatches
from pipeline.train.evaluate import evaluate as evaluate_stream

log = logging.getLogger("rnnpipe.finetune")
RESULT, CHECKPOINT, LOG = "result.json", "checkpoint.pt", "log.txt"
EVAL_BATCH, EVAL_STREAMS = 64, 8
HIGHER_IS_BETTER = {TaskKind.classification: True, TaskKind.tagging: True, TaskKind.lm: False}
PRIMARY = {TaskKind.classification: "accuracy", TaskKind.tagging: "f1", TaskKind.lm: "ppl"}


@dataclass
class TaskData:
    kind: TaskKind
    labels: list[str]  # label vocabulary (sorted, from train); empty for lm
    train: Any  # classification: [(ids, label)]; tagging: [(ids, first, tag ids)]; lm: LMText
    dev: Any  # classification: [(ids, label)]; tagging: [(ids, first, gold tags)]; lm: LMText
    test: Any  # like dev, or None when the test file is absent or unlabelled


def load_task(cfg: JobConfig, tok) -> TaskData:
    """The task's three splits, read and tokenized; see :class:`TaskData` for their forms."""
    t = cfg.task_config
    if t.kind is TaskKind.lm:
        read = tasks.read_lm_lines
        dev = tasks.encode_lm(tok, read(t.dev, t.max_dev))
        test = tasks.encode_lm(tok, read(t.test, t.max_test)) if t.test else None
        return TaskData(t.kind, [], tasks.encode_lm(tok, read(t.train, t.max_train)), dev, test)
    if t.kind is TaskKind.classification:
        texts, labels = tasks.read_tsv(t.train, t.text_column, t.label_column, t.max_train)
        if labels is None:
            raise PipelineError(f"{t.train}: no {t.label_column!r} column: training data must be labelled")
        vocab = sorted(set(labels))

        def encode(path: str, limit: int) -> list | None:
            xs, ys = tasks.read_tsv(path, t.text_column, t.label_column, limit)
            if ys is None:
                return None
            unknown = sorted(set(ys) - set(vocab))
            if unknown:
                raise PipelineError(f"{path}: label(s) {unknown} do not occur in {t.train}")
            return [
                (tasks.encode_text(tok, x, cfg.max_len), vocab.index(y)) for x, y in zip(xs, ys, strict=True)
            ]

        train = [
            (tasks.encode_text(tok, x, cfg.max_len), vocab.index(y))
            for x, y in zip(texts, labels, strict=True)
        ]
        dev = encode(t.dev, t.max_dev)
        if dev is None:
            raise PipelineError(f"{t.dev}: no {t.label_column!r} column: dev data must be labelled")
        return TaskData(t.kind, vocab, train, dev, encode(t.test, t.max_test) if t.test else None)
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


def build_model(cfg: JobConfig, data: TaskData) -> FinetuneModel:
    """The pretrained backbone (or the same architecture from scratch, seeded) plus the head."""
    torch.manual_seed(cfg.seed)
    pretrained = load_pretrained(cfg.pretrained)
    if cfg.init is Init.scratch:
        backbone = LanguageModel(pretrained.cfg, pretrained.vocab_size)
    else:
        backbone = pretrained
    if cfg.dropout >= 0:
        set_dropout(backbone, cfg.dropout)
    return FinetuneModel(backbone, data.kind, max(1, len(data.labels)), cfg.head)


# ------------------------------------------------------------------------------------ evaluation


def _batches(examples: list, size: int) -> list[list[int]]:
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # less padding
    return [order[i : i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def evaluate(model: FinetuneModel, data: TaskData, examples: Any, device: torch.device) -> dict[str, float]:
    """Metrics of ``model`` on one split: accuracy (%); conlleval precision/recall/F1 (%); or
    per-word perplexity, bits per byte and nats per token with the state carried through the text."""
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
        correct = 0
        gold_tags, guessed_tags = [None] * len(examples), [None] * len(examples)
        for idx in _batches(examples, EVAL_BATCH):
            ids, lengths = tasks.pad([examples[i][0] for i in idx])
            logits = model(torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device))
            pred = logits.argmax(-1).cpu().numpy()
            for row, i in enumerate(idx):
                if data.kind is TaskKind.classification:
                    correct += int(pred[row] == examples[i][1])
                    continue
                _, first, gold = examples[i]
                guess = [data.labels[k] for k in pred[row][first]]
                guessed_tags[i] = guess + ["O"] * (len(gold) - len(guess))  # cut-off words: O
                gold_tags[i] = gold
        if data.kind is TaskKind.classification:
            return {"accuracy": 100.0 * correct / len(examples)}
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
    targets = np.full(ids.shape, IGNORE, dtype=np.int64)
    for row, (_, first, tags) in enumerate(chosen):
        targets[row, first] = tags[: len(first)]
    return ids, lengths, targets


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).numpy()


def _save(path: str, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    fsio.write_bytes_atomic(path, buf.getvalue())


def run_job(cfg: JobConfig) -> dict[str, Any]:
    """Run (or finish, or skip when complete) one job; returns its result (also in result.json)."""
    out = cfg.out_dir
    if fsio.exists(fsio.join(out, RESULT)):
        result = json.loads(fsio.read_text(fsio.join(out, RESULT)))
        check_same_config(out, RESULT, result.get("config", {}), to_dict(cfg))
        return result
    fsio.makedirs(out)
    handler = logging.FileHandler(os.path.join(out, LOG)) if fsio.is_local(out) else None
    if handler:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return _run(cfg)
    except Exception as e:  # in log.txt too: a sweep reports the failed job's log tail
        log.error("job failed: %s", e, exc_info=not isinstance(e, PipelineError))
        raise
    finally:
        if handler:
            log.removeHandler(handler)
            handler.close()


def check_same_config(out: str, what: str, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to reuse a result or checkpoint written by a different job config."""
    if saved == wanted:
        return
    keys = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    raise PipelineError(
        f"{out}: its {what} was written by a different job config (differs in: {', '.join(keys)}); "
        "delete that directory to run the job again, or give the sweep another out_dir"
    )


def _run(cfg: JobConfig) -> dict[str, Any]:
    out, kind = cfg.out_dir, cfg.task_config.kind
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = load_pretrained_tokenizer(cfg.pretrained)
    data = load_task(cfg, tok)
    model = build_model(cfg, data).to(device).train()
    opt = torch.optim.AdamW(parameter_groups(model, cfg.optim), lr=cfg.optim.lr, betas=(0.9, 0.98))
    warm, total = cfg.optim.warmup_steps, cfg.max_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / max(1, warm), max(0.0, (total - s) / max(1, total - warm)))
    )
    higher = HIGHER_IS_BETTER[kind]
    metric = PRIMARY[kind]
    st: dict[str, Any] = dict(step=0, epoch=0, pos=0, best=None, best_step=0, bad=0, done=False, wall=0.0)
    best_weights: dict[str, torch.Tensor] | None = None
    streams = lm_state = None
    if kind is TaskKind.lm:
        streams = StreamBatches(tasks.ArrayReader(data.train), 0, 1, cfg.batch_size, cfg.seq_len)
    ckpt_path = fsio.join(out, CHECKPOINT)
    if fsio.exists(ckpt_path):
        ck = torch.load(io.BytesIO(fsio.read_bytes(ckpt_path)), map_location=device, weights_only=False)
        check_same_config(out, CHECKPOINT, ck["config"], to_dict(cfg))
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        st, best_weights, lm_state = ck["state"], ck["best_weights"], ck["lm_state"]
        if streams is not None:
            streams.load_state_dict(ck["streams"])
        set_rng_state(ck["rng"])
        log.info("resumed %s at step %d", out, st["step"])
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=st["step"] + 1 if st["step"] else None)
    delay = float(os.environ.get("RNNPIPE_TEST_STEP_DELAY", "0"))
    n_train = len(data.train) if kind is not TaskKind.lm else 0
    steps_per_epoch = math.ceil(n_train / cfg.batch_size) if n_train else 0
    order = _epoch_order(cfg.seed, st["epoch"], n_train) if n_train else None
    t0 = time.time()
    frozen = None
    while st["step"] < cfg.max_steps and not st["done"]:
        want_frozen = cfg.optim.freeze_steps == -1 or st["step"] < cfg.optim.freeze_steps
        if want_frozen != frozen:  # frozen parameters get no gradients and skip the optimiser
            frozen = want_frozen
            model.backbone.requires_grad_(not frozen)
        if kind is TaskKind.lm:
            assert streams is not None
            batch = next(streams)
            if batch.reset:
                lm_state = None
            logits, lm_state = model.backbone(batch.inputs_BT.to(device), lm_state)
            lm_state = detach_state(lm_state)
            loss = F.cross_entropy(
                logits.flatten(0, 1), batch.targets_BT.to(device).flatten(), ignore_index=IGNORE
            )
        else:
            ids, lengths, targets = _train_batch(data, order, st["pos"], cfg.batch_size)
            logits = model(torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device))
            y = torch.from_numpy(targets).to(device)
            loss = F.cross_entropy(
                logits.flatten(0, -2) if y.dim() == 2 else logits, y.flatten(), ignore_index=IGNORE
            )
            st["pos"] += 1
            if st["pos"] == steps_per_epoch:
                st["epoch"], st["pos"] = st["epoch"] + 1, 0
                order = _epoch_order(cfg.seed, st["epoch"], n_train)
        if not torch.isfinite(loss):
            raise PipelineError(
                f"{out}: the loss is {loss.item()} at step {st['step'] + 1}; lower job.optim.lr"
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
        st["step"] += 1
        step = st["step"]
        if step % 10 == 0 or step == 1:
            tb.add_scalar("train/loss", loss.item(), step)
            tb.add_scalar("train/grad_norm", float(grad_norm), step)
            tb.add_scalar("train/lr", opt.param_groups[0]["lr"], step)
        if delay:
            time.sleep(delay)
        if step % cfg.eval_every and step < cfg.max_steps:
            continue
        dev = evaluate(model, data, data.dev, device)
        for k, v in dev.items():
            tb.add_scalar(f"dev/{k}", v, step)
        score = dev[metric]
        if st["best"] is None or (score > st["best"] if higher else score < st["best"]):
            st["best"], st["best_step"], st["bad"] = score, step, 0
            best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            st["bad"] += 1
            st["done"] = bool(cfg.patience) and st["bad"] >= cfg.patience
        log.info(
            "step %d/%d loss %.4f dev %s %.3f (best %.3f at %d)",
            step,
            cfg.max_steps,
            loss.item(),
            metric,
            score,
            st["best"],
            st["best_step"],
        )
        st["wall"] += time.time() - t0
        t0 = time.time()
        _save(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "state": st,
                "best_weights": best_weights,
                "lm_state": lm_state,
                "streams": streams.state_dict() if streams is not None else None,
                "rng": rng_state(),
                "config": to_dict(cfg),
            },
        )
    st["wall"] += time.time() - t0
    if best_weights is not None:
        model.load_state_dict(best_weights)
    if cfg.save_model:
        buf = io.BytesIO()
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buf)
        fsio.write_bytes_atomic(fsio.join(out, "model.pt"), buf.getvalue())
    dev = evaluate(model, data, data.dev, device)
    test = evaluate(model, data, data.test, device) if data.test else None
    for split, m in (("dev", dev), ("test", test or {})):
        for k, v in m.items():
            tb.add_scalar(f"final/{split}_{k}", v, st["step"])
    tb.close()
    result = {
        "task": cfg.task,
        "kind": kind.value,
        "init": cfg.init.value,
        "seed": cfg.seed,
        "hparams": cfg.hparams,
        "metric": metric,
        "dev": dev,
        "test": test,
        "best_step": st["best_step"],
        "steps": st["step"],
        "epochs": st["epoch"] + st["pos"] / max(1, steps_per_epoch) if n_train else None,
        "early_stopped": st["done"],
        "wall_s": round(st["wall"], 1),
        "params": sum(p.numel() for p in model.parameters()),
        "train_examples": n_train or len(data.train.ids),
        "device": str(device),
        "config": to_dict(cfg),
    }
    fsio.write_text_atomic(fsio.join(out, RESULT), json.dumps(result, indent=2) + "\n")
    fsio.remove(ckpt_path)
    log.info("%s: dev %s %.3f%s", out, metric, dev[metric], f", test {test[metric]:.3f}" if test else "")
    return result
