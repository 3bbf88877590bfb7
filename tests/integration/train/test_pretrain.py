"""The pretrain stage on CPU: DeepSpeed over two processes, exact resume, preemption, export."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import CLI, REPO, data_file, prepare

from rnnpipe.launch.processes.distributed import detect, first_host
from rnnpipe.pipeline.data.reader import SplitReader
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.train.config import PretrainConfig, deepspeed_config
from rnnpipe.pipeline.train.data import IGNORE, ShuffleBatches, StreamBatches

pytest.importorskip("deepspeed")
CONFIG = REPO / "configs" / "pretrain" / "tiny-lrn.yaml"
TINY = [
    "model.n_layers=2",
    "model.d_model=32",
    "model.mlp_ratio=2.0",
    "data.seq_len=32",
    "data.batch_size=2",
    "train.eval_batch_size=2",
    "train.eval_max_tokens=4000",
    "eval.max_tokens=4000",  # the final evaluation too: the whole of valid and test takes minutes
    "train.sample_tokens=20",
    "optim.warmup_steps=2",
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    src = data_file("enwik8-head/enwik8-head.txt")
    out = tmp_path_factory.mktemp("data") / "enwik8"
    assert (
        prepare(
            REPO / "configs/prepare/enwik8-head.yaml",
            out,
            f"source.paths=[{src}]",
            "shards.sample_tokens=4096",
            "shards.samples_per_shard=16",
        )
        == 0
    )
    return out


def pretrain_cmd(run_dir: Path, data: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [
        *CLI,
        "pretrain",
        str(CONFIG),
        f"run_dir={run_dir}",
        f"data.path={data}",
        f"distributed.nproc={nproc}",
        "executor.kind=local",
        *TINY,
        *overrides,
    ]


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "RNNPIPE_PROGRESS": "0", **env}
    )


# What DeepSpeed's own output looks like (its logger's format, its prints): none of it on the console
# unless -v (tests/unit/launch/test_console.py checks the -v side).
DEEPSPEED_LINES = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[|\[(INFO|WARNING)\]|DeepSpeed|built successfully", re.M
)


def assert_quiet_console(done: subprocess.CompletedProcess) -> None:
    """No line of DeepSpeed's in what a launch printed."""
    for name, text in (("stdout", done.stdout), ("stderr", done.stderr)):
        found = DEEPSPEED_LINES.search(text)
        assert found is None, f"{name}: {text[max(0, found.start() - 200) : found.end() + 200]}"


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def signalled(cmd: list[str], until, what: str, **env: str) -> str:
    """Start a run, send it SIGUSR2 once ``until()`` holds, expect the requeue status; its stderr."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
    )
    wait_for(until, proc, what)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    return err


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------- pure logic


class _Tokens:
    def __init__(self, n: int):
        self.tokens = n

    def read(self, a: int, b: int) -> np.ndarray:
        return np.arange(a, b, dtype=np.int64)


@pytest.mark.parametrize(("n", "world", "batch", "seq"), [(1000, 3, 2, 7), (97, 2, 3, 40), (64, 1, 1, 64)])
def test_stream_mode_sees_every_training_token_once_per_epoch(n, world, batch, seq):
    seen = np.zeros(n, dtype=np.int64)
    owner = np.full(n, -1)
    for rank in range(world):
        streams = StreamBatches(_Tokens(n), rank, world, batch, seq)
        for step in range(streams.steps_per_epoch):
            b = next(streams)
            assert b.reset == (step == 0)
            targets = b.targets_BT[b.targets_BT != IGNORE].numpy()
            inputs = b.inputs_BT[b.targets_BT != IGNORE].numpy()
            assert (targets == inputs + 1).all()  # the next token of the same stream
            seen[targets] += 1
            assert ((owner[targets] == -1) | (owner[targets] == rank)).all()
            owner[targets] = rank
        assert (streams.epoch, streams.step_in_epoch) == (1, 0)
    assert seen[0] == 0 and (seen[1:] == 1).all()  # token 0 is never a target: nothing precedes it


def test_slurm_environment_gives_rank_and_master():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08,11]",
    }
    d = detect(env)
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.source) == (5, 1, 8, "gpu07", "slurm")
    assert d.master_port == detect({**env, "SLURM_PROCID": "0"}).master_port
    assert first_host("node1,node2") == "node1" and first_host("a-b[003-9]") == "a-b003"
    assert detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1234"}).source == "torchrun"
    assert detect({}).source == "single"


def test_deepspeed_config_is_derived_and_can_be_overridden():
    cfg = PretrainConfig(run_dir="/r")
    cfg.optim.grad_clip = 0.0
    cfg.deepspeed = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "steps_per_print": 10}
    ds = deepspeed_config(cfg, on_gpu=False)
    assert ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed would otherwise clip at 1.0
    assert ds["zero_optimization"] == {"stage": 0, "offload_optimizer": {"device": "cpu"}}
    assert ds["steps_per_print"] == 10 and ds["optimizer"]["params"]["torch_adam"] is True
    assert "fused" not in ds["optimizer"]["params"]
    # On a GPU, torch's fused AdamW (DeepSpeed's own FusedAdam would compile an extension).
    gpu = deepspeed_config(cfg, on_gpu=True)["optimizer"]["params"]
    assert gpu["torch_adam"] is True and gpu["fused"] is True


# ------------------------------------------------------------------------ real runs (DeepSpeed)


def test_shuffle_mode_refuses_more_ranks_times_workers_than_shards(dataset):
    """A rank or worker dealt no shard would wait forever in the first collective: refuse up front."""
    reader = SplitReader(str(dataset), "train")
    n = len(reader.shard_samples())
    ShuffleBatches(reader, 0, n // 2, 2, 32, 0, 2)  # exactly enough: fine
    with pytest.raises(PipelineError, match=rf"{n} shard\(s\), fewer than {n // 2 + 1} rank\(s\) × 2 worker"):
        ShuffleBatches(reader, 0, n // 2 + 1, 2, 32, 0, 2)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_ranks_train_and_export_matches_the_training_model(stage, dataset, tmp_path, monkeypatch):
    from helpers_pretrain import fixed_tokens

    from rnnpipe.launch.processes.distributed import free_port
    from rnnpipe.pipeline.models import load_pretrained

    run_dir = tmp_path / "run"
    overrides = [
        f"run_dir={run_dir}",
        f"data.path={dataset}",
        f"train.zero_stage={stage}",
        "train.steps=30",
        "train.log_every=5",
        "train.eval_every=15",
        "train.checkpoint_every=15",
        *TINY,
    ]
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests/helpers_pretrain.py"),
                str(CONFIG),
                str(tmp_path / "logits.pt"),
                *overrides,
            ],
            env={
                **os.environ,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs[0][-4000:]

    train_losses = losses(run_dir)
    assert sorted(train_losses) == [5, 10, 15, 20, 25, 30]
    assert train_losses[30] < train_losses[5] - 0.5  # it learns
    final = [m for m in metrics(run_dir) if "valid/bpb" in m]
    assert len(final) == 2 and all(0 < m["valid/bpb"] < 8 for m in final)
    assert any("test/bpb" in m for m in metrics(run_dir))
    norms = [m["train/grad_norm"] for m in metrics(run_dir) if "train/grad_norm" in m]
    assert len(norms) == 6 and all(0 < n < 100 for n in norms)

    export = tmp_path / "export"
    done = run([*CLI, "export", str(run_dir), str(export)])
    assert done.returncode == 0, done.stderr[-3000:]
    model = load_pretrained(export)
    with torch.no_grad():
        logits, _ = model(fixed_tokens(model.vocab_size))
    torch.testing.assert_close(logits, torch.load(tmp_path / "logits.pt"), rtol=1e-5, atol=1e-5)
    meta = json.loads((export / "config.json").read_text())
    assert meta["vocab_size"] == 256
    assert json.loads((export / "rnnpipe.json").read_text())["source"]["step"] == 30  # the header
    # the same directory in transformers (no network), with the training model's logits
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))
    hf = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(fixed_tokens(model.vocab_size)).logits, logits, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["stream", "shuffle"])
def test_resume_after_kill_9_gives_the_same_losses(mode, dataset, tmp_path):
    common = [
        f"data.mode={mode}",
        "train.steps=16",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=8",
        "model.dropout=0.1",
        "data.workers=1",
    ]  # dropout: RNG state matters
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    done = run(pretrain_cmd(ref, dataset, *common))
    assert done.returncode == 0, done.stderr[-3000:]
    # The console: rnnpipe's lines and the summary, nothing of DeepSpeed's.
    assert_quiet_console(done)
    assert "pretrain done: step 16/16, 2,048 tokens seen, wall time" in done.stdout, done.stdout
    assert (
        "best valid" in done.stdout and f"curves: tensorboard --logdir {ref / 'tensorboard'}" in done.stdout
    )

    proc = subprocess.Popen(
        pretrain_cmd(cut, dataset, *common),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RNNPIPE_TEST_STEP_DELAY": "0.3"},
    )
    wait_for(lambda: (cut / "checkpoints/step00000008/COMPLETE").exists(), proc, "the checkpoint at step 8")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(losses(cut)) < 16

    resumed = run(pretrain_cmd(cut, dataset, *common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step00000008" in resumed.stderr
    assert "pretrain done: step 16/16 (8 this launch, resumed from step 8)" in resumed.stdout, resumed.stdout
    assert_quiet_console(resumed)
    a, b = losses(ref), losses(cut)
    assert sorted(b) == list(range(1, 17))  # no step twice in metrics.jsonl
    for step in range(9, 17):
        assert a[step] == b[step], (step, a[step], b[step])  # bit for bit
    assert all(m["train/grad_norm"] > 0 for m in metrics(cut) if "train/grad_norm" in m)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cut / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/bpb",
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/tokens_seen",
        "train/step_time_s",
        "train/mfu",
        "train/memory_gb",
        "valid/loss",
        "valid/bpb",
        "valid/ppl",
    }
    assert expected <= tags, expected - tags
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, 17))  # purged past the checkpoint: no overlap
    assert [e.value for e in events.Scalars("train/loss")][8:] == pytest.approx([b[s] for s in range(9, 17)])
    assert "valid/sample/text_summary" in events.Tags()["tensors"]  # the generated text


def test_sigusr2_checkpoints_and_exits_to_be_requeued(dataset, tmp_path):
    run_dir = tmp_path / "run"
    cmd = pretrain_cmd(
        run_dir,
        dataset,
        "train.steps=40",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=0",
    )
    err = signalled(
        cmd,
        lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 5,
        "step 5",
        RNNPIPE_TEST_STEP_DELAY="0.2",
    )
    assert "checkpointed on a signal" in err
    latest = (run_dir / "checkpoints/latest").read_text()
    stopped = int(latest.removeprefix("step"))
    assert 5 <= stopped < 40
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(losses(run_dir)) == list(range(1, 41))


def test_a_signal_during_the_final_evaluation_requeues_and_the_rerun_evaluates(dataset, tmp_path):
    """The last checkpoint is written before the final evaluation: a signal then must not leave the
    job to run into its time limit, but exit to be requeued; the rerun only evaluates."""
    run_dir = tmp_path / "run"
    cmd = pretrain_cmd(run_dir, dataset, "train.steps=6", "train.log_every=1", "train.eval_every=0")

    def in_final_evaluation() -> bool:
        if not (run_dir / "checkpoints/step00000006/COMPLETE").exists():
            return False
        time.sleep(1.0)  # into the final evaluation of valid (hundreds of batches at 0.05 s)
        return True

    err = signalled(cmd, in_final_evaluation, "the last checkpoint", RNNPIPE_TEST_EVAL_DELAY="0.05")
    assert "during the final evaluation: exiting to be requeued" in err
    assert not [m for m in metrics(run_dir) if "valid/loss" in m]  # nothing half-reported
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step00000006" in again.stderr
    finals = [m for m in metrics(run_dir) if "valid/loss" in m or "test/loss" in m]
    assert [(m["step"], "valid/loss" in m) for m in finals] == [(6, True), (6, False)]  # once each
    assert sorted(losses(run_dir)) == list(range(1, 7))


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(dataset, tmp_path):
    run_dir = tmp_path / "run"
    cmd = pretrain_cmd(
        run_dir,
        dataset,
        "train.steps=12",
        "train.log_every=1",
        "train.eval_every=0",
        "train.checkpoint_every=4",
    )
    proc = subprocess.Popen(
        cmd,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RNNPIPE_TEST_CHECKPOINT_DELAY": "2"},
    )
    writing = run_dir / "checkpoints/step00000008"
    wait_for(lambda: (writing / "rank00001.pt").exists(), proc, "the write of step 8")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (writing / "COMPLETE").exists()
    assert (run_dir / "checkpoints/latest").read_text() == "step00000004"
    again = run(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step00000004" in again.stderr
    assert (writing / "COMPLETE").exists() and sorted(losses(run_dir)) == list(range(1, 13))


def test_nonfinite_losses_are_skipped_and_repeated_ones_stop_the_run(dataset, tmp_path):
    one = run(
        pretrain_cmd(
            tmp_path / "one",
            dataset,
            "train.steps=10",
            "train.log_every=1",
            "train.eval_every=0",
            "train.inject_nan_at=[4]",
            nproc=1,
        )
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert "non-finite loss at micro-step 4" in one.stderr
    last = metrics(tmp_path / "one")[-1]
    # Step 4 is skipped (no update): it has no finite loss to log, the others train on.
    assert sorted(losses(tmp_path / "one")) == [1, 2, 3, *range(5, 11)]
    assert all(math.isfinite(v) for v in losses(tmp_path / "one").values())
    assert any(m.get("train/nonfinite_total") == 1 for m in metrics(tmp_path / "one")) and last["step"] == 10

    many = run(
        pretrain_cmd(
            tmp_path / "many",
            dataset,
            "train.steps=20",
            "train.log_every=1",
            "train.eval_every=0",
            "train.checkpoint_every=3",
            "train.max_nonfinite=3",
            "train.inject_nan_at=[8,9,10,11]",
            nproc=1,
        )
    )
    assert many.returncode == 1
    # (micro-steps 8, 9 and 10 are steps 8, 9 and 10, each skipped without an update)
    assert "3 non-finite losses in a row at step 10" in many.stderr
    assert "the last good checkpoint is" in many.stderr and "step00000006" in many.stderr


@pytest.mark.parametrize("name", ["enwik8-50m", "wiki-350m", "wiki-1.3b"])
def test_shipped_scale_configs_fit_80gb_gpus(name):
    from rnnpipe.launch.stages.pretrain import PretrainJob
    from rnnpipe.pipeline.config import load_config
    from rnnpipe.pipeline.models import LanguageModel
    from rnnpipe.pipeline.train.memory import estimate_memory

    job = load_config(PretrainJob, str(REPO / "configs" / "pretrain" / f"{name}.yaml"))
    vocab = 256 if "enwik8" in name else 32768
    world = job.distributed.nodes * job.distributed.gpus_per_node
    estimate = estimate_memory(job, vocab, world)
    target = {"enwik8-50m": 50, "wiki-350m": 350, "wiki-1.3b": 1300}[name]
    assert 0.9 * target < estimate["parameters_millions"] < 1.1 * target
    assert estimate["total"] < 70  # GiB: room left on an 80 GB GPU
    with torch.device("meta"):  # the estimator's parameter count is the model's
        assert LanguageModel(job.model, vocab).num_params() == round(estimate["parameters_millions"] * 1e6)
