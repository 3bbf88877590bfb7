"""ELMo's backward LM: ``data.direction=backward`` reads every split's token stream in reverse.

The reversed stream is the exact reverse of the forward one (stream and shuffle batching); a short
backward pretrain learns; its state carries backwards through the text; the export records the
direction, and ``rnnpipe export FWD --out DIR --backward BWD`` puts a loadable backward export in
``DIR/backward`` (and refuses a pair that is not forward + backward with one tokenizer); the key
is in the run's identity without changing any earlier run's fingerprint.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import CLI, REPO, TINY_PRETRAIN, prepare, rnnpipe

from rnnpipe.pipeline.config import to_dict
from rnnpipe.pipeline.data.reader import ReversedReader, SplitReader, open_split
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.train.config import resume_changes, run_fingerprint, run_view
from rnnpipe.pipeline.train.data import IGNORE, ShuffleBatches, StreamBatches

CONFIG = REPO / "configs" / "pretrain" / "tiny-lrn.yaml"
T = 16  # segment length of the data tests


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A byte-level dataset of a small made-up text: train (several shards of several samples),
    valid and test."""
    root = tmp_path_factory.mktemp("bwd")
    words = str.split("the river stone winter garden of and to in a is that for it as was with be by on")
    rng = np.random.default_rng(0)

    def passage(n: int) -> str:
        return "".join(" ".join(rng.choice(words, 9)) + ".\n" for _ in range(n))

    for split, n in (("train", 300), ("valid", 20), ("test", 20)):
        (root / f"{split}.txt").write_text(passage(n))
    out = root / "data"
    assert (
        prepare(
            REPO / "configs/prepare/tinyshakespeare.yaml",
            out,
            f"source.paths=[{root}/train.txt]",
            f"source.valid_paths=[{root}/valid.txt]",
            f"source.test_paths=[{root}/test.txt]",
            "tokenizer.kind=bytes",
            "shards.sample_tokens=1000",
            "shards.samples_per_shard=3",
        )
        == 0
    )
    return out


# ----------------------------------------------------------------------------------- the stream


def _rows(loader: StreamBatches) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row of the loader's batches over one epoch: (its inputs, its targets), padding dropped."""
    ins: list[list[np.ndarray]] = [[] for _ in range(loader.batch)]
    outs: list[list[np.ndarray]] = [[] for _ in range(loader.batch)]
    for _ in range(loader.steps_per_epoch):
        b = next(loader)
        for r in range(loader.batch):
            keep = b.targets_BT[r].numpy() != IGNORE
            ins[r].append(b.inputs_BT[r].numpy()[keep])
            outs[r].append(b.targets_BT[r].numpy()[keep])
    return [(np.concatenate(i), np.concatenate(o)) for i, o in zip(ins, outs, strict=True)]


def test_the_backward_stream_is_the_exact_reverse_of_the_forward_one(data):
    fwd = SplitReader(str(data), "train")
    bwd = open_split(str(data), "train", direction="backward")
    assert isinstance(bwd, ReversedReader) and isinstance(open_split(str(data), "train"), SplitReader)
    n = fwd.tokens
    assert fwd.sample_count() > 6 and len(fwd.shard_samples()) > 2  # (several samples and shards)
    assert (bwd.tokens, bwd.bytes, bwd.split, bwd.manifest) == (n, fwd.bytes, "train", fwd.manifest)
    stream = fwd.read(0, n)
    np.testing.assert_array_equal(bwd.read(0, n), stream[::-1])
    for a, b in [(0, 1), (5, 1400), (n - 3, n), (999, 1001), (7, 7)]:  # across sample boundaries too
        np.testing.assert_array_equal(bwd.read(a, b), stream[::-1][a:b])
    with pytest.raises(IndexError):
        bwd.read(0, n + 1)

    # One stream: the backward inputs are the forward targets reversed, and the other way round.
    (f_in, f_out), (b_in, b_out) = (_rows(StreamBatches(r, 0, 1, 1, T))[0] for r in (fwd, bwd))
    np.testing.assert_array_equal(f_in, stream[:-1])
    np.testing.assert_array_equal(b_in, f_out[::-1])
    np.testing.assert_array_equal(b_out, f_in[::-1])
    # Several streams over two ranks: each row reads a contiguous piece of the reversed stream.
    rows = [row for rank in range(2) for row in _rows(StreamBatches(bwd, rank, 2, 3, T))]
    bounds = StreamBatches(bwd, 0, 2, 3, T).bounds
    for j, (inputs, targets) in enumerate(rows):
        a, b = int(bounds[j]), int(bounds[j + 1])
        np.testing.assert_array_equal(inputs, stream[::-1][a:b])
        np.testing.assert_array_equal(targets, stream[::-1][a + 1 : b + 1])
    assert sum(len(t) for _, t in rows) == n - 1  # every token but the first, once

    # A DataLoader worker gets it pickled.
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(bwd)).read(3, 50), bwd.read(3, 50))


def test_shuffle_windows_lie_inside_the_reversed_samples(data):
    fwd = SplitReader(str(data), "train")
    bwd = ReversedReader(fwd)
    count = fwd.sample_count()
    lengths = [fwd.sample_length(i) for i in range(count)]
    assert [bwd.sample_length(i) for i in range(count)] == lengths[::-1]
    groups = bwd.shard_samples()
    assert [len(g) for g in groups] == [len(g) for g in fwd.shard_samples()][::-1]
    assert [i for g in groups for i in g] == list(range(count))  # in order, each once
    starts = np.cumsum([0, *lengths])
    for i in range(count):  # reversed sample i is forward sample S - 1 - i, reversed
        j = count - 1 - i
        a = int(starts[-1] - starts[j + 1])
        np.testing.assert_array_equal(bwd.read(a, a + lengths[j]), fwd.read(starts[j], starts[j + 1])[::-1])
    loader = ShuffleBatches(bwd, 0, 1, 4, T, seed=3, workers=0)
    text = fwd.read(0, fwd.tokens).astype(np.uint8).tobytes()
    samples = [text[starts[k] : starts[k + 1]] for k in range(count)]
    for _ in range(5):
        batch = next(loader)
        for inputs, targets in zip(batch.inputs_BT.numpy(), batch.targets_BT.numpy(), strict=True):
            np.testing.assert_array_equal(inputs[1:], targets[:-1])
            window = np.concatenate([inputs, targets[-1:]])[::-1].astype(np.uint8).tobytes()
            assert any(window in s for s in samples)  # read forward, it is inside one sample


# ------------------------------------------------------------------------------------ the config


def _values(*overrides: str) -> dict:
    from rnnpipe.launch.stages.pretrain_job import PretrainJob, stage_config
    from rnnpipe.pipeline.config import load_config

    return to_dict(stage_config(load_config(PretrainJob, str(CONFIG), list(overrides))))


def test_the_direction_is_in_the_identity_and_leaves_earlier_runs_as_they_were():
    plain, forward, backward = (
        _values(*o) for o in ([], ["data.direction=forward"], ["data.direction=backward"])
    )
    assert plain["data"]["direction"] == "forward" and backward["data"]["direction"] == "backward"
    older = {**plain, "data": {k: v for k, v in plain["data"].items() if k != "direction"}}
    fp = run_fingerprint(plain, "d", 1)
    assert run_fingerprint(older, "d", 1) == run_fingerprint(forward, "d", 1) == fp
    assert run_fingerprint(backward, "d", 1) != fp
    assert resume_changes(run_view(older, "d", 1), run_view(plain, "d", 1)) == ({}, {})
    refused, _ = resume_changes(run_view(plain, "d", 1), run_view(backward, "d", 1))
    assert refused == {"data.direction": ("forward", "backward")}
    with pytest.raises(ConfigError, match=r"data\.direction"):
        _values("data.direction=sideways")


# -------------------------------------------------------------------------- training and export


TINY = [
    *TINY_PRETRAIN,
    "data.batch_size=4",
    "optim.lr=0.01",
    "train.steps=30",
    "train.checkpoint_every=0",
    "train.eval_batch_size=1",
    "train.sample_tokens=8",
    "train.zero_stage=0",
    "train.peak_tflops=1.0",
    "executor.kind=inline",
    "distributed.nproc=1",
]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """A forward and a backward run of the same tiny config on the dataset, side by side (one
    process each: DeepSpeed keeps its process groups for the life of a process)."""
    pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "RNNPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    procs = {}
    for direction in ("forward", "backward"):
        args = [f"run_dir={root / direction}", f"data.path={data}", f"data.direction={direction}", *TINY]
        cmd = [*CLI, "-q", "pretrain", str(CONFIG), *args]
        procs[direction] = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    for p in procs.values():
        err = p.communicate(timeout=600)[1]
        assert p.returncode == 0, err[-4000:]
    return {d: root / d for d in procs}


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [m["train/loss"] for m in map(json.loads, lines) if "train/loss" in m]


def test_a_backward_run_learns_and_its_export_says_backward(runs, data, tmp_path):
    from rnnpipe.pipeline.engine.rank import RankContext
    from rnnpipe.pipeline.models import load_pretrained
    from rnnpipe.pipeline.models.exported import backward_export, export_direction
    from rnnpipe.pipeline.train.dynamic_eval import evaluate_export
    from rnnpipe.pipeline.train.evaluate import evaluate
    from rnnpipe.pipeline.train.export import export

    losses = _losses(runs["backward"])
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses  # (from ln 256 = 5.5 nats)
    final = [json.loads(x) for x in (runs["backward"] / "metrics.jsonl").read_text().splitlines()]
    assert any("test/bpb" in m for m in final) and any("valid/bpb" in m for m in final)

    bwd = export(runs["backward"], tmp_path / "bwd")
    meta = json.loads((bwd / "config.json").read_text())
    meta["source"] = json.loads((bwd / "rnnpipe.json").read_text())["source"]  # the header's
    assert meta["source"]["direction"] == "backward" and export_direction(bwd) == "backward"
    assert export_direction(export(runs["forward"], tmp_path / "fwd")) == "forward"
    del meta["source"]["direction"]  # an export from before the key (and the header)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    assert export_direction(tmp_path / "old") == "forward"
    assert backward_export(tmp_path / "fwd") is None

    # The state carries backwards: the reversed text in two segments, the state carried, gives
    # the logits of one segment.
    model = load_pretrained(bwd)
    ids = torch.from_numpy(open_split(str(data), "valid", direction="backward").read(0, 150))[None]
    with torch.no_grad():
        whole, _ = model(ids)
        first, state = model(ids[:, :57])
        second, _ = model(ids[:, 57:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-5, atol=1e-5)
    # rnnpipe evaluate reads a backward export's split in reverse, as its run did.
    result = evaluate_export(bwd, split="valid", options=_static(), seq_len=32)
    reversed_valid = open_split(str(data), "valid", direction="backward")
    expected = evaluate(model, reversed_valid, RankContext.single(torch.device("cpu")), 1, 32)
    assert result == pytest.approx(expected, rel=1e-9)


def _static():
    from rnnpipe.pipeline.train.config import EvalConfig

    return EvalConfig(dynamic=False)


def test_the_export_keeps_both_directions_and_refuses_a_mismatched_pair(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    from rnnpipe.pipeline.models import load_pretrained
    from rnnpipe.pipeline.models.exported import backward_export, export_direction
    from rnnpipe.pipeline.models.pretrained import model_from_state
    from rnnpipe.pipeline.train.export import consolidate, export

    fwd, bwd = runs["forward"], runs["backward"]
    plain = export(fwd, tmp_path / "plain")
    out = tmp_path / "elmo"
    assert rnnpipe("-q", "export", fwd, "--out", out, "--backward", bwd) == 0
    # The forward export's own files: as without --backward (the same weights, the same config
    # but for when it was made).
    assert {p.name for p in out.iterdir()} == {p.name for p in plain.iterdir()} | {"backward"}
    assert (out / "model.safetensors").read_bytes() == (plain / "model.safetensors").read_bytes()
    a, b = (
        {n: json.loads((d / n).read_text()) for n in ("config.json", "rnnpipe.json")} for d in (out, plain)
    )
    for m in (a, b):
        del m["rnnpipe.json"]["source"]["exported_by"], m["rnnpipe.json"]["source"]["weights_mtime_ns"]
    assert a == b and export_direction(out) == "forward"
    # DIR/backward: a complete export of the backward run's latest checkpoint.
    assert backward_export(out) == str(out / "backward") and export_direction(out / "backward") == "backward"
    model = load_pretrained(out / "backward")
    c = consolidate(bwd)
    trained = model_from_state(c.config["model"], c.tokenizer["vocab_size"], c.state, "test").eval()
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], trained(ids)[0], rtol=0, atol=0)
    assert set(load_file(str(out / "backward" / "model.safetensors"))) == set(
        load_file(str(out / "model.safetensors"))
    )

    # --backward takes a backward export too (copied as it is).
    bwd_export = export(bwd, tmp_path / "bwd-export")
    assert rnnpipe("-q", "export", fwd, tmp_path / "elmo2", "--backward", bwd_export) == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "elmo2" / "backward" / name).read_bytes() == (bwd_export / name).read_bytes()
    capsys.readouterr()

    # Refused, naming the path and the direction, before anything is written.
    for first, second, named in [(fwd, fwd, fwd), (bwd, bwd, bwd), (fwd, plain, plain)]:
        assert rnnpipe("-q", "export", first, "--out", tmp_path / "no", "--backward", second) == 2
        err = capsys.readouterr().err
        assert "data.direction" in err and str(named) in err, err
        assert not (tmp_path / "no").exists()
    # ... and a backward LM with another tokenizer.
    other = tmp_path / "other"
    shutil.copytree(bwd_export, other)
    meta = json.loads((other / "config.json").read_text())
    meta["tokenizer"] = {**meta["tokenizer"], "kind": "char", "vocab_size": 70}
    (other / "config.json").write_text(json.dumps(meta))
    assert rnnpipe("-q", "export", fwd, "--out", tmp_path / "no", "--backward", other) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and str(other) in err, err
    assert rnnpipe("-q", "export", fwd, "--backward", bwd) == 2  # no output directory
