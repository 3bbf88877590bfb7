"""Pretraining under hostile conditions: concurrent runs, killed launchers, signals at any moment,
full disks, unreadable markers, divergence, a non-finite gradient norm, pickle-free state files.

Every run here is a tiny LRN on 300 kB of enwik8 (its final evaluation takes about a second).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.nn.functional as F
from harness import CLI, REPO, TINY_PRETRAIN

from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.train import checkpoint, divergence

pytest.importorskip("deepspeed")
CONFIG = REPO / "configs" / "pretrain" / "tiny-lrn.yaml"
TINY = [*TINY_PRETRAIN, "train.zero_stage=0"]


@pytest.fixture(scope="module")
def dataset(tiny_enwik8) -> Path:
    return tiny_enwik8


def cmd(run_dir: Path, data: Path, *overrides: str, executor: str = "inline") -> list[str]:
    return [
        *CLI,
        "pretrain",
        str(CONFIG),
        f"run_dir={run_dir}",
        f"data.path={data}",
        f"executor.kind={executor}",
        "distributed.nproc=1",
        *TINY,
        *overrides,
    ]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "RNNPIPE_PROGRESS": "0", **extra}


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [m["step"] for m in map(json.loads, path.read_text().splitlines()) if "train/loss" in m]


def wait_until(predicate, proc: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler installed for ``sig`` (/proc/PID/status SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt")), 16)
    return bool(mask >> (sig - 1) & 1)


# ----------------------------------------------------------------------------- concurrent runs


def test_a_second_pretrain_on_a_run_dir_is_refused_naming_the_holder(tmp_path, dataset):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        cmd(run_dir, dataset, "train.steps=40"),
        stderr=subprocess.PIPE,
        text=True,
        env=env(RNNPIPE_TEST_STEP_DELAY="0.2"),
    )
    wait_until(lambda: steps_logged(run_dir), first, "the first step")
    second = subprocess.run(
        cmd(run_dir, dataset, "train.steps=40"), capture_output=True, text=True, env=env()
    )
    assert second.returncode == 1, second.stderr[-2000:]
    message = second.stderr.strip().splitlines()[-1]
    assert "is in use by pretrain pid" in message and socket.gethostname() in message
    assert "Traceback" not in second.stderr
    first.send_signal(signal.SIGTERM)  # the first run is untouched: it checkpoints and stops as usual
    _, err = first.communicate(timeout=120)
    assert first.returncode == 75, err[-2000:]
    steps = steps_logged(run_dir)
    assert steps == sorted(set(steps)) and steps[0] == 1  # every step logged once, by one run
    assert checkpoint.find_latest(run_dir) is not None


def test_a_killed_launcher_leaves_no_rank_behind(tmp_path, dataset):
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        cmd(run_dir, dataset, "train.steps=200", "distributed.nproc=2", executor="local"),
        stderr=subprocess.DEVNULL,
        env=env(RNNPIPE_TEST_STEP_DELAY="0.2"),
    )
    wait_until(lambda: steps_logged(run_dir), launcher, "the first step")
    ranks = psutil.Process(launcher.pid).children(recursive=True)
    assert len(ranks) >= 2
    launcher.kill()
    launcher.wait()
    _, alive = psutil.wait_procs(ranks, timeout=60)
    assert not alive, f"ranks still running after their launcher was killed: {[p.pid for p in alive]}"


# ------------------------------------------------------------------------------------- signals


def test_ctrl_c_checkpoints_then_exits_130_and_says_how_to_resume(tmp_path, dataset):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        cmd(run_dir, dataset, "train.steps=200", executor="local"),
        stderr=subprocess.PIPE,
        text=True,
        env=env(RNNPIPE_TEST_STEP_DELAY="0.1"),
    )
    wait_until(lambda: len(steps_logged(run_dir)) >= 2, proc, "two steps")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    latest = checkpoint.find_latest(run_dir)
    assert latest is not None and checkpoint.read_header(latest)["step"] >= 2
    assert "Traceback" not in err
    assert f"its last checkpoint is {latest}; run the same command again to continue" in err


def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(tmp_path, dataset):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        cmd(run_dir, dataset, "train.steps=200", executor="local"),  # the launcher forwards both
        stderr=subprocess.PIPE,
        text=True,
        env=env(RNNPIPE_TEST_STEP_DELAY="5"),  # a long step: the first Ctrl-C waits for its end
    )
    wait_until(lambda: steps_logged(run_dir), proc, "the first step")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    start = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - start < 4, err[-2000:]  # the step sleeps 4.5 s more
    assert "second interrupt" in err
    assert checkpoint.find_latest(run_dir) is None
    assert "before its first checkpoint" in err and "run the same command again" not in err


def test_a_signal_while_the_rank_still_imports_torch_is_kept(tmp_path, dataset):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        cmd(run_dir, dataset, "train.steps=100"), stderr=subprocess.PIPE, text=True, env=env()
    )
    # The moment the CLI can catch it: long before torch loads (the default USR2 action kills).
    wait_until(lambda: catches(proc.pid, signal.SIGUSR2), proc, "the stop flag", timeout=30)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-2000:]
    assert checkpoint.read_header(checkpoint.find_latest(run_dir))["step"] == 1  # one step, then stopped


def test_an_evaluation_batch_the_splits_cannot_fill_is_refused_before_training(tmp_path, dataset):
    run_dir = tmp_path / "run"
    started = time.time()
    done = subprocess.run(
        cmd(run_dir, dataset, "train.eval_batch_size=100000"), capture_output=True, text=True, env=env()
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train.eval_batch_size=100000" in done.stderr and "split gives" in done.stderr
    assert time.time() - started < 30 and not (run_dir / "checkpoints").exists()


# -------------------------------------------------------------------------------- full disks


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


@pytest.mark.parametrize(("ranks", "zero"), [(1, 0), (2, 0), (2, 2)])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_leaves_nothing_half_written(
    tmp_path, dataset, ranks, zero
):
    """A file-size limit makes the big writes fail (EFBIG, as ENOSPC would). With 2 ranks at ZeRO-0
    only rank 0 writes DeepSpeed's files; at ZeRO-2 every rank writes its optimizer partition: the
    ranks must agree either way, not hang."""
    run_dir = tmp_path / "run"
    executor = "inline" if ranks == 1 else "local"
    args = cmd(
        run_dir,
        dataset,
        "train.steps=4",
        "train.checkpoint_every=2",
        f"distributed.nproc={ranks}",
        f"train.zero_stage={zero}",
        executor=executor,
    )
    failed = subprocess.run(
        args, capture_output=True, text=True, env=env(), preexec_fn=_limit_file_size, timeout=300
    )
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "checkpoint at step 2 not written: rank " in failed.stderr, failed.stderr[-2000:]
    assert "no complete checkpoint exists" in failed.stderr
    assert not list((run_dir / "checkpoints").glob("step*"))  # the partial one is removed
    again = subprocess.run(args, capture_output=True, text=True, env=env())  # space again: resume=auto
    assert again.returncode == 0, again.stderr[-2000:]
    assert checkpoint.read_header(checkpoint.find_latest(run_dir))["step"] == 4


def test_an_unreadable_marker_means_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for step, text in ((2, json.dumps({"step": 2, "world": 1})), (4, ""), (6, '{"step": 6, "wor')):
        (root / checkpoint.tag_of(step)).mkdir(parents=True)
        (root / checkpoint.tag_of(step) / checkpoint.COMPLETE).write_text(text)
    (root / "latest").write_text(checkpoint.tag_of(6))
    assert checkpoint.find_latest(tmp_path) == root / checkpoint.tag_of(2)
    with pytest.raises(PipelineError, match="not a complete checkpoint"):
        checkpoint.resolve(tmp_path, str(root / checkpoint.tag_of(4)))


# ---------------------------------------------------------------------------- the trust boundary


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_pickles_in_rnnpipe_files_are_refused_without_running(tmp_path):
    from rnnpipe.pipeline.train.export import export

    marker = tmp_path / "ran"
    state = tmp_path / "rank00000.pt"
    torch.save({"step": 1, "loader": _Payload(marker)}, state)
    with pytest.raises(PipelineError, match="not a readable rnnpipe state file"):
        checkpoint.load_state(state)  # also what fine-tune checkpoints are read with
    ckpt = tmp_path / "run" / "checkpoints" / checkpoint.tag_of(1)
    ckpt.mkdir(parents=True)
    (ckpt / checkpoint.COMPLETE).write_text(json.dumps({"step": 1, "world": 1, "config": {"data": {}}}))
    torch.save({"module": _Payload(marker)}, ckpt / "mp_rank_00_model_states.pt")  # a ZeRO-0 export source
    with pytest.raises(PipelineError, match="rnnpipe does not unpickle it"):
        export(ckpt, tmp_path / "export")
    assert not marker.exists()


def test_a_slurm_submission_not_started_yet_keeps_a_second_launch_out(tmp_path, dataset, monkeypatch):
    from rnnpipe.launch.processes import record, slurm
    from rnnpipe.launch.stages import pretrain
    from rnnpipe.pipeline.config import load_config

    run_dir = tmp_path / "run"
    record.record(str(run_dir / "slurm"), "pretrain", {"job_id": "4242", "submitted_at": time.time()})
    monkeypatch.setattr(
        slurm, "job_states", lambda ids: {"4242": slurm.JobState("4242", "PENDING", "", "", "", "Priority")}
    )
    job = load_config(pretrain.PretrainJob, str(CONFIG), [f"run_dir={run_dir}", f"data.path={dataset}"])
    with pytest.raises(PipelineError, match=r"still going: pretrain \(job 4242, PENDING\)"):
        pretrain.check(job)
    monkeypatch.setattr(
        slurm, "job_states", lambda ids: {"4242": slurm.JobState("4242", "COMPLETED", "0:0", "", "", "")}
    )
    pretrain.check(job)  # ended: the run dir is free again


# -------------------------------------------------------------------------------- divergence


def test_divergence_names_the_checkpoint_from_before_the_spike(tmp_path, dataset):
    run_dir = tmp_path / "run"
    blown = subprocess.run(
        cmd(
            run_dir,
            dataset,
            "optim.lr=1e4",
            "train.steps=40",
            "train.checkpoint_every=1",
            "train.keep_checkpoints=2",
            "train.max_nonfinite=3",
        ),
        capture_output=True,
        text=True,
        env=env(),
    )
    assert blown.returncode == 1, blown.stderr[-2000:]
    assert "loss spike at step" in blown.stderr
    message = blown.stderr.strip().splitlines()[-1]
    good, suspect = checkpoint.last_good(run_dir / "checkpoints")
    assert good is not None and suspect
    since = checkpoint.read_header(suspect[-1])["diverging_since"]
    assert checkpoint.read_header(good)["step"] < since - 1  # its weights gave a normal loss
    assert f"the last good checkpoint is {good}" in message and "may already hold diverged" in message
    resumed = subprocess.run(
        cmd(run_dir, dataset, "optim.lr=1e-3", "train.steps=12", f"train.resume={good}"),
        capture_output=True,
        text=True,
        env=env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    losses = [m["train/loss"] for m in rows if "train/loss" in m]
    assert all(x < 6.0 for x in losses[-5:])  # trains on from good weights (bytes: ln 256 = 5.55)


def test_the_spike_watch_marks_a_jump_not_a_decline():
    stats = [0.0, 0.0, 0]
    cap = divergence.ceiling(256)
    assert not any(divergence.watch(stats, 5.5 - 0.05 * i, cap) for i in range(30))  # training
    assert divergence.watch(stats, 12.0, cap)  # far above the running mean
    assert stats[2] == 30  # a spike does not move the statistics
    assert divergence.watch([0.0, 0.0, 0], 1e8, cap)  # above the ceiling from the first step
    assert divergence.watch(stats, float("nan"), cap)


@pytest.mark.parametrize("zero", [0, 2])
def test_a_non_finite_gradient_norm_skips_the_update_like_a_non_finite_loss(tmp_path, dataset, zero):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        cmd(run_dir, dataset, "train.steps=6", f"train.zero_stage={zero}", "train.checkpoint_every=0"),
        capture_output=True,
        text=True,
        env=env(RNNPIPE_TEST_HUGE_GRAD_AT="3"),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "non-finite gradient norm at micro-step 3" in done.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("train/nonfinite_total", 0) for r in rows) == 1
    assert all(r["train/loss"] < 6.0 for r in rows if "train/loss" in r)  # the weights stayed sane


# ------------------------------------------------------------------------------------ init_from


def test_init_from_starts_a_new_run_from_the_exported_weights(tmp_path, dataset):
    from rnnpipe.pipeline.data.reader import SplitReader
    from rnnpipe.pipeline.models.pretrained import load_pretrained
    from rnnpipe.pipeline.train.data import StreamBatches

    first = tmp_path / "first"
    done = subprocess.run(
        cmd(first, dataset, "train.steps=3", "--export"), capture_output=True, text=True, env=env()
    )
    assert done.returncode == 0, done.stderr[-2000:]
    second = tmp_path / "second"
    args = cmd(second, dataset, "train.steps=1", f"train.init_from={first / 'export'}", "optim.lr=1e-3")
    started = subprocess.run(args, capture_output=True, text=True, env=env())
    assert started.returncode == 0, started.stderr[-2000:]
    # Step 1's loss is computed with the initial weights: the export's, on the run's first batch.
    batch = next(StreamBatches(SplitReader(str(dataset), "train"), 0, 1, 2, 32))
    model = load_pretrained(first / "export")
    with torch.no_grad():
        logits, _ = model(batch.inputs_BT)
        want = F.cross_entropy(logits.flatten(0, 1), batch.targets_BT.flatten(), ignore_index=-100).item()
    assert steps_logged(second) == [1]
    got = next(m["train/loss"] for m in map(json.loads, (second / "metrics.jsonl").read_text().splitlines()))
    assert got == pytest.approx(want, rel=1e-6)
    header = checkpoint.read_header(checkpoint.find_latest(second))
    assert header["init_from"]["step"] == 3 and len(header["init_from"]["weights_sha256"]) == 64
    other = subprocess.run(
        cmd(tmp_path / "third", dataset, f"train.init_from={first / 'export'}", "model.d_model=48"),
        capture_output=True,
        text=True,
        env=env(),
    )
    assert other.returncode == 2 and "model.d_model: 32 → 48" in other.stderr, other.stderr[-2000:]


# ------------------------------------------------------------------------------ elastic resume


def test_resume_on_another_world_size(tmp_path, dataset):
    """2 ranks → 1 rank with data.batch_size doubled (the same streams, moved with their hidden
    states) continues with the per-step losses of an uninterrupted 2-rank run; 2 → 1 with the same
    batch size re-cuts the streams and says so. ZeRO-2: the optimizer state goes through
    DeepSpeed's universal checkpoint."""
    common = ["train.steps=8", "train.zero_stage=2", "train.checkpoint_every=0"]

    def losses(run_dir: Path) -> dict[int, float]:
        rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        return {m["step"]: m["train/loss"] for m in rows if "train/loss" in m}

    whole = tmp_path / "whole"
    done = subprocess.run(
        cmd(whole, dataset, *common, "distributed.nproc=2", executor="local"),
        capture_output=True,
        text=True,
        env=env(),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for batch, says in ((4, "hidden states moved to their new ranks"), (2, "hidden state is reset")):
        cut = tmp_path / f"cut{batch}"
        first = subprocess.Popen(
            cmd(cut, dataset, *common, "distributed.nproc=2", executor="local"),
            stderr=subprocess.PIPE,
            text=True,
            env=env(RNNPIPE_TEST_STEP_DELAY="0.3"),
        )
        wait_until(lambda cut=cut: len(steps_logged(cut)) >= 3, first, "step 3")
        first.send_signal(signal.SIGUSR2)
        _, err = first.communicate(timeout=120)
        assert first.returncode == 75, err[-2000:]
        stopped = checkpoint.read_header(checkpoint.find_latest(cut))["step"]
        resumed = subprocess.run(
            cmd(cut, dataset, *common, f"data.batch_size={batch}", executor="local"),
            capture_output=True,
            text=True,
            env=env(),
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "world_size: 2 → 1" in resumed.stderr and says in resumed.stderr, resumed.stderr[-3000:]
        after = {s: v for s, v in losses(cut).items() if s > stopped}
        assert sorted(after) == list(range(stopped + 1, 9))
        if batch == 4:  # the same computation up to the order of a sum: equal to float precision
            assert after == pytest.approx({s: losses(whole)[s] for s in after}, rel=1e-5)
