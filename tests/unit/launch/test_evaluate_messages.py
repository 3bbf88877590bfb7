"""`rnnpipe evaluate`'s bad input, said before the work: a ``--json`` path whose directory is
missing, and more streams than the evaluated split has tokens (named as that split)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from rnnpipe.launch.commands import evaluate as command
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.train.data import eval_batches


def test_a_json_path_in_a_missing_directory_fails_before_the_evaluation(tmp_path, monkeypatch):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")

    def never(*args, **kwargs):
        raise AssertionError("evaluated before the --json path was checked")

    monkeypatch.setattr("rnnpipe.pipeline.train.dynamic_eval.evaluate_export", never)
    out = tmp_path / "no-such-dir" / "results.json"
    args = argparse.Namespace(
        export=str(export), overrides=[], data=None, split="test", streams=1, seq_len=8,
        device="cpu", json=str(out),
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"--json .*no directory .*mkdir -p"):
        command.run(args)


class _Split:
    """A split of 10 tokens, as a reader presents it."""

    split, tokens = "test", 10

    def read(self, a: int, b: int) -> np.ndarray:
        return np.arange(a, b)


def test_too_many_streams_name_the_split_being_evaluated():
    with pytest.raises(PipelineError, match=r"^the test split has 10 tokens: too few for 1 rank\(s\) × 64"):
        next(eval_batches(_Split(), 0, 1, 64, 8))  # type: ignore[arg-type]
