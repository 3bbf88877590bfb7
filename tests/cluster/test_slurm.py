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
from pathlib import Path

import pytest
from harness import CLI, DATA, REPO, data_file, import_test_module

sweep_yaml = import_test_module("integration/finetune/test_finetune").sweep_yaml


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
        [*CLI, "-q", *args],
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
        "eval.max_tokens=20000",  # the final evaluation's share of valid and test (whole: minutes)
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


# ------------------------------------------------------------------------------- the pipeline


def rnnpipe_command() -> str:
    """The rnnpipe executable beside this Python (the .venv's), for slurm/pipeline.sh."""
    exe = Path(sys.executable).parent / "rnnpipe"
    return str(exe) if exe.exists() else "rnnpipe"


LOCAL_SLURM = REPO / "configs" / "pipeline" / "local-slurm.yaml"


def pipeline_args(tmp_path: Path, prepare: str = "", sources: list[str] | None = None) -> list[str]:
    """configs/pipeline/local-slurm.yaml, shortened: enwik8-head → 20 steps of a tiny LRN on 2
    ranks (one per node) → 2 tasks × {pretrained, scratch} for 10 steps → the table."""
    sources = sources or [str(data_file("enwik8-head/enwik8-head.txt"))]
    return [
        str(LOCAL_SLURM),
        f"run_dir={tmp_path / 'run'}",
        *([f"prepare.config={REPO / prepare}"] if prepare else []),
        f"prepare.source.paths=[{','.join(sources)}]",
        "pretrain.train.steps=20",
        "pretrain.train.eval_every=10",
        "pretrain.train.checkpoint_every=10",
        "pretrain.train.log_every=10",
        "pretrain.train.eval_max_tokens=20000",
        f"finetune.data_root={DATA}",
        "finetune.grid.task=[sst2,ptb]",
        "finetune.job.max_steps=10",
        "finetune.job.eval_every=5",
        "finetune.tasks.sst2.max_train=256",
        "finetune.tasks.sst2.max_dev=128",
        "finetune.tasks.ptb.max_train=256",
    ]


def recorded_jobs(run_dir: Path) -> dict[str, str]:
    state = json.loads((run_dir / "pipeline.json").read_text())
    return {k: v["job_id"] for k, v in state["stages"].items() if v.get("job_id")}


def assert_pipeline_completed(run_dir: Path) -> None:
    """Every job and array task COMPLETED in sacct, pretrain as 2 ranks on 2 nodes, and the table."""
    jobs = recorded_jobs(run_dir)
    assert sorted(jobs) == ["collect", "finetune", "prepare", "pretrain"]
    for stage, job_id in jobs.items():
        states = sacct_states(job_id)
        top = {k: v for k, v in states.items() if "." not in k}
        assert top and all(v.startswith("COMPLETED|") for v in top.values()), (stage, states)
    pre = jobs["pretrain"]
    steps = {
        k: v for k, v in sacct_states(pre).items() if k.startswith(f"{pre}.") and k[len(pre) + 1 :].isdigit()
    }
    assert list(steps.values()) == ["COMPLETED|n[1-2]"], steps  # one srun step, over both nodes
    ckpt = run_dir / "pretrain" / "checkpoints" / "step00000020"
    assert sorted(p.name for p in ckpt.glob("rank*.pt")) == ["rank00000.pt", "rank00001.pt"]  # world size 2
    assert len(sacct_states(jobs["finetune"])) >= 4  # the array's 4 tasks (and their steps)
    md = (run_dir / "finetune" / "results.md").read_text()
    for row in ("| ptb | pretrained |", "| ptb | scratch |", "| sst2 | pretrained |", "| sst2 | scratch |"):
        assert row in md


def test_pipeline_through_rnnpipe_run(slurm, tmp_path):
    args = pipeline_args(tmp_path)
    run_dir = tmp_path / "run"
    done = rnnpipe("run", *args, "--wait", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_pipeline_completed(run_dir)
    driver_log = next((run_dir / "slurm").glob("*/prepare/*/*_0_log.err")).read_text()
    assert (
        "encode: submitted Slurm job array" in driver_log and "pack: submitted Slurm job array" in driver_log
    )
    status = rnnpipe("status", str(run_dir))
    assert status.returncode == 0 and status.stdout.count("COMPLETED") >= 4, status.stdout
    # again: nothing to do, nothing submitted
    again = rnnpipe("run", *args)
    assert again.returncode == 0 and "every stage is complete" in again.stdout, again.stdout + again.stderr
    assert recorded_jobs(run_dir) == {}
    # the jobs ran the code snapshot the submission recorded
    state = json.loads((run_dir / "pipeline.json").read_text())
    result = json.loads((run_dir / "finetune" / "jobs" / "ptb-scratch-seed0" / "result.json").read_text())
    snapshot = result["provenance"]["code"]["snapshot"]
    assert snapshot and Path(snapshot["path"]).parent.parent == run_dir / "slurm", snapshot

    # one fine-tune key changed: only its jobs are submitted, as the array's tasks
    jobs = run_dir / "finetune" / "jobs"
    ptb = {j: (jobs / j / "result.json").read_bytes() for j in ("ptb-pretrained-seed0", "ptb-scratch-seed0")}
    changed = rnnpipe("run", *args, "finetune.tasks.sst2.max_dev=64", "--wait", timeout=900)
    assert changed.returncode == 0, changed.stdout[-3000:] + changed.stderr[-3000:]
    state = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert state["prepare"]["state"] == state["pretrain"]["state"] == "SKIPPED"
    assert state["finetune"]["tasks"] == ["sst2-pretrained-seed0", "sst2-scratch-seed0"]
    assert len([k for k in sacct_states(state["finetune"]["job_id"]) if "." not in k]) == 2
    assert state["collect"]["job_id"]
    assert {j: (jobs / j / "result.json").read_bytes() for j in ptb} == ptb
    assert (
        json.loads((jobs / "sst2-scratch-seed0" / "result.json").read_text())["config"]["task_config"][
            "max_dev"
        ]
        == 64
    )


def test_pipeline_through_plain_sbatch(slurm, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "RNNPIPE": rnnpipe_command(), "RNNPIPE_PROGRESS": "0"}
    done = subprocess.run(
        ["bash", str(REPO / "slurm" / "pipeline.sh"), *pipeline_args(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "collect: Slurm job" in done.stdout
    waited = rnnpipe("status", str(run_dir), "--wait", "--poll", "1", timeout=900)
    assert waited.returncode == 0, waited.stdout[-3000:]
    assert_pipeline_completed(run_dir)
    assert "exported the final model" in next((run_dir / "logs").glob("pretrain-*.out")).read_text()
    # every job ran the snapshot `rnnpipe plan` took, not the working tree
    code = json.loads((run_dir / "pipeline.json").read_text())["code"]
    pretrain = json.loads((run_dir / "pretrain" / "provenance.json").read_text())["code"]
    assert pretrain["snapshot"]["digest"] == code["digest"] and pretrain["snapshot"]["path"] == code["path"]


def final_metrics(run_dir: Path) -> dict[tuple[int, str], float]:
    return {
        (m["step"], k): v
        for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        for k, v in m.items()
        if k.endswith(("loss", "bpb", "ppl"))
    }


def test_a_requeued_pretrain_job_resumes_and_ends_as_an_uninterrupted_run(slurm, tmp_path):
    """Requeued twice over: by `scontrol requeue`, and by its time limit's USR2. Both runs, and a
    run of the same 2 ranks on local processes, end with bit-identical metrics."""
    data = tmp_path / "data"
    src = data_file("enwik8-head/enwik8-head.txt")
    assert rnnpipe("prepare", "configs/demo.yaml", f"output={data}", f"source.paths=[{src}]").returncode == 0
    common = [
        "pretrain",
        "configs/pretrain/tiny-lrn.yaml",
        f"data.path={data}",
        "train.steps=60",
        "train.log_every=5",
        "train.eval_every=0",
        "train.checkpoint_every=10",
        "train.eval_max_tokens=20000",
        "eval.max_tokens=20000",
        "distributed.nodes=2",
        "distributed.nproc=1",
        *SMALL[:2],
    ]

    def submit(run_dir: Path, delay: str, *extra: str) -> str:
        env = {**os.environ, "RNNPIPE_PROGRESS": "0", "RNNPIPE_TEST_STEP_DELAY": delay}
        done = subprocess.run(
            [
                *CLI,
                "-q",
                *common,
                f"run_dir={run_dir}",
                *extra,
                "--executor",
                "slurm",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout.split("submitted Slurm job ")[1].split(":")[0]

    requeued, timed = tmp_path / "requeued", tmp_path / "timed"
    a = submit(requeued, "0.5")
    # Slurm sends USR2 at 50 s or up to 30 s earlier; the run needs more than 60 s.
    b = submit(timed, "1.0", "executor.slurm.time_min=1", "distributed.signal_grace_s=10")
    reference = subprocess.Popen(
        [
            *CLI,
            "-q",
            *common,
            f"run_dir={tmp_path / 'ref'}",
            "distributed.nproc=2",
            "--executor",
            "local",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (requeued / "metrics.jsonl").exists() or len(final_metrics(requeued)) < 4:
        assert time.time() < deadline, "the first job never logged 4 times"
        time.sleep(0.5)
    subprocess.run(["scontrol", "requeue", a], check=True)
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    for job_id in (a, b):
        deadline = time.time() + 600
        while (
            not sacct_states(job_id)
            .get(job_id, "")
            .startswith(("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"))
        ):
            assert time.time() < deadline, f"job {job_id} did not end"
            time.sleep(2)
        assert sacct_states(job_id)[job_id].startswith("COMPLETED"), sacct_states(job_id)
    ref = final_metrics(tmp_path / "ref")
    assert (60, "test/bpb") in ref
    for run_dir, signal_line in ((requeued, "signal 15: checkpointed"), (timed, "signal 12: checkpointed")):
        log = (run_dir / "slurm").glob("*/*_0_log.err")
        text = "\n".join(p.read_text() for p in log)
        assert signal_line in text and "resumed from" in text, text[-3000:]
        assert final_metrics(run_dir) == ref  # every logged loss, and valid/test at the end, bit for bit


def test_a_failed_prepare_task_cancels_the_stages_after_it(slurm, tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("To be, or not to be, that is the question.\n" * 200)
    bad.write_bytes(b"fine text\n" * 10 + b"broken \xff byte\n")
    args = pipeline_args(tmp_path, "configs/prepare/tinyshakespeare.yaml", [str(good), str(bad)])
    run_dir = tmp_path / "run"
    done = rnnpipe("run", *args, "--wait", timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = recorded_jobs(run_dir)
    assert sacct_states(jobs["prepare"])[jobs["prepare"]].startswith("FAILED")
    for later in ("pretrain", "finetune", "collect"):  # the array shows as 123_[0-3]
        states = [v for k, v in sacct_states(jobs[later]).items() if "." not in k]
        assert states and all(v.startswith("CANCELLED") for v in states), (later, states)
    status = rnnpipe("status", str(run_dir))
    assert status.returncode == 1
    out = status.stdout
    assert "prepare FAILED" in out and f"{bad}: invalid UTF-8 at byte 107" in out, out
    assert "task" in out.split("prepare FAILED")[1]  # the failed task is named, with its log tail
    assert out.count("cancelled: a stage it depends on failed") == 3, out
    assert not (run_dir / "data" / "manifest.json").exists()


def test_a_submission_that_fails_half_way_leaves_no_job_behind(slurm, tmp_path):
    args = pipeline_args(tmp_path)
    # a partition Slurm does not have: refused before anything is submitted
    early = rnnpipe("run", *args, "finetune.executor.slurm.partition=no-such-partition")
    assert early.returncode == 2, early.stderr[-3000:]
    assert (
        "finetune.executor.slurm.partition=no-such-partition: this cluster has no such partition"
        in early.stderr
    )
    assert not (tmp_path / "run" / "pipeline.json").exists()
    early = rnnpipe("run", *args, "slurm.partition=nope")  # the pipeline's own jobs' partition too
    assert (
        early.returncode == 2 and "slurm.partition=nope: this cluster has no such partition" in early.stderr
    )
    # an option sbatch itself rejects: found out only when the fine-tune array is submitted
    done = rnnpipe("run", *args, "finetune.executor.slurm.extra.no-such-option=1")
    assert done.returncode == 1
    assert "submitting the pipeline failed" in done.stderr, done.stderr[-3000:]
    assert "no-such-option" in done.stderr, done.stderr[-3000:]  # sbatch's own reason
    jobs = recorded_jobs(tmp_path / "run")
    assert sorted(jobs) == ["prepare", "pretrain"]  # submitted before the failure...
    for job_id in jobs.values():  # ...and cancelled, not left waiting
        deadline = time.time() + 60
        while not sacct_states(job_id).get(job_id, "").startswith("CANCELLED"):
            assert time.time() < deadline, sacct_states(job_id)
            time.sleep(1)


def test_a_queued_job_runs_the_code_it_was_submitted_with(slurm, tmp_path):
    """Submitted, then the working tree is edited before the job starts: the job runs the code as
    it was at submission (its snapshot), and records that snapshot."""
    checkout = tmp_path / "checkout"  # a copy of the package of our own to edit, laid out as installed
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "rnnpipe", checkout / "rnnpipe", ignore=ignore)
    for folder in ("launch", "pipeline", "kernels", "configs", "slurm"):
        shutil.copytree(REPO / folder, checkout / "rnnpipe" / folder, ignore=ignore)
    env = {**os.environ, "PYTHONPATH": str(checkout), "RNNPIPE_PROGRESS": "0"}

    def cli(*args: str) -> subprocess.CompletedProcess:
        cmd = [*CLI, "-q", *args]
        return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)

    src = data_file("enwik8-head/enwik8-head.txt")
    data, run_dir = tmp_path / "data", tmp_path / "run"
    prep = cli(
        "prepare",
        str(REPO / "configs/demo.yaml"),
        f"output={data}",
        f"source.paths=[{src}]",
        "source.limit_bytes=300000",
        "--executor",
        "inline",
    )
    assert prep.returncode == 0, prep.stderr[-3000:]
    submitted = cli(
        "pretrain",
        str(REPO / "configs/pretrain/tiny-lrn.yaml"),
        f"run_dir={run_dir}",
        f"data.path={data}",
        "train.steps=2",
        "train.eval_every=0",
        "train.sample_tokens=0",
        "model.d_model=32",
        "data.seq_len=32",
        "data.batch_size=2",
        "train.eval_batch_size=2",
        *SMALL[:2],
        "executor.slurm.extra.hold=''",
        "--executor",
        "slurm",
    )
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.split("submitted Slurm job ")[1].split(":")[0]
    (snapshot,) = (run_dir / "slurm").glob("code-*")
    digest = json.loads((snapshot / "SNAPSHOT.json").read_text())["digest"]
    assert snapshot.name == f"code-{digest[:12]}"
    # the edit: another version, and a loop that fails on import
    init = checkout / "rnnpipe" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "edited-'))
    with (checkout / "rnnpipe" / "pipeline" / "train" / "loop.py").open("a") as f:
        f.write('\nraise RuntimeError("the edited working tree ran")\n')
    subprocess.run(["scontrol", "release", job_id], check=True)
    deadline = time.time() + 600
    while not sacct_states(job_id).get(job_id, "").startswith(("COMPLETED", "FAILED", "CANCELLED")):
        assert time.time() < deadline, f"job {job_id} did not end"
        time.sleep(2)
    log = "\n".join(p.read_text() for p in (run_dir / "slurm").glob("*/*_log.*"))
    assert sacct_states(job_id)[job_id].startswith("COMPLETED"), log[-3000:]
    code = json.loads((run_dir / "provenance.json").read_text())["code"]
    assert code["snapshot"] == {"digest": digest, "path": str(snapshot)}
    assert not code["rnnpipe"].startswith("edited")
    marker = json.loads((run_dir / "checkpoints" / "step00000002" / "COMPLETE").read_text())
    assert marker["provenance"]["code"]["snapshot"]["digest"] == digest


def test_the_first_contact_job_measures_the_network_and_both_runs(slurm, tmp_path):
    """slurm/first-contact.sbatch as a user submits it (here with CPU-sized overrides: gloo, a
    tiny model, one rank per node): both all-reduces, both 50-step runs, and the one table."""
    src = data_file("enwik8-head/enwik8-head.txt")
    data = tmp_path / "data"
    prep = rnnpipe(
        "prepare", "enwik8-head", f"output={data}", f"source.paths=[{src}]", "source.limit_bytes=300000",
        "shards.sample_tokens=4096", "--executor", "inline",
    )  # fmt: skip
    assert prep.returncode == 0, prep.stderr[-2000:]
    out = tmp_path / "out"
    env = {**os.environ, "RNNPIPE_FIRST_CONTACT_OUT": str(out), "RNNPIPE_ALLREDUCE_MIB": "1,4",
           "RNNPIPE_PYTHON": sys.executable, "RNNPIPE_PROGRESS": "0"}  # fmt: skip
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         "--mem=2G", "--time=15", f"--output={tmp_path / 'job.log'}",
         str(REPO / "slurm" / "first-contact.sbatch"), str(data), "tiny-lrn", "model.d_model=32",
         "data.seq_len=32", "data.batch_size=2", "train.eval_batch_size=2"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    deadline = time.time() + 600
    while not sacct_states(job_id).get(job_id, "").startswith(("COMPLETED", "FAILED", "CANCELLED")):
        assert time.time() < deadline, f"job {job_id} did not end"
        time.sleep(2)
    log = (tmp_path / "job.log").read_text()
    assert sacct_states(job_id)[job_id].startswith("COMPLETED"), log[-3000:]
    table = (out / "first-contact.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "gloo" in line]
    assert len(rows) == 4 and {r.split(" | ")[0] for r in rows} == {"| 1", "| 2"}
    assert "| 1-node | 9 |" in table and "| 2-nodes-zero2 | 9 |" in table
    assert "preflight" not in log or "config error" not in log
