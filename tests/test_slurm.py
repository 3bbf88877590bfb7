"""The stages on a real Slurm cluster (``slurm/local-cluster.sh``: 2 simulated nodes on this host).

``make test`` starts the cluster when it runs as root; elsewhere these tests skip, saying why.
Each test uses its own folders, so job ids restarting at 1 on a fresh cluster never collide.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, data_file
from tests.test_finetune import sweep_yaml


def _cluster_nodes() -> int:
    if shutil.which("sinfo") is None:
        return 0
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%D %t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(int(line.split()[0]) for line in out.stdout.splitlines() if line.split()[1:] == ["idle"])


@pytest.fixture(scope="module")
def slurm():
    if _cluster_nodes() < 2:
        pytest.skip(
            "no Slurm cluster with 2 idle nodes here: run `slurm/local-cluster.sh start` as root "
            "(make test does when it runs as root)"
        )


def rnnpipe(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "launch", "-q", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RNNPIPE_PROGRESS": "0"},
    )


def sacct_states(job_id: str) -> dict[str, str]:
    """{job or step id: "STATE|nodes"} once no part of the job is still running: a job's result can
    reach submitit before Slurm's accounting has recorded the job's end."""
    for _ in range(120):
        states = _sacct(job_id)
        if states and not any(
            v.split("|")[0] in ("PENDING", "RUNNING", "COMPLETING") for v in states.values()
        ):
            return states
        time.sleep(0.5)
    return states


def _sacct(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State,NodeList"], capture_output=True, text=True
    ).stdout
    return {line.split("|")[0]: line.split("|")[1] + "|" + line.split("|")[2] for line in out.splitlines()}


SMALL = ["executor.slurm.cpus_per_task=1", "executor.slurm.mem_gb=1", "executor.slurm.poll_s=1"]


def test_prepare_as_a_job_array_matches_the_local_executor(slurm, tmp_path):
    src = data_file("enwik8-head/enwik8-head.txt")
    outs = {}
    for kind in ("local", "slurm"):
        out = tmp_path / kind
        done = rnnpipe(
            "prepare",
            "configs/demo.yaml",
            f"output={out}",
            f"source.paths=[{src}]",
            *SMALL,
            "--executor",
            kind,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outs[kind] = json.loads((out / "manifest.json").read_text())
    assert "submitted Slurm job array" in done.stderr
    shards = {
        k: [(s["path"], s["sha256"]) for sp in m["splits"].values() for s in sp["shards"]]
        for k, m in outs.items()
    }
    assert shards["slurm"] == shards["local"] and len(shards["slurm"]) == 6


def test_pretrain_runs_as_two_tasks_on_two_nodes(slurm, tmp_path):
    src = data_file("enwik8-head/enwik8-head.txt")
    data = tmp_path / "data"
    assert rnnpipe("prepare", "configs/demo.yaml", f"output={data}", f"source.paths=[{src}]").returncode == 0
    run_dir = tmp_path / "run"
    done = rnnpipe(
        "pretrain",
        "configs/pretrain/tiny-lrn.yaml",
        f"run_dir={run_dir}",
        f"data.path={data}",
        "distributed.nodes=2",
        "distributed.nproc=1",
        "train.steps=20",
        "train.eval_every=10",
        "train.checkpoint_every=10",
        "train.log_every=10",
        *SMALL[:2],
        "--executor",
        "slurm",
        "--wait",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    job_id = done.stdout.split("submitted Slurm job ")[1].split(":")[0]
    states = sacct_states(job_id)
    assert states[job_id] == "COMPLETED|n[1-2]", states
    assert states[f"{job_id}.0"] == "COMPLETED|n[1-2]", states  # the srun step: one task per node
    ckpt = run_dir / "checkpoints" / "step00000020"
    assert sorted(p.name for p in ckpt.glob("rank*.pt")) == ["rank00000.pt", "rank00001.pt"]  # world size 2
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 20 in steps


def test_finetune_sweep_as_a_job_array(slurm, tmp_path):
    cfg = sweep_yaml(tmp_path, {"task": ["sst2", "ptb"], "init": ["pretrained", "scratch"]})
    done = rnnpipe("finetune", str(cfg), *SMALL, "--executor", "slurm")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "submitted Slurm job array" in done.stderr
    jobs = sorted((tmp_path / "sweep" / "jobs").iterdir())
    assert [j.name for j in jobs] == ["ptb-pretrained", "ptb-scratch", "sst2-pretrained", "sst2-scratch"]
    assert all((j / "result.json").exists() for j in jobs)
    assert "| ptb | pretrained |" in (tmp_path / "sweep" / "results.md").read_text()
    array = done.stderr.split("submitted Slurm job array ")[1].split()[0]
    states = sacct_states(array)
    assert [v.split("|")[0] for k, v in states.items() if "." not in k] == ["COMPLETED"] * 4, states
