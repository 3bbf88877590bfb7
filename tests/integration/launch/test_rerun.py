"""A re-run redoes exactly what changed: fingerprints, --dry-run, safe resume and preflight.

One small pipeline (1 MB of enwik8 → 10 steps of a tiny LRN → SST-2 and PTB × pretrained/scratch
for 4 steps → the table) is run once per module; each test works on its own copy of the run dir.
The same behaviour on a real Slurm: tests/cluster/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from harness import CLI, DATA, REPO, data_file

QUICKSTART = REPO / "configs" / "pipeline" / "quickstart.yaml"
TINY_PIPELINE = [
    "prepare.source.limit_bytes=1000000",
    "pretrain.distributed.nproc=1",
    "pretrain.train.zero_stage=0",
    "pretrain.train.steps=10",
    "pretrain.train.log_every=2",
    "pretrain.train.eval_every=0",
    "pretrain.train.checkpoint_every=0",
    "pretrain.train.eval_batch_size=2",
    "pretrain.train.sample_tokens=0",
    "pretrain.eval.max_tokens=4000",  # the final evaluation's share of valid and test
    "pretrain.optim.warmup_steps=2",
    "pretrain.optim.lr=3.0e-3",  # the tests below name this value (the demo's own lr may change)
    "pretrain.model.d_model=32",
    "pretrain.data.seq_len=32",
    "pretrain.data.batch_size=2",
    f"finetune.data_root={DATA}",
    "finetune.grid.task=[sst2,ptb]",
    "finetune.job.max_steps=4",
    "finetune.job.eval_every=2",
    "finetune.job.batch_size=8",
    "finetune.job.max_len=64",
    "finetune.job.seq_len=32",
    "finetune.tasks.sst2.max_train=64",
    "finetune.tasks.sst2.max_dev=32",
    "finetune.tasks.ptb.max_train=64",
    "finetune.tasks.ptb.max_dev=20",
    "finetune.tasks.ptb.max_test=20",
]
JOBS = ["sst2-pretrained-seed0", "sst2-scratch-seed0", "ptb-pretrained-seed0", "ptb-scratch-seed0"]


def _children_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rnnpipe(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "RNNPIPE_PROGRESS": "0"},
    )


def pipeline(run_dir: Path, *extra: str, dry: bool = False) -> subprocess.CompletedProcess:
    src = data_file("enwik8-head/enwik8-head.txt")
    for name in ("sst2", "ptb"):
        data_file(name)
    args = ["run", QUICKSTART, f"run_dir={run_dir}", f"prepare.source.paths=[{src}]", *TINY_PIPELINE, *extra]
    return rnnpipe(*args, *(["--dry-run"] if dry else []))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = pipeline(run_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir


@pytest.fixture
def run_dir(finished, tmp_path) -> Path:
    """A copy of the finished run dir (its records keep the original's absolute paths, which no
    fingerprint contains: the copy is complete as it is)."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


def result(run_dir: Path, job: str) -> dict:
    return json.loads((run_dir / "finetune" / "jobs" / job / "result.json").read_text())


def export_sha(run_dir: Path) -> str:
    return json.loads((run_dir / "pretrain" / "export" / "rnnpipe.json").read_text())["source"][
        "weights_sha256"
    ]


def lines(out: str) -> dict[str, str]:
    """{stage: its --dry-run line}."""
    return {
        line.split()[0]: line
        for line in out.splitlines()
        if line.split()[:1] and line.split()[0] in ("prepare", "pretrain", "finetune", "collect")
    }


def test_dry_run_says_what_would_run_and_why_and_touches_nothing(finished, run_dir, tmp_path):
    fresh = pipeline(tmp_path / "fresh", dry=True)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    got = lines(fresh.stdout)
    assert got["prepare"].split()[1] == "run" and "no dataset yet" in got["prepare"]
    assert "no checkpoint yet" in got["pretrain"]
    assert "all 4 job(s): the backbone is (re)made first" in got["finetune"]
    assert got["collect"].split()[1] == "run"
    assert not (tmp_path / "fresh").exists()  # nothing was written, let alone run

    complete = pipeline(run_dir, dry=True)
    assert complete.returncode == 0, complete.stderr[-3000:]
    got = lines(complete.stdout)
    assert all(v.split()[1] == "skip" for v in got.values()), complete.stdout
    assert "complete: the dataset matches its config (fingerprint" in got["prepare"]
    assert "complete: the export is step 10 of this config" in got["pretrain"]
    on_slurm = pipeline(run_dir, "--executor", "slurm", dry=True)  # the same plan; nothing submitted
    assert on_slurm.returncode == 0 and lines(on_slurm.stdout) == got, on_slurm.stdout + on_slurm.stderr
    assert not (run_dir / "slurm").exists()

    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    stale = pipeline(run_dir, "finetune.tasks.sst2.max_dev=16", "finetune.job.optim.lr=0.003", dry=True)
    assert stale.returncode == 0, stale.stderr[-3000:]
    got = lines(stale.stdout)
    assert got["prepare"].split()[1] == got["pretrain"].split()[1] == "skip"
    assert "4 of 4 job(s)" in got["finetune"]
    assert "sst2-pretrained-seed0: stale: job.optim.lr" not in stale.stdout  # keys are the job's own
    assert (
        "sst2-pretrained-seed0: stale: optim.lr: 0.002 → 0.003, task_config.max_dev: 32 → 16" in stale.stdout
    )
    assert "ptb-scratch-seed0: stale: optim.lr: 0.002 → 0.003" in stale.stdout
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before


def test_more_pretrain_steps_continue_the_run_and_rerun_every_finetune_job(run_dir):
    old_sha = export_sha(run_dir)
    done = pipeline(run_dir, "pretrain.train.steps=20")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "== prepare: skip (complete" in out
    assert "== pretrain: run (resumes from step 10: train.steps: 10 → 20)" in out
    assert "resumed from" in out and "step00000010" in out and "schedule recomputed at step 10" in out
    new_sha = export_sha(run_dir)
    assert new_sha != old_sha
    assert "== finetune: run (4 of 4 job(s))" in out
    for job in JOBS:
        r = result(run_dir, job)
        assert r["backbone"]["sha256"] == new_sha and r["backbone"]["step"] == 20, job
        assert (run_dir / "finetune" / "jobs" / job / "result.stale.json").exists()  # the old one, aside
    md = (run_dir / "finetune" / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| sst2", "| ptb"))]
    assert len(rows) == 4 and all(line.endswith(f"| {new_sha[:10]}@20 |") for line in rows), md
    assert (
        json.loads((run_dir / "finetune" / "results.json").read_text())["results"][0]["backbone"]["step"]
        == 20
    )

    # The schedule is the one of a 20-step run from step 11 on: DeepSpeed's own, step by step.
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = WarmupCosineLR(opt, 20, warmup_min_ratio=0.0, warmup_num_steps=2, cos_min_ratio=0.1)
    expected = {}
    for step in range(1, 21):
        sched.step()
        expected[step] = opt.param_groups[0]["lr"]
    logged = {
        m["step"]: m["train/lr"]
        for m in map(json.loads, (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines())
        if "train/lr" in m
    }
    assert [logged[s] for s in range(12, 21, 2)] == pytest.approx([expected[s] for s in range(12, 21, 2)])
    assert logged[20] == pytest.approx(3e-4)  # the cosine's end, at the new last step

    again = pipeline(run_dir, "pretrain.train.steps=20")
    assert again.returncode == 0 and again.stdout.count(": skip (complete") == 4, again.stdout


def test_one_changed_finetune_key_reruns_only_its_jobs(run_dir):
    before = {job: (run_dir / "finetune" / "jobs" / job / "result.json").read_bytes() for job in JOBS}
    done = pipeline(run_dir, "finetune.tasks.sst2.max_dev=16")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "== finetune: run (2 of 4 job(s))" in done.stdout
    assert "finetune: 2 job(s) run, 2 already complete" in done.stdout
    for job in JOBS:
        now = (run_dir / "finetune" / "jobs" / job / "result.json").read_bytes()
        assert (now == before[job]) == job.startswith("ptb"), job
    assert result(run_dir, "sst2-scratch-seed0")["config"]["task_config"]["max_dev"] == 16
    assert "== collect: run" in done.stdout


@pytest.mark.parametrize("change", ["model.d_model=64", "model.mixer=minlstm"])
def test_a_model_change_on_a_run_dir_stops_before_any_rank_and_keeps_it(run_dir, change):
    pre = run_dir / "pretrain"
    before = {p: p.read_bytes() for p in pre.rglob("*") if p.is_file()}
    cpu0 = _children_cpu_s()
    done = rnnpipe("pretrain", run_dir / "stages" / "pretrain.yaml", f"run_dir={pre}", change)
    cpu = _children_cpu_s() - cpu0  # (wall time doubles when the other test worker is busy)
    assert done.returncode == 2, done.stderr[-3000:]
    key, value = change.split("=")
    old = {"model.d_model": "32", "model.mixer": "lrn"}[key]
    assert f"{key}: {old} → {value}" in done.stderr and "a new run_dir" in done.stderr
    assert "overwrite=true" in done.stderr and "Traceback" not in done.stderr
    assert "DeepSpeed" not in done.stderr and cpu < 5, cpu  # no rank started
    assert {p: p.read_bytes() for p in pre.rglob("*") if p.is_file()} == before  # config.yaml too
    # through the pipeline: the same refusal, exit 2, before any stage runs
    piped = pipeline(run_dir, f"pretrain.{change}")
    assert piped.returncode == 2 and f"{key}: {old} → {value}" in piped.stderr
    assert "==" not in piped.stdout


def test_a_schedule_change_on_a_finished_run_without_more_steps_is_refused(run_dir):
    pre = run_dir / "pretrain"
    done = rnnpipe("pretrain", run_dir / "stages" / "pretrain.yaml", f"run_dir={pre}", "optim.lr=0.001")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "finished training at step 10: optim.lr: 0.003 → 0.001" in done.stderr
    assert "Raise train.steps" in done.stderr


def test_a_pretrain_stage_that_stops_early_fails_the_pipeline_and_is_resumed_next_time(run_dir):
    done = pipeline(run_dir, "pretrain.train.steps=40", "pretrain.train.time_limit_min=0.0001")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "pretrain ended, but its output is not complete (resumes from step 11" in done.stderr
    assert "== finetune" not in done.stdout  # nothing runs on a partial export
    status = rnnpipe("status", run_dir)
    assert "pretrain  FAILED" in status.stdout and "finetune  CANCELLED" in status.stdout


def test_overwrite_replaces_a_run_that_cannot_be_resumed(run_dir):
    pre = run_dir / "pretrain"
    (pre / "notes.txt").write_text("mine")
    done = rnnpipe(
        "pretrain",
        run_dir / "stages" / "pretrain.yaml",
        f"run_dir={pre}",
        "model.d_model=48",
        "overwrite=true",
        "train.steps=2",
        "train.eval_max_tokens=2000",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removed the earlier run" in done.stderr and "resumed from" not in done.stderr
    assert (pre / "notes.txt").read_text() == "mine"  # only what pretrain writes is removed
    assert sorted(p.name for p in (pre / "checkpoints").glob("step*")) == ["step00000002"]
    assert "d_model: 32" in (pre / "configs" / "000.yaml").read_text()  # the earlier config, kept
    assert "d_model: 48" in (pre / "config.yaml").read_text()


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_a_missing_dataset_fails_in_under_2_s_before_any_rank_or_job(tmp_path, executor):
    missing = tmp_path / "no-dataset"
    # The bound is on the command's own CPU seconds: its wall time doubles when the
    # other test worker loads both cores, which says nothing about the command.
    cpu0 = _children_cpu_s()
    t0 = time.time()
    done = rnnpipe(
        "pretrain",
        REPO / "configs" / "pretrain" / "tiny-lrn.yaml",
        f"run_dir={tmp_path / 'run'}",
        f"data.path={missing}",
        "--executor",
        executor,
    )
    elapsed, cpu = time.time() - t0, _children_cpu_s() - cpu0
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"data.path={missing}: not a usable dataset" in done.stderr and "rnnpipe prepare" in done.stderr
    assert cpu < 2.0 and elapsed < 10.0, (cpu, elapsed)
    assert not (tmp_path / "run").exists()  # no config.yaml, no Slurm folder: nothing submitted
    assert "submitted" not in done.stdout


def test_a_run_dir_holding_something_else_is_refused_before_any_work(tmp_path):
    (tmp_path / "run" / "data").mkdir(parents=True)
    (tmp_path / "run" / "data" / "thesis.tex").write_text("precious")
    done = pipeline(tmp_path / "run")
    assert done.returncode == 2 and "holds no rnnpipe dataset (thesis.tex" in done.stderr, done.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data"]
    assert (tmp_path / "run" / "data" / "thesis.tex").read_text() == "precious"


def test_missing_task_files_fail_before_any_fine_tune_job(run_dir):
    done = pipeline(run_dir, "finetune.tasks.sst2.dev=/nowhere/dev.tsv", dry=True)
    assert done.returncode == 2 and "tasks.sst2.dev=/nowhere/dev.tsv: no such file" in done.stderr


def test_every_output_records_its_code_and_versions(finished):
    prov = json.loads((finished / "data" / "provenance.json").read_text())
    commit = prov["code"]["git"]["commit"] if prov["code"]["git"] else None
    assert prov["versions"]["torch"] and prov["host"]
    pre = json.loads((finished / "pretrain" / "provenance.json").read_text())
    assert pre["world_size"] == 1 and len(pre["hosts"]) == 1 and pre["versions"]["deepspeed"]
    marker = json.loads((finished / "pretrain" / "checkpoints" / "step00000010" / "COMPLETE").read_text())
    assert marker["provenance"]["code"] == pre["code"] and len(marker["fingerprint"]) == 64
    export = json.loads((finished / "pretrain" / "export" / "rnnpipe.json").read_text())["source"]
    assert export["fingerprint"] == marker["fingerprint"] and export["provenance"]["code"] == pre["code"]
    r = result(finished, "ptb-pretrained-seed0")
    assert r["provenance"]["code"] == pre["code"] and r["provenance"]["versions"]["torch"]
    if commit:  # in a git checkout: the commit the code came from
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert commit == head.stdout.strip()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(finished / "pretrain" / "tensorboard")).Reload()
    assert "provenance/text_summary" in events.Tags()["tensors"]
    session = EventAccumulator(str(finished / "pretrain" / "tensorboard" / "hparams")).Reload()
    start = session.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert {"model.d_model", "optim.lr", "code.version", "code.dirty", "world_size", "fingerprint"} <= set(
        hparams
    )
    assert (
        hparams["model.d_model"].number_value == 32
        and hparams["fingerprint"].string_value == marker["fingerprint"][:12]
    )


def test_a_pipeline_chains_the_backward_lm_and_fine_tunes_elmo_on_both(tmp_path):
    """backward_lm: true trains the pretrain config again with data.direction=backward in
    <run_dir>/pretrain-backward; the finetune stage's elmo jobs read both exports; a re-run skips
    every stage."""
    run_dir = tmp_path / "run"
    elmo = [
        "backward_lm=true",
        "finetune.grid.task=[sst2]",
        "finetune.grid.init=[pretrained]",
        "finetune.job.head.features=elmo",
    ]
    plan = lines(pipeline(run_dir, *elmo, dry=True).stdout)
    done = pipeline(run_dir, *elmo)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = {line.split()[1]: line for line in done.stdout.splitlines() if line.startswith("== ")}
    assert "pretrain-backward:" in out and out["pretrain-backward:"].startswith("== pretrain-backward: run")
    assert plan["pretrain"].split()[1] == "run"
    fwd = json.loads((run_dir / "pretrain" / "export" / "rnnpipe.json").read_text())["source"]
    bwd = json.loads((run_dir / "pretrain-backward" / "export" / "rnnpipe.json").read_text())["source"]
    assert (fwd.get("direction", "forward"), bwd["direction"]) == ("forward", "backward")
    assert fwd["fingerprint"] != bwd["fingerprint"]
    res = result(run_dir, "sst2-pretrained-seed0")
    assert res["backward"]["sha256"] == bwd["weights_sha256"]
    again = pipeline(run_dir, *elmo, dry=True)
    assert again.returncode == 0 and "pretrain-backward skip" in again.stdout, again.stdout
    assert all(line.split()[1] == "skip" for line in lines(again.stdout).values()), again.stdout
