"""The ``lm`` task kind: word-level language modelling (PTB), the LM fine-tuned as itself."""

from __future__ import annotations

import math

from rnnpipe.pipeline.data.tokenizer_base import Tokenizer
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.finetune import tasks
from rnnpipe.pipeline.finetune.config import Features, JobConfig, JobSpec
from rnnpipe.pipeline.finetune.kinds.base import Head, Kind, TaskData, described


class LanguageModelling(Kind):
    """One sentence per line, read as one token stream (``"\\n" + line + "\\n" + ...``) and trained
    as stateful truncated BPTT. Metrics: perplexity per word (one ``<eos>`` per line counted as a
    word), bits per byte and nats per token: lower is better."""

    name = "lm"
    head = Head.lm
    metrics = ("ppl", "bpb", "loss")
    higher_is_better = False
    # bits per byte, which is bits per character on ASCII text such as PTB's: the unit byte- and
    # character-level LMs are reported in (its per-word perplexity is in the table)
    figure = ("bpb", "bits/char")

    @classmethod
    def check_job(cls, task: str, spec: JobSpec) -> None:
        """The LM is the model: no frozen backbone, no head to read ELMo's mix."""
        if spec.optim.freeze_steps:
            raise ConfigError(
                f"task {task} ({cls.name}) trains the backbone itself: set optim.freeze_steps=0"
            )
        if spec.head.features is Features.elmo:
            raise ConfigError(
                f"task {task} ({cls.name}) fine-tunes the forward LM itself: head.features=elmo is for "
                f"{described(lambda k: k.head is not Head.lm)} tasks"
            )

    def load(self, cfg: JobConfig, tok: Tokenizer) -> TaskData:
        """Each split as one :class:`~rnnpipe.pipeline.finetune.tasks.LMText`."""
        t, read = self.task, tasks.read_lm_lines
        dev = tasks.encode_lm(tok, read(t.dev, t.max_dev))
        test = tasks.encode_lm(tok, read(t.test, t.max_test)) if t.test else None
        return TaskData(self.name, [], tasks.encode_lm(tok, read(t.train, t.max_train)), dev, test)

    def train_size(self, data: TaskData) -> int:
        return len(data.train.ids)

    def score(self, data: TaskData, examples: tasks.LMText, predictions: dict) -> dict[str, float]:
        """The stream's nats counted per word (perplexity) and per byte (bits): the same quantity."""
        nats = predictions["loss"] * predictions["tokens"]
        return {
            "ppl": math.exp(min(nats / examples.words, 50.0)),
            "bpb": nats / math.log(2) / examples.bytes,
            "loss": predictions["loss"],
        }
