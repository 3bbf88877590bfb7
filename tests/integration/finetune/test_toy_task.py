"""A task kind of one's own (tests/toy_task.py: one class, outside rnnpipe) found through
RNNPIPE_PLUGINS: through a sweep's worker processes, early stopping in its direction, the table
and the comparison of pretrained against scratch."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from harness import REPO, forget_plugin, rnnpipe

from rnnpipe.pipeline.config import to_dict
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.finetune import kinds
from rnnpipe.pipeline.models import LanguageModel, MixerKind, ModelConfig
from rnnpipe.pipeline.models.pretrained import save_pretrained


@pytest.fixture
def plugins(monkeypatch):
    """RNNPIPE_PLUGINS=toy_task, tests/ on PYTHONPATH: as a user names a module of their own."""
    monkeypatch.setenv("RNNPIPE_PLUGINS", "toy_task")
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO / "tests"), path) if p))
    yield
    forget_plugin("toy_task", kinds.base._KINDS)  # the registry as the other tests of this worker know it


def test_the_registry_imports_the_module_that_defines_a_kind(plugins):
    kind = kinds.get("fasttext")
    assert (kind.__module__, kind.__name__, kind.metrics) == ("toy_task", "FastText", ("error", "accuracy"))
    assert kind.improves(10.0, 20.0) and not kind.improves(30.0, 20.0)  # lower is better
    assert kind.improves(99.0, None)


def test_an_unknown_kind_names_the_kinds_and_the_variable(plugins, monkeypatch):
    monkeypatch.setenv("RNNPIPE_PLUGINS", "")
    with pytest.raises(ConfigError, match=r"tasks\.t\.kind='fastext' is not a task kind: .*RNNPIPE_PLUGINS"):
        kinds.get("fastext", "tasks.t.")


def _fasttext_files(root: Path) -> dict[str, str]:
    """train, dev and test files in fastText's format: positive lines say good things."""
    rng = random.Random(0)
    words = {"pos": ["good", "fine", "great"], "neg": ["bad", "poor", "awful"]}
    paths = {}
    for split, n in (("train", 48), ("dev", 16), ("test", 16)):
        lines = []
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            text = " ".join(rng.choice(words[label] + ["the", "film", "was"]) for _ in range(6))
            lines.append(f"__label__{label} {text}")
        paths[split] = str(root / f"{split}.txt")
        Path(paths[split]).write_text("\n".join(lines) + "\n")
    return paths


def _sweep(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    lm = LanguageModel(
        ModelConfig(mixer=MixerKind.lrn, n_layers=2, d_model=32, mlp_ratio=2.0, n_heads=4), 256
    )
    save_pretrained(
        tmp_path / "model", lm.state_dict(), to_dict(lm.cfg), {"kind": "bytes", "vocab_size": 256}
    )
    cfg = {
        "out_dir": str(tmp_path / "sweep"),
        "pretrained": str(tmp_path / "model"),
        "tasks": {"toy": {"kind": "fasttext", **_fasttext_files(tmp_path)}},
        "job": {"max_steps": 8, "eval_every": 2, "patience": 0, "batch_size": 8, "max_len": 48},
        "grid": {"task": ["toy"], "init": ["pretrained", "scratch"]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.timeout(300)
def test_a_task_kind_of_ones_own_runs_through_a_sweep_and_the_table(tmp_path, plugins, capsys):
    sweep = _sweep(tmp_path)
    # the local executor's workers are processes of their own: they find the kind as this one does
    assert rnnpipe("-q", "finetune", sweep, "--executor", "local", "executor.workers=2") == 0
    for init in ("pretrained", "scratch"):
        job = tmp_path / "sweep" / "jobs" / f"toy-{init}"
        r = json.loads((job / "result.json").read_text())
        assert (r["kind"], r["metric"], r["steps"]) == ("fasttext", "error", 8)
        assert set(r["dev"]) == set(r["test"]) == {"error", "accuracy"}
        assert r["dev"]["error"] == pytest.approx(100 - r["dev"]["accuracy"])
        # early stopping kept the weights of the lowest dev error: the kind's direction
        logged = re.findall(r"step (\d+)/8 loss \S+ dev error ([\d.]+)", (job / "log.txt").read_text())
        assert [int(s) for s, _ in logged] == [2, 4, 6, 8]
        errors = [float(e) for _, e in logged]
        assert r["best_step"] == 2 * (errors.index(min(errors)) + 1)
        assert f"{r['dev']['error']:.3f}" == f"{min(errors):.3f}"  # the best weights, scored again
    capsys.readouterr()
    assert rnnpipe("collect", sweep) == 0  # the table and the comparison, as the pipeline's stage
    out = capsys.readouterr().out
    assert re.search(r"\| toy \| pretrained \| — \| 1 \| error \| [\d.]+ \| [\d.]+ \| — \| 8 \|", out)
    (row,) = json.loads((tmp_path / "sweep" / "comparison.json").read_text())["rows"]
    assert (row["task"], row["figure"], row["lower_is_better"]) == ("toy", "test error", True)
    assert row["gain"] == pytest.approx(row["scratch"][0] - row["pretrained"][0])  # lower: positive
    assert "gain: positive is better; bits/char, error: lower is better" in out
