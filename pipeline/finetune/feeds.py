"""How a job's data goes through its model: the training batches and their loss, and each
evaluation's predictions, for the kinds of head (:class:`~rnnpipe.pipeline.finetune.kinds.Head`).

- :class:`ExampleFeed` (pooled and per-token heads): batches of the kind's examples in a seeded
  order, a new one each epoch; the position is the job state's ``epoch`` and ``pos``.
- :class:`StreamFeed` (the lm head): stateful truncated BPTT over the training text
  (``batch_size`` contiguous streams of ``seq_len`` tokens, the state carried in the job state's
  ``hidden``, the position its loader's, as in the pretrain stage's stream mode); evaluation
  carries the state through a whole split in 8 streams.

A feed asks the kind what is the task's (its batches' targets, its metrics of the predictions) and
the model what is the head's (its loss, its predictions).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from rnnpipe.pipeline.engine.rank import RankContext
from rnnpipe.pipeline.engine.state import FinetuneState
from rnnpipe.pipeline.finetune import tasks
from rnnpipe.pipeline.finetune.config import JobConfig
from rnnpipe.pipeline.finetune.kinds import ExampleKind, Head, Kind, TaskData
from rnnpipe.pipeline.finetune.model import FinetuneModel
from rnnpipe.pipeline.models.mixers import detach_state
from rnnpipe.pipeline.train.data import StreamBatches
from rnnpipe.pipeline.train.evaluate import evaluate as evaluate_stream

EVAL_BATCH, EVAL_STREAMS = 64, 8


class Feed:
    """The batches, the loss and the predictions of the heads in :attr:`heads`."""

    heads: ClassVar[tuple[Head, ...]] = ()
    # what holds the data position in the job state (FinetuneState.loader), where not epoch/pos
    loader: Any = None

    def __init__(self, kind: Kind, data: TaskData, cfg: JobConfig) -> None:
        self.kind, self.data, self.cfg = kind, data, cfg

    def loss(self, model: FinetuneModel, st: FinetuneState, device: torch.device) -> torch.Tensor:
        """The training loss of the next batch; moves the data position in ``st``."""
        raise NotImplementedError

    def predictions(self, model: FinetuneModel, examples: Any, device: torch.device) -> Any:
        """What the kind's ``score`` reads of ``model`` on the split ``examples``."""
        raise NotImplementedError

    def epochs(self, st: FinetuneState) -> float | None:
        """Epochs of training data done (None: not counted in epochs)."""
        return None

    @torch.no_grad()
    def evaluate(self, model: FinetuneModel, examples: Any, device: torch.device) -> dict[str, float]:
        """The kind's metrics of ``model`` on one split (in eval mode, then back)."""
        was = model.training
        model.eval()
        try:
            return self.kind.score(self.data, examples, self.predictions(model, examples, device))
        finally:
            model.train(was)


class ExampleFeed(Feed):
    """Batches of ``batch_size`` examples, collated by the kind, in an order seeded by the job's
    seed and the epoch; evaluation in batches of similar length (less padding)."""

    heads = (Head.classes, Head.score, Head.tokens)
    kind: ExampleKind

    def __init__(self, kind: Kind, data: TaskData, cfg: JobConfig) -> None:
        super().__init__(kind, data, cfg)
        self.steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The training examples' order in ``epoch`` [n]: a permutation of its own generator (the
        job's RNGs do not move)."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.data.train), generator=g).numpy())
        return self._order[1]

    def loss(self, model: FinetuneModel, st: FinetuneState, device: torch.device) -> torch.Tensor:
        size = self.cfg.batch_size
        chosen = [self.data.train[i] for i in self.order(st.epoch)[st.pos * size : (st.pos + 1) * size]]
        ids, lengths, targets = self.kind.collate(self.data, chosen)
        out = model(torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device))
        st.pos += 1
        if st.pos == self.steps_per_epoch:
            st.epoch, st.pos = st.epoch + 1, 0
        return self.kind.loss(model, out, torch.from_numpy(targets).to(device))

    def predictions(self, model: FinetuneModel, examples: list, device: torch.device) -> list:
        """One per example: a label index, a score, or label indices [n] of its n tokens."""
        preds: list = [None] * len(examples)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # less padding
        for a in range(0, len(order), EVAL_BATCH):
            idx = order[a : a + EVAL_BATCH]
            ids, lengths = tasks.pad([examples[i][0] for i in idx])
            outputs = model(torch.from_numpy(ids).to(device), torch.from_numpy(lengths).to(device))
            pred = self.kind.predict(model, outputs)
            for row, i in enumerate(idx):
                preds[i] = pred[row, : lengths[row]] if pred.ndim == 2 else pred[row]
        return preds

    def epochs(self, st: FinetuneState) -> float | None:
        return st.epoch + st.pos / max(1, self.steps_per_epoch)


class StreamFeed(Feed):
    """The LM on its training text as contiguous streams, the state carried between segments."""

    heads = (Head.lm,)

    def __init__(self, kind: Kind, data: TaskData, cfg: JobConfig) -> None:
        super().__init__(kind, data, cfg)
        self.loader = StreamBatches(tasks.ArrayReader(data.train), 0, 1, cfg.batch_size, cfg.seq_len)

    def loss(self, model: FinetuneModel, st: FinetuneState, device: torch.device) -> torch.Tensor:
        batch = next(self.loader)
        if batch.reset:  # a new epoch: every stream from its beginning, the state from zero
            st.hidden = None
        logits, state = model.backbone(batch.inputs_BT.to(device), st.hidden)
        st.hidden = detach_state(state)
        return self.kind.loss(model, logits, batch.targets_BT.to(device))

    def predictions(self, model: FinetuneModel, examples: tasks.LMText, device: torch.device) -> dict:
        """The stream evaluation's ``loss`` (nats per token) and ``tokens``."""
        reader = tasks.ArrayReader(examples)
        return evaluate_stream(model.backbone, reader, RankContext.single(device), EVAL_STREAMS, 256)


def feed_for(kind: Kind, data: TaskData, cfg: JobConfig) -> Feed:
    """The feed of ``kind``'s head, for the task ``data`` and the job ``cfg``."""
    feed = next(f for f in (ExampleFeed, StreamFeed) if kind.head in f.heads)
    return feed(kind, data, cfg)
