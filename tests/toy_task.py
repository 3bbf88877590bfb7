"""A fine-tune task kind of the tests' own, defined outside rnnpipe as one class: the worked
example of docs/finetune.md ("Add a task kind").

fastText's supervised format: one example per line, its labels first as ``__label__NAME`` words,
then the text (``__label__pos a fine film``); the first label is the example's. Scored by its error
rate (%), lower is better, which early stopping and the comparison of pretrained against scratch
follow; the loss is the head's cross-entropy with label smoothing. A sweep finds the kind through
``RNNPIPE_PLUGINS=toy_task`` (and this folder on ``PYTHONPATH``), in every process it starts.
"""

from __future__ import annotations

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.finetune import tasks
from rnnpipe.pipeline.finetune.kinds import ExampleKind, Head, TaskData

PREFIX = "__label__"


def read_fasttext(path: str, limit: int = 0) -> list[tuple[str, str]]:
    """(label, text) of each line of a fastText file (its first ``limit`` lines; 0 = all)."""
    with fsspec.open(path, "rt", encoding="utf-8") as f:  # any fsspec URL, as rnnpipe's readers
        lines = f.read().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        words = line.split()
        if not words:
            continue
        labels = [w[len(PREFIX) :] for w in words if w.startswith(PREFIX)]
        if not labels:
            raise PipelineError(f"{path}:{n}: no {PREFIX}NAME label")
        out.append((labels[0], " ".join(w for w in words if not w.startswith(PREFIX))))
        if len(out) == limit:
            break
    return out


class FastText(ExampleKind):
    """A label per line of a fastText file: error rate and accuracy (%), the error first."""

    name = "fasttext"  # what a task's ``kind:`` says; the class registers itself under it
    head = Head.classes  # pooled logits [B, C]: the model's classification head
    metrics = ("error", "accuracy")  # what score returns, the primary metric first
    higher_is_better = False  # an error rate

    def load(self, cfg, tok) -> TaskData:
        """Each split as ``[(ids [n], label index)]``, the labels those of the training file."""
        t = self.task
        train = read_fasttext(t.train, t.max_train)
        labels = sorted({label for label, _ in train})

        def encode(rows: list[tuple[str, str]]) -> list:
            return [(tasks.encode_text(tok, text, cfg.max_len), labels.index(y)) for y, text in rows]

        dev = encode(read_fasttext(t.dev, t.max_dev))
        test = encode(read_fasttext(t.test, t.max_test)) if t.test else None
        return TaskData(self.name, labels, encode(train), dev, test)

    def loss(self, model, out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the logits [B, C] against the label indices [B], smoothed by 0.1."""
        return F.cross_entropy(out, targets, label_smoothing=0.1)

    def score(self, data: TaskData, examples: list, predictions: list) -> dict[str, float]:
        """The error rate and accuracy (%) of the predicted label indices."""
        right = float(np.mean([p == y for (_, y), p in zip(examples, predictions, strict=True)]))
        return {"error": 100 * (1 - right), "accuracy": 100 * right}
