"""kill -9 mid-way, re-run: the same bytes. verify catches damage."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from harness import CLI, REPO, prepare, rnnpipe

CONFIG = REPO / "configs" / "prepare" / "enwik8-head.yaml"
# Many small units and shards, so that a kill lands in the middle of a stage.
ARGS = ["source.unit_mb=0.05", "shards.sample_tokens=4096", "shards.samples_per_shard=2", "keep_work=false"]


def shard_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.glob("*/*.tar"))
    }


def prepare_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        *CLI,
        "prepare",
        str(CONFIG),
        f"output={out}",
        f"source.paths=[{src}]",
        *ARGS,
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, enwik8_head):
    out = tmp_path_factory.mktemp("ref") / "data"
    subprocess.run(
        prepare_cmd(enwik8_head, out, "--executor", "inline"),
        check=True,
        capture_output=True,
        env={**os.environ, "RNNPIPE_PROGRESS": "0"},
    )
    return shard_hashes(out)


@pytest.mark.parametrize("kill_when", ["encode", "pack"])
def test_kill_9_then_rerun_gives_identical_shards(tmp_path, enwik8_head, reference, kill_when):
    out = tmp_path / "data"
    env = {**os.environ, "RNNPIPE_PROGRESS": "0"}
    proc = subprocess.Popen(
        prepare_cmd(enwik8_head, out, "executor.workers=2"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def reached() -> bool:
        if kill_when == "encode":
            return len(list((out / ".work" / "units").glob("*/encode.json"))) >= 3
        return len(list(out.glob("train/*.tar"))) >= 5

    deadline = time.time() + 120
    while not reached():
        assert proc.poll() is None, "prepare finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert not (out / ".work" / "layout.json").exists() or kill_when == "pack"
    # Whatever was being written is under a .partial name, never a final one.
    assert all(p.name.endswith(".tar") for p in out.glob("*/*.tar"))
    done = len(shard_hashes(out))
    assert done < len(reference)

    rerun = subprocess.run(
        prepare_cmd(enwik8_head, out, "executor.workers=2"), env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    assert shard_hashes(out) == reference
    assert not list(out.rglob("*.partial"))
    assert rnnpipe("verify", out) == 0


def test_verify_catches_a_truncated_shard(tmp_path, enwik8_head, capsys):
    out = tmp_path / "data"
    assert prepare(CONFIG, out, f"source.paths=[{enwik8_head}]", *ARGS) == 0
    shard = out / "train" / "train-000003.tar"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    assert rnnpipe("verify", out) == 1
    err = capsys.readouterr().err
    assert f"train/train-000003.tar: {size // 2} bytes, the manifest says {size} (truncated)" in err
    assert "train/train-000003.tar: sha256" in err
    assert "truncated or corrupt" in err or "holds 1 samples" in err
    assert "train-000002" not in err and "train-000004" not in err  # only the damaged one is named
    # A damaged shard is rebuilt by running prepare again.
    assert prepare(CONFIG, out, f"source.paths=[{enwik8_head}]", *ARGS) == 0
    assert rnnpipe("verify", out) == 0
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"][3]["size"] == size


def test_kill_after_fitting_reuses_the_tokenizer(tmp_path, shakespeare):
    """Training sentencepiece can take long: a re-run after a kill must not train it again."""
    config = REPO / "configs" / "prepare" / "tinyshakespeare.yaml"
    args = [
        f"source.paths=[{shakespeare}]",
        "tokenizer.kind=sentencepiece",
        "tokenizer.vocab_size=500",
        "source.unit_mb=0.02",
        "shards.sample_tokens=2048",
        "shards.samples_per_shard=2",
    ]
    env = {**os.environ, "RNNPIPE_PROGRESS": "0"}
    ref, out = tmp_path / "ref", tmp_path / "out"
    base = [*CLI, "prepare", str(config)]
    subprocess.run(
        [*base, f"output={ref}", *args, "--executor", "inline"], check=True, env=env, capture_output=True
    )
    proc = subprocess.Popen(
        [*base, f"output={out}", *args, "executor.workers=2"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not (out / ".work" / "tokenizer" / "fit.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run([*base, f"output={out}", *args], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "reusing the one fitted by an earlier run (tokenizer/spm.model)" in rerun.stderr
    assert shard_hashes(out) == shard_hashes(ref)
    assert (out / "tokenizer" / "spm.model").read_bytes() == (ref / "tokenizer" / "spm.model").read_bytes()
