"""train.compile=true: the model runs under torch.compile, trains as the uncompiled one does, and
its checkpoints and export hold the module's own parameter names (a run resumes either way).

The compiler here is torch.compile's ``aot_eager`` backend (RNNPIPE_TEST_COMPILE_BACKEND, for
tests only): it traces the same graphs as inductor (TorchDynamo, AOTAutograd, the recurrences'
custom ops through their fake implementations) without generating and compiling C++, which on
two cores takes longer than the whole test (about 30 s for this model).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from harness import CLI, REPO, TINY_PRETRAIN
from safetensors.torch import load_file

pytest.importorskip("deepspeed")
CONFIG = REPO / "configs" / "pretrain" / "tiny-lrn.yaml"
TINY = [
    *TINY_PRETRAIN,
    "train.steps=6",
    "train.checkpoint_every=3",
    "train.eval_max_tokens=400",
    "executor.kind=inline",
    "distributed.nproc=1",
]


@pytest.fixture(scope="module")
def dataset(tiny_enwik8) -> Path:
    return tiny_enwik8


def pretrain(run_dir: Path, data: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [*CLI, "pretrain", str(CONFIG), f"run_dir={run_dir}", f"data.path={data}"]
    env = {**os.environ, "RNNPIPE_PROGRESS": "0", "RNNPIPE_TEST_COMPILE_BACKEND": "aot_eager"}
    return subprocess.run([*cmd, *TINY, *overrides], capture_output=True, text=True, env=env, timeout=600)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_a_compiled_run_trains_like_an_uncompiled_one_and_saves_plain_names(tmp_path, dataset):
    run_dir = tmp_path / "run"
    compiled = pretrain(run_dir, dataset, "train.compile=true", "--export")
    assert compiled.returncode == 0, compiled.stderr[-3000:]
    assert "the model runs under torch.compile (aot_eager)" in compiled.stderr
    first = losses(run_dir)
    assert sorted(first) == list(range(1, 7)) and all(0 < v < 6 for v in first.values())

    names = set(load_file(run_dir / "export" / "model.safetensors"))  # the export
    saved = torch.load(
        run_dir / "checkpoints" / "step00000003" / "mp_rank_00_model_states.pt", weights_only=False
    )["module"]
    assert names and names <= set(saved)  # the export's names are the checkpoint's (less a tied head)
    assert not any("_orig_mod" in k for k in {*names, *saved})  # the module's own, not the compiled wrapper's

    # From the compiled run's step 3, uncompiled (in a run dir of its own): steps 4..6 again,
    # with the same losses.
    resumed = tmp_path / "resumed"
    again = pretrain(resumed, dataset, f"train.resume={run_dir / 'checkpoints' / 'step00000003'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    second = losses(resumed)
    assert sorted(second) == [4, 5, 6]
    for step in (4, 5, 6):
        assert second[step] == pytest.approx(first[step], rel=1e-5, abs=1e-6)
