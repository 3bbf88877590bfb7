"""The chained pipeline without Slurm: config loading, the shell plan for slurm/pipeline.sh, the
sbatch options against what submitit submits, a failure on the local executor, and `make demo`.

The same pipeline on a real Slurm cluster: tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from launch import pipeline
from pipeline.errors import ConfigError
from tests.conftest import DATA, REPO, data_file, rnnpipe

QUICKSTART = REPO / "configs" / "pipeline" / "quickstart.yaml"


def test_stage_overrides_are_routed_and_the_pipeline_owns_the_paths(tmp_path):
    p = pipeline.load(
        str(QUICKSTART),
        [f"run_dir={tmp_path}", "pretrain.train.steps=7", "finetune.grid.seed=[0,1]", "prepare.output=/x"],
    )
    assert p.pretrain.train.steps == 7 and p.finetune.grid["seed"] == [0, 1]
    assert p.pretrain.distributed.nproc == 2  # the pipeline file's own stage overrides still apply
    assert p.prepare.output == str(tmp_path / "data")  # not /x: the run dir's layout is the pipeline's
    assert p.pretrain.data.path == p.prepare.output
    assert p.finetune.pretrained == str(tmp_path / "pretrain" / "export")
    assert {p.prepare.executor.kind.value, p.pretrain.executor.kind.value} == {"local"}
    slurm = pipeline.load(str(QUICKSTART), [f"run_dir={tmp_path}"], "slurm")
    assert slurm.finetune.executor.kind.value == "slurm"


def test_a_bad_stage_key_names_the_stage_and_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"pretrain stage .*'train\.stpes'.*did you mean 'steps'"):
        pipeline.load(str(QUICKSTART), [f"run_dir={tmp_path}", "pretrain.train.stpes=3"])
    assert rnnpipe("run", QUICKSTART, f"run_dir={tmp_path}", "finetune.grid.tsk=[a]") == 2
    assert "finetune stage" in capsys.readouterr().err
    assert not (tmp_path / "pipeline.json").exists()  # nothing ran


def _plan(tmp_path, *overrides: str) -> dict[str, object]:
    """Evaluate `rnnpipe plan` in bash as slurm/pipeline.sh does; returns the variables."""
    names = "RUN_DIR PREPARE_DONE PRETRAIN_DONE FINETUNE_INDICES FINETUNE_CONFIG"
    arrays = "PREPARE_SBATCH PRETRAIN_SBATCH FINETUNE_SBATCH FINETUNE_TASKS COLLECT_SBATCH"
    script = f"""
        set -euo pipefail
        eval "$("$RNNPIPE" plan "$@")"
        for v in {names}; do printf '%s=%s\\0' "$v" "${{!v}}"; done
        for a in {arrays}; do
            n="$a[@]"; printf '%s=' "$a"; printf '%s\\x1f' "${{!n}}"; printf '\\0'
        done
    """
    cmd = ["bash", "-c", script, "plan", str(QUICKSTART), f"run_dir={tmp_path / 'run'}", *overrides]
    env = {**os.environ, "RNNPIPE": str(REPO / ".venv" / "bin" / "rnnpipe")}
    if not os.path.exists(env["RNNPIPE"]):
        env["RNNPIPE"] = "rnnpipe"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out: dict[str, object] = {}
    for item in done.stdout.split("\0")[:-1]:
        key, _, value = item.partition("=")
        out[key] = value.split("\x1f")[:-1] if key in arrays.split() else value
    return out


def test_plan_quotes_every_value_taken_from_a_config(tmp_path):
    hostile = "a b; $(touch PWNED) `touch PWNED2` \"q\" 'r' \\ $HOME"
    v = _plan(
        tmp_path,
        f"pretrain.executor.slurm.extra.comment={json.dumps(hostile)}",
        "slurm.partition=gpu queue",
        "finetune.grid.seed=[0,1]",
    )
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED2").exists()
    assert f"--comment={hostile}" in v["PRETRAIN_SBATCH"]  # one word, byte for byte
    assert "--partition=gpu queue" in v["PREPARE_SBATCH"] and "--partition=gpu queue" in v["COLLECT_SBATCH"]
    assert v["RUN_DIR"] == str(tmp_path / "run") and v["PREPARE_DONE"] == "0"
    inits = ("pretrained", "scratch")
    expected = [f"{t}-{i}-seed{s}" for t in ("sst2", "conll", "ptb") for i in inits for s in (0, 1)]
    assert v["FINETUNE_TASKS"] == expected
    assert v["FINETUNE_INDICES"] == ",".join(str(i) for i in range(12))
    assert {"--nodes=1", "--ntasks-per-node=2", "--signal=USR2@120", "--requeue"} <= set(v["PRETRAIN_SBATCH"])
    # the stage files the jobs run hold the resolved stage configs
    stage = (tmp_path / "run" / "stages" / "pretrain.yaml").read_text()
    assert f"run_dir: {tmp_path / 'run' / 'pretrain'}" in stage and "nproc: 2" in stage


def _sbatch_lines(text: str) -> set[str]:
    return {m for m in re.findall(r"^#SBATCH (\S+)", text, flags=re.M)}


def test_sbatch_options_are_what_the_submitit_launcher_submits(tmp_path, monkeypatch):
    """slurm/pipeline.sh and `rnnpipe run --executor slurm` ask Slurm for the same resources."""
    from launch import pretrain
    from launch.executors import SlurmExecutor
    from launch.slurm import sbatch_flags

    monkeypatch.setattr("shutil.which", lambda name, *a, **k: f"/usr/bin/{name}")  # no Slurm needed
    p = pipeline.load(
        str(QUICKSTART),
        [
            f"run_dir={tmp_path}",
            "pretrain.distributed.nodes=4",
            "pretrain.distributed.gpus_per_node=8",
            "pretrain.executor.slurm.partition=gpu",
            "pretrain.executor.slurm.mem_gb=400",
            "pretrain.executor.slurm.extra.exclusive=''",
        ],
        "slurm",
    )
    ex = pretrain.slurm_executor(p.pretrain, str(tmp_path / "%j"))
    theirs = _sbatch_lines(ex._make_submission_file_text("python -c 1", "uid"))
    ours = sbatch_flags(
        p.pretrain.executor.slurm,
        nodes=4,
        ntasks_per_node=8,
        gpus_per_node=8,
        signal=f"USR2@{p.pretrain.distributed.signal_grace_s}",
        requeue=True,
    )
    assert set(ours) <= theirs, set(ours) - theirs
    ft = SlurmExecutor(p.finetune.executor.slurm, str(tmp_path)).submitit_executor("finetune")
    theirs = _sbatch_lines(ft._make_submission_file_text("python -c 1", "uid"))
    ours = sbatch_flags(p.finetune.executor.slurm)
    assert set(ours) <= theirs, set(ours) - theirs


def test_a_failed_stage_stops_the_local_pipeline_and_status_names_it(tmp_path, capsys):
    missing = tmp_path / "no-such-corpus.txt"
    run_dir = tmp_path / "run"
    assert rnnpipe("-q", "run", QUICKSTART, f"run_dir={run_dir}", f"prepare.source.paths=[{missing}]") == 1
    assert str(missing) in capsys.readouterr().err
    assert rnnpipe("status", run_dir) == 1
    out = capsys.readouterr().out
    assert re.search(r"prepare\s+FAILED", out) and str(missing) in out
    for later in ("pretrain", "finetune", "collect"):
        assert re.search(rf"{later}\s+CANCELLED\s+prepare failed", out), out
    assert not (run_dir / "data" / "manifest.json").exists() and not (run_dir / "pretrain").exists()


@pytest.mark.slow
def test_make_demo_runs_the_whole_pipeline_and_prints_the_table(tmp_path):
    """What the README promises on a fresh machine (make's install step is already done here)."""
    for name in ("enwik8-head/enwik8-head.txt", "sst2", "conll2003", "ptb"):
        data_file(name)
    out = tmp_path / "demo"
    cmd = ["make", "-s", "demo", f"DEMO_OUT={out}", f"DATA={DATA}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    header = "| task | init | hyper-parameters | seeds | metric | dev | test |"
    assert header in done.stdout and f"tensorboard --logdir {out}" in done.stdout
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| (sst2|conll|ptb) \|", line)]
    assert len(rows) == 6  # 3 tasks × {pretrained, scratch}
    assert json.loads((out / "pretrain" / "export" / "config.json").read_text())["source"]["step"] == 200
    # again: every stage is complete and skipped, and the table is printed again
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("prepare", "pretrain", "finetune"):
        assert f"== {stage}: complete, skipped" in again.stdout
    assert header in again.stdout
