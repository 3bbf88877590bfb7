"""Evaluation with the state carried through a whole split (as the enwik8 literature does)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.train.data import IGNORE, SplitReader, eval_batches


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    reader: SplitReader,
    rank: int,
    world: int,
    streams: int,
    seq_len: int,
    device: torch.device,
    max_tokens: int = 0,
    should_stop: Callable[[], bool] | None = None,
    check_every: int = 16,
) -> dict[str, float] | None:
    """Loss (nats per token), bits per byte and perplexity of ``model`` on a split.

    The split is cut into world × ``streams`` contiguous streams; each is read from its start with
    the state carried from segment to segment. Every rank runs the same number of forward passes
    (ZeRO-3 gathers parameters collectively). Bits per byte use the split's UTF-8 byte count from
    the shards, so they compare across tokenizers.

    ``should_stop`` is asked every ``check_every`` batches (all ranks agree): when it says yes —
    a preemption signal arrived — the evaluation is abandoned and ``None`` returned, so that the
    job can still checkpoint and requeue within the signal's grace period.
    """
    was_training = model.training
    model.eval()
    state = None
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # nats, targets
    delay = float(os.environ.get("RNNPIPE_TEST_EVAL_DELAY", "0"))  # tests: a slow evaluation
    for i, batch in enumerate(eval_batches(reader, rank, world, streams, seq_len, max_tokens)):
        if should_stop is not None and i % check_every == check_every - 1 and _anyone(should_stop(), device):
            model.train(was_training)
            return None
        if delay:
            time.sleep(delay)
        logits, state = model(batch.inputs_BT.to(device), state)
        targets = batch.targets_BT.to(device)
        totals[0] += F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        ).double()
        totals[1] += (targets != IGNORE).sum()
    if dist.is_initialized():
        dist.all_reduce(totals)
    model.train(was_training)
    nats, targets = totals.tolist()
    loss = nats / max(targets, 1)
    bytes_per_token = reader.bytes / reader.tokens
    return {
        "loss": loss,
        "bpb": loss / math.log(2) / bytes_per_token,
        "ppl": math.exp(min(loss, 50.0)),
        "tokens": targets,
    }


def _anyone(flag: bool, device: torch.device) -> bool:
    x = torch.tensor([float(flag)], device=device)
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return bool(x.item())
