"""The ``tagging`` task kind: a tag per word (CoNLL-2003 NER), scored by conlleval."""

from __future__ import annotations

import numpy as np

from rnnpipe.pipeline.data.tokenizer_base import Tokenizer
from rnnpipe.pipeline.finetune import tasks
from rnnpipe.pipeline.finetune.config import JobConfig
from rnnpipe.pipeline.finetune.conlleval import conlleval
from rnnpipe.pipeline.finetune.kinds.base import IGNORE, ExampleKind, Head, TaskData


class Tagging(ExampleKind):
    """CoNLL columns (``word ... tag``), the tags as IOB2. Each word's tag goes to the token that
    holds its first byte; the loss and the predictions use those tokens only, and a word cut off
    by ``max_len`` is predicted ``O``. Metrics: conlleval's entity-level F1, precision and recall
    and its token accuracy (%)."""

    name = "tagging"
    head = Head.tokens
    metrics = ("f1", "precision", "recall", "accuracy")

    def load(self, cfg: JobConfig, tok: Tokenizer) -> TaskData:
        """Train: ``(ids, first, tag ids)``; dev and test: ``(ids, first, gold tags)``, where
        ``first`` [w] holds each (kept) word's first token."""
        t = self.task
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

        test = gold(t.test, t.max_test) if t.test else None
        return TaskData(self.name, vocab, train, gold(t.dev, t.max_dev), test)

    def collate(self, data: TaskData, chosen: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Targets [B, T]: each word's tag id at its first token, IGNORE elsewhere."""
        ids, lengths = tasks.pad([c[0] for c in chosen])
        targets = np.full(ids.shape, IGNORE, dtype=np.int64)
        for row, (_, first, tags) in enumerate(chosen):
            targets[row, first] = tags[: len(first)]
        return ids, lengths, targets

    def score(self, data: TaskData, examples: list, predictions: list) -> dict[str, float]:
        """conlleval of the tags predicted at each word's first token."""
        gold_tags, guessed_tags = [], []
        for (_, first, gold), pred in zip(examples, predictions, strict=True):
            guess = [data.labels[k] for k in pred[first]]
            guessed_tags.append(guess + ["O"] * (len(gold) - len(guess)))  # cut-off words: O
            gold_tags.append(gold)
        s = conlleval(gold_tags, guessed_tags)
        return {"f1": s.f1, "precision": s.precision, "recall": s.recall, "accuracy": s.accuracy}
