"""model.kind=huggingface through the pretrain stage on CPU: a tiny GPT-2 with added recurrence.

Two ranks under ZeRO-2 (memory_tokens) and ZeRO-3 (recurrent_summary): the loss falls, a run
killed with -9 after a checkpoint resumes to the losses of an uninterrupted one, and the export
loads (``load_pretrained``) with the training model's logits. One rank: ``model.freeze=backbone``
trains the recurrence only; fine-tuning takes the export; the run's identity follows the
backbone's content (a changed backbone is no longer complete, and its checkpoint is refused).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from harness import CLI, REPO, data_file, prepare, rnnpipe

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 4, "n_positions": 128}
# seq_len 24 over segments of 16: a training call ends mid-segment, so the carried state holds a
# partial segment's cache as well as the variant's memory.
BASE = {
    "data": {"mode": "stream", "seq_len": 24, "batch_size": 2},
    "model": {
        "kind": "huggingface",
        "hf": {"init": "random", "model_type": "gpt2", "config": GPT2},
        "recurrence": {"kind": "memory_tokens", "segment_len": 16, "memory": 4, "bptt_segments": 2},
    },
    "optim": {"lr": 3.0e-3, "warmup_steps": 2, "weight_decay": 0.01},
    "train": {
        "steps": 16,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint_every": 8,
        "eval_batch_size": 2,
        "eval_max_tokens": 2000,
        "sample_tokens": 8,
        "peak_tflops": 1.0,  # (for MFU; else each rank times a CPU matmul first)
    },
    "executor": {"kind": "inline"},
    "distributed": {"nproc": 1},
}


def merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, run_dir: Path, data: Path, **over: dict) -> Path:
    cfg = merged(BASE, {"run_dir": str(run_dir), "data": {"path": str(data)}, **over})
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """enwik8's first 100 kB as bytes: 98 kB to train on, 1 kB each to evaluate (quickly)."""
    src = data_file("enwik8-head/enwik8-head.txt")
    out = tmp_path_factory.mktemp("data") / "enwik8"
    args = [
        "source.limit_bytes=100000",
        "source.valid_fraction=0.01",
        "source.test_fraction=0.01",
        "shards.sample_tokens=4096",
        "shards.samples_per_shard=8",
    ]
    assert prepare(REPO / "configs/prepare/enwik8-head.yaml", out, f"source.paths=[{src}]", *args) == 0
    return out


def save_gpt2(path: Path, seed: int) -> Path:
    """A tiny GPT-2 as transformers saves it (config.json, model.safetensors), 256 byte ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(vocab_size=256, **GPT2)).save_pretrained(path)
    return path


# --------------------------------------------------------------------------- two ranks, ZeRO-2/3


def start_ranks(config: Path, logits: Path, **env: str) -> list[subprocess.Popen]:
    """The two ranks of a run (tests/helpers_pretrain.py: it also saves the trained model's logits)."""
    from rnnpipe.launch.processes.distributed import free_port

    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, str(REPO / "tests/helpers_pretrain.py"), str(config), str(logits)],
            env={
                **os.environ,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
                "DS_ACCELERATOR": "cpu",
                "RNNPIPE_PROGRESS": "0",
                **env,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for r in range(2)
    ]


def finish(procs: list[subprocess.Popen]) -> None:
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-4000:] + logs[1][-2000:]


VARIANTS = {
    2: {"kind": "memory_tokens"},
    3: {"kind": "recurrent_summary", "cell": "lrn"},
}


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_learn_resume_exactly_after_kill_9_and_export_the_training_model(stage, dataset, tmp_path):
    from helpers_pretrain import fixed_tokens

    from rnnpipe.pipeline.models import load_pretrained
    from rnnpipe.pipeline.train.export import export

    over = {"model": {"recurrence": VARIANTS[stage]}, "train": {"zero_stage": stage}}
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref_cfg = write_config(tmp_path / "ref.yaml", ref, dataset, **over)
    cut_cfg = write_config(tmp_path / "cut.yaml", cut, dataset, **over)

    # the run killed with -9 after its checkpoint at step 8, and the uninterrupted one meanwhile
    killed = start_ranks(cut_cfg, tmp_path / "unused.pt", RNNPIPE_TEST_STEP_DELAY="0.3")
    uninterrupted = start_ranks(ref_cfg, tmp_path / "ref.pt")
    try:
        deadline = time.time() + 300
        while not (cut / "checkpoints/step00000008/COMPLETE").exists():
            assert all(p.poll() is None for p in killed), "the run ended before its checkpoint at step 8"
            assert time.time() < deadline, "timed out waiting for the checkpoint at step 8"
            time.sleep(0.05)
        for p in killed:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
        assert 8 <= max(losses(cut)) < 16
        finish(uninterrupted)
    finally:  # (a failed wait leaves no rank behind)
        for p in killed + uninterrupted:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    finish(start_ranks(cut_cfg, tmp_path / "cut.pt"))  # resumes from step 8

    a, b = losses(ref), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 17))  # no step twice in metrics.jsonl
    first, last = sum(a[s] for s in range(1, 5)) / 4, sum(a[s] for s in range(13, 17)) / 4
    assert last < first - 0.5, a  # it learns (from about 5.5 to 4.8 nats)
    for step in range(9, 17):
        assert a[step] == b[step], (step, a[step], b[step])  # bit for bit
    final = [m for m in metrics(cut) if "valid/bpb" in m]
    assert len(final) == 1 and 0 < final[0]["valid/bpb"] < 7.5  # below 8, a uniform guess
    trained = torch.load(tmp_path / "cut.pt")
    torch.testing.assert_close(trained, torch.load(tmp_path / "ref.pt"), rtol=0, atol=0)

    out = export(cut, tmp_path / "export")
    meta = json.loads((out / "config.json").read_text())
    source = json.loads((out / "rnnpipe.json").read_text())["source"]  # the export's header
    assert source["step"] == 16 and meta["model"]["kind"] == "huggingface"
    assert meta["model"]["recurrence"]["kind"] == VARIANTS[stage]["kind"]
    assert meta["hf_backbone"]["n_layer"] == 2 and meta["hf_backbone"]["n_embd"] == 32
    model = load_pretrained(out)
    assert type(model).__name__ == "AddedRecurrenceLM" and not model.training
    with torch.no_grad():
        logits, _ = model(fixed_tokens(model.vocab_size))
    assert logits.shape == (2, 17, 256)
    torch.testing.assert_close(logits, trained, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------- one rank, a backbone


@pytest.fixture(scope="module")
def frozen(tmp_path_factory, dataset) -> dict[str, Path]:
    """A 1-rank run (exported) of a recurrent summary on a saved tiny GPT-2, ``model.freeze=backbone``."""
    root = tmp_path_factory.mktemp("frozen")
    backbone = save_gpt2(root / "gpt2", seed=1)
    hf = {"path": str(backbone), "init": "pretrained", "model_type": "", "config": {}}
    model = {"hf": hf, "freeze": "backbone", "recurrence": {"kind": "recurrent_summary", "cell": "mingru"}}
    over = {"model": model, "train": {"steps": 8, "sample_tokens": 0}}
    config = write_config(root / "frozen.yaml", root / "run", dataset, **over)
    done = subprocess.run(
        [*CLI, "pretrain", str(config), "--export"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RNNPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return {"backbone": backbone, "config": config, "run": root / "run", "export": root / "run" / "export"}


def test_a_frozen_backbone_keeps_its_weights_and_the_recurrence_trains(frozen):
    from safetensors.torch import load_file

    from rnnpipe.launch.stages.pretrain_job import PretrainJob, stage_config
    from rnnpipe.pipeline.config import load_config
    from rnnpipe.pipeline.models.backbone import build_model

    exported = load_file(str(frozen["export"] / "model.safetensors"))
    initial = load_file(str(frozen["backbone"] / "model.safetensors"))
    assert len(initial) >= 10
    for name, value in initial.items():
        assert torch.equal(exported[f"backbone.{name}"], value), name  # bit for bit
    added = {k for k in exported if not k.startswith("backbone.")}
    assert set(exported) - added == {f"backbone.{n}" for n in initial}
    assert {k.split(".")[0] for k in added} == {"cell_in", "cell", "summary_out"}
    # what the run started from: the same seed, the same build
    torch.manual_seed(0)
    start = build_model(stage_config(load_config(PretrainJob, str(frozen["config"]))).model, 256)
    start = start.state_dict()
    for name in added:  # every parameter of the recurrence trained (at lr 3e-3 for 8 steps)
        moved = (exported[name] - start[name]).abs().max().item()
        assert moved > 1e-4, (name, moved)
    for name, value in initial.items():  # (and the build above is the run's start)
        assert torch.equal(start[f"backbone.{name}"], value), name
    norms = [m["train/grad_norm"] for m in metrics(frozen["run"]) if "train/grad_norm" in m]
    assert len(norms) == 8 and all(0 < n < 100 for n in norms)


def test_finetuning_takes_a_huggingface_kind_export(frozen, tmp_path, capsys):
    from rnnpipe.launch.cli import main

    sst2 = data_file("sst2")
    sweep = {
        "out_dir": str(tmp_path / "sweep"),
        "pretrained": str(frozen["export"]),
        "tasks": {
            "sst2": {
                "kind": "classification",
                "train": f"{sst2}/train.tsv",
                "dev": f"{sst2}/dev.tsv",
                "max_train": 24,
                "max_dev": 16,
            }
        },
        "job": {
            "max_steps": 3,
            "eval_every": 3,
            "batch_size": 8,
            "max_len": 40,
            "optim": {"warmup_steps": 1},
            "save_model": True,
        },
        "grid": {"task": ["sst2"], "init": ["pretrained", "scratch"]},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(sweep))
    assert main(["-q", "finetune", str(path), "--executor", "inline"]) == 0, capsys.readouterr().err
    for init in ("pretrained", "scratch"):
        r = json.loads((tmp_path / "sweep" / "jobs" / f"sst2-{init}" / "result.json").read_text())
        assert r["steps"] == 3 and 0 <= r["dev"][r["metric"]] <= 100, r
    sha = json.loads((frozen["export"] / "rnnpipe.json").read_text())["source"]["weights_sha256"]
    assert r["backbone"]["sha256"] == sha
    # the pretraining's model.freeze=backbone is not the fine-tuning's: its backbone trains too
    from safetensors.torch import load_file

    exported = load_file(str(frozen["export"] / "model.safetensors"))
    tuned = torch.load(tmp_path / "sweep/jobs/sst2-pretrained/model.pt", weights_only=True)
    name = "backbone.transformer.h.0.attn.c_attn.weight"
    assert tuned[f"backbone.{name}"].shape == exported[name].shape
    assert not torch.equal(tuned[f"backbone.{name}"], exported[name])


def test_the_identity_follows_the_backbones_content(frozen, tmp_path, capsys):
    from rnnpipe.launch.stages.pretrain import PretrainJob, is_complete, plan
    from rnnpipe.pipeline.config import load_config
    from rnnpipe.pipeline.errors import ConfigError
    from rnnpipe.pipeline.models.backbone import backbone_source
    from rnnpipe.pipeline.models.config import HFBackboneConfig

    def job(*overrides: str) -> PretrainJob:
        return load_config(PretrainJob, str(frozen["config"]), list(overrides))

    assert is_complete(job())
    decision = plan(job())
    assert not decision.run and decision.reason.startswith("complete: the export is step 8")
    stamp = (frozen["export"] / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert rnnpipe("pretrain", frozen["config"], "--export") == 0  # skipped: nothing trains
    assert "pretrain: complete: the export is step 8" in capsys.readouterr().out
    assert (frozen["export"] / "model.safetensors").stat().st_mtime_ns == stamp  # nor exports again

    weights = frozen["backbone"] / "model.safetensors"
    kept = weights.read_bytes()
    try:
        save_gpt2(frozen["backbone"], seed=2)  # the same architecture, other weights
        assert weights.read_bytes() != kept
        assert not is_complete(job())
        with pytest.raises(ConfigError, match="cannot be resumed with this config: backbone: "):
            plan(job())
        capsys.readouterr()
        assert rnnpipe("pretrain", frozen["config"]) == 2  # refused before any rank starts
        assert "backbone" in capsys.readouterr().err
        replace = plan(job("overwrite=true"))
        assert replace.run and replace.clear
    finally:
        weights.write_bytes(kept)
    assert is_complete(job())  # the same content again: the same run

    # an export as the backbone: its weights' sha256 (recorded, or computed again once changed)
    export = tmp_path / "export"
    shutil.copytree(frozen["export"], export)
    recorded = json.loads((export / "rnnpipe.json").read_text())["source"]["weights_sha256"]
    source = HFBackboneConfig(path=str(export))
    assert backbone_source(source)["sha256"] == recorded
    from safetensors.torch import load_file, save_file

    state = load_file(str(export / "model.safetensors"))
    state["backbone.transformer.wpe.weight"] = state["backbone.transformer.wpe.weight"] + 1.0
    save_file(state, str(export / "model.safetensors"), metadata={"format": "pt"})
    assert backbone_source(source)["sha256"] not in ("", recorded)


def test_a_frozen_backbone_with_memory_tokens_needs_windows_that_start_from_the_memory(tmp_path):
    """RMT's one parameter is its first memory: stream mode carries the memory, cut from the graph,
    from one step to the next, so no later step's loss would reach a trainable parameter."""
    from rnnpipe.pipeline.config import load_config
    from rnnpipe.pipeline.errors import ConfigError
    from rnnpipe.pipeline.models.backbone import build_model
    from rnnpipe.pipeline.models.mixers import detach_state
    from rnnpipe.pipeline.train.config import PretrainConfig

    args = [
        f"run_dir={tmp_path / 'run'}",
        f"data.path={tmp_path / 'data'}",
        "data.seq_len=24",
        "model.kind=huggingface",
        "model.hf.init=random",
        "model.hf.model_type=gpt2",
        "model.hf.config={n_layer: 2, n_embd: 32, n_head: 4, n_positions: 128}",
        "model.recurrence.kind=memory_tokens",
        "model.recurrence.segment_len=16",
        "model.recurrence.memory=4",
        "model.freeze=backbone",
    ]
    with pytest.raises(ConfigError, match=r"use data\.mode=shuffle"):
        load_config(PretrainConfig, None, args)
    for ok in ("data.mode=shuffle", "model.freeze=embeddings", "model.recurrence.kind=recurrent_summary"):
        load_config(PretrainConfig, None, [*args, ok])
    model = build_model(load_config(PretrainConfig, None, [*args, "data.mode=shuffle"]).model, 256)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["memory_init"]
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    logits, state = model(tokens)  # a window from the start: it reads the learned memory
    assert logits.grad_fn is not None
    logits, _ = model(tokens, detach_state(state))  # the next window of a stream: nothing to train
    assert logits.grad_fn is None


def test_prepare_and_pretrain_gpt2_recurrence_from_the_command_line(enwik8_head, tmp_path):
    """The issue's command pair on a tiny GPT-2 saved with save_pretrained beside its tokenizer:
    ``rnnpipe prepare ... tokenizer.kind=huggingface tokenizer.path=DIR``, then ``rnnpipe pretrain
    configs/pretrain/gpt2-recurrence.yaml model.hf.path=DIR data.path=...`` trains a few steps
    (bf16, ZeRO-1, RMT memory, as the config says) and exports a model whose vocabulary is the
    tokenizer's."""
    transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    model_dir = tmp_path / "tiny-gpt2"
    from harness import import_test_module

    hf_tokenizer_tests = import_test_module("unit/models/test_hf_tokenizer")
    ENWIK8, EOS, _byte_level = (
        hf_tokenizer_tests.ENWIK8,
        hf_tokenizer_tests.EOS,
        hf_tokenizer_tests._byte_level,
    )

    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_byte_level(), eos_token=EOS)
    tok.save_pretrained(model_dir)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=len(tok), eos_token_id=tok.eos_token_id
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    data = tmp_path / "data"
    assert (
        prepare(
            ENWIK8,
            data,
            f"source.paths=[{enwik8_head}]",
            "source.limit_bytes=60000",
            "source.unit_mb=0.02",
            "shards.sample_tokens=2000",
            "tokenizer.kind=huggingface",
            f"tokenizer.path={model_dir}",
        )
        == 0
    )
    run = tmp_path / "run"
    status = rnnpipe(
        "pretrain",
        REPO / "configs" / "pretrain" / "gpt2-recurrence.yaml",
        f"model.hf.path={model_dir}",
        f"data.path={data}",
        f"run_dir={run}",
        "data.seq_len=32",
        "data.batch_size=2",
        "model.recurrence.segment_len=16",
        "model.recurrence.memory=4",
        "train.steps=3",
        "train.log_every=1",
        "train.eval_max_tokens=256",
        "train.eval_batch_size=1",
        "train.sample_tokens=0",
        "distributed.gpus_per_node=0",
        "--executor",
        "local",
        "--wait",
        "--export",
    )
    assert status == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x["train/loss"] for x in lines if "train/loss" in x]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    meta = json.loads((run / "export" / "config.json").read_text())
    assert meta["vocab_size"] == len(tok) and meta["model"]["recurrence"]["kind"] == "memory_tokens"
    assert meta["hf_backbone"]["n_layer"] == 2 and meta["tokenizer"]["kind"] == "huggingface"
