"""The chained pipeline without Slurm: the launch package's shape, config loading, the shell plan
for slurm/pipeline.sh, the sbatch options against what submitit submits, a failure on the local
executor. `make demo` itself: tests/package/test_demo.py.

Re-runs, fingerprints and --dry-run: tests/integration/launch/test_rerun.py. On a real Slurm
cluster: tests/cluster/test_slurm.py.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import DATA, REPO, data_file, rnnpipe

from rnnpipe.launch.chain import workflow
from rnnpipe.pipeline.errors import ConfigError

QUICKSTART = REPO / "configs" / "pipeline" / "quickstart.yaml"


def _launch_imports() -> dict[str, set[str]]:
    """{launch module: the launch modules it imports, at the top or inside a function}."""
    graph = {}
    for path in sorted((REPO / "launch").rglob("*.py")):
        name = "rnnpipe." + ".".join(path.relative_to(REPO).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "rnnpipe.launch":
                deps |= {f"rnnpipe.launch.{a.name}" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rnnpipe.launch."):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("rnnpipe.launch.")}
        graph[name] = deps - {name}
    return graph


# launch/'s rooms, each importing only those before it (docs/contributing.md)
ROOMS = ("processes", "stages", "chain", "commands")


def test_launch_rooms_import_only_downwards():
    for module, deps in _launch_imports().items():
        room = (module.split(".") + [""] * 3)[2]
        if room not in ROOMS:  # the package, cli.py and __main__.py: the top
            continue
        allowed = set(ROOMS[: ROOMS.index(room) + 1])
        upward = {d for d in deps if (d.split(".") + [""] * 3)[2] not in allowed}
        assert not upward, f"{module} imports {sorted(upward)}, a room above its own ({room})"


def test_launch_has_no_import_cycle_and_each_module_imports_alone(tmp_path):
    graph = _launch_imports()
    assert len(graph) > 20 and all(deps <= set(graph) for deps in graph.values())
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        visit(m, [])
    imported = set().union(*(d for m, d in graph.items() if m != "rnnpipe.launch.__main__"))
    assert "rnnpipe.launch.cli" not in imported
    modules = [m for m in graph if m != "rnnpipe.launch.__main__"]
    # one Python per module (each alone), from a directory that is not the checkout
    script = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n    print(m)"
    for m in modules:
        done = subprocess.run(
            [sys.executable, "-P", "-c", script, m], capture_output=True, text=True, cwd=tmp_path
        )
        assert done.returncode == 0, (m, done.stderr[-2000:])


def test_every_stage_has_the_same_interface():
    import inspect

    assert [s.NAME for s in workflow.STAGES] == [
        "prepare",
        "pretrain",
        "pretrain-backward",
        "finetune",
        "collect",
    ]
    for stage in workflow.STAGES:
        for name, params in {
            "check": ["job", "upstream"],
            "fingerprint": ["job"],
            "is_complete": ["job"],
            "plan": ["job", "upstream"],
            "run": ["job", "decision"],
            "submit": ["job", "decision", "ctx"],
            "wire": ["ctx"],
            "slurm_shape": ["job", "small"],
        }.items():
            assert list(inspect.signature(getattr(stage, name)).parameters) == params, (stage.NAME, name)
        assert isinstance(stage.Job, type)


def test_stage_overrides_are_routed_and_the_pipeline_owns_the_paths(tmp_path):
    p = workflow.load(
        str(QUICKSTART),
        [f"run_dir={tmp_path}", "pretrain.train.steps=7", "finetune.grid.seed=[0,1]", "prepare.output=/x"],
    )
    pre, fine = p.jobs["pretrain"], p.jobs["finetune"]
    assert pre.train.steps == 7 and fine.grid["seed"] == [0, 1]
    assert pre.distributed.nproc == 2  # the pipeline file's own stage overrides still apply
    assert p.jobs["prepare"].output == str(
        tmp_path / "data"
    )  # not /x: the run dir's layout is the pipeline's
    assert pre.data.path == p.jobs["prepare"].output
    assert fine.pretrained == str(tmp_path / "pretrain" / "export")
    assert p.jobs["collect"].sweep is fine
    assert {p.jobs["prepare"].executor.kind.value, pre.executor.kind.value} == {"local"}
    slurm = workflow.load(str(QUICKSTART), [f"run_dir={tmp_path}"], "slurm")
    assert slurm.jobs["finetune"].executor.kind.value == "slurm"


def test_a_bad_stage_key_names_the_stage_and_the_key(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"pretrain stage .*'train\.stpes'.*did you mean 'steps'"):
        workflow.load(str(QUICKSTART), [f"run_dir={tmp_path}", "pretrain.train.stpes=3"])
    assert rnnpipe("run", QUICKSTART, f"run_dir={tmp_path}", "finetune.grid.tsk=[a]") == 2
    assert "finetune stage" in capsys.readouterr().err
    assert not (tmp_path / "pipeline.json").exists()  # nothing ran


def _plan(tmp_path, *overrides: str) -> dict[str, dict[str, object]]:
    """Evaluate `rnnpipe plan` in bash as slurm/pipeline.sh does; returns each stage's variables
    (``STAGE_<i>_X`` as ``{name: {"X": value}}``) and the pipeline's (under "")."""
    fields = "NAME RUN CONFIG SCRIPT SETUP LOG ARRAY"
    arrays = "SBATCH TASKS"
    script = f"""
        set -euo pipefail
        eval "$("$RNNPIPE" plan "$@")"
        for v in RUN_DIR CODE; do printf '%s=%s\\0' "$v" "${{!v}}"; done
        for i in "${{!STAGES[@]}}"; do
            for f in {fields}; do v=STAGE_${{i}}_$f; printf '%s.%s=%s\\0' "$i" "$f" "${{!v}}"; done
            for f in {arrays}; do
                n="STAGE_${{i}}_$f[@]"; printf '%s.%s=' "$i" "$f"; printf '%s\\x1f' "${{!n}}"; printf '\\0'
            done
        done
    """
    for name in ("sst2", "conll2003", "ptb"):  # the plan checks that the task files exist
        data_file(name)
    cmd = ["bash", "-c", script, "plan", str(QUICKSTART), f"run_dir={tmp_path / 'run'}", *overrides]
    cmd.append(f"finetune.data_root={DATA}")
    fake = tmp_path / "bin"  # the cluster's partitions, as sinfo would list them
    fake.mkdir(exist_ok=True)
    (fake / "sinfo").write_text("#!/bin/sh\nprintf 'debug\\ngpu queue\\n'\n")
    (fake / "sinfo").chmod(0o755)
    env = {**os.environ, "RNNPIPE": str(REPO / ".venv" / "bin" / "rnnpipe")}
    env["PATH"] = f"{fake}:{env['PATH']}"
    if not os.path.exists(env["RNNPIPE"]):
        env["RNNPIPE"] = "rnnpipe"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    flat: dict[str, object] = {}
    for item in done.stdout.split("\0")[:-1]:
        key, _, value = item.partition("=")
        flat[key] = value.split("\x1f")[:-1] if key.split(".")[-1] in arrays.split() else value
    out: dict[str, dict[str, object]] = {"": {k: v for k, v in flat.items() if "." not in k}}
    for key, value in flat.items():
        if "." in key:
            i, field = key.split(".")
            out.setdefault(str(flat[f"{i}.NAME"]), {})[field] = value
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
    assert list(v) == ["", "prepare", "pretrain", "finetune", "collect"]
    assert f"--comment={hostile}" in v["pretrain"]["SBATCH"]  # one word, byte for byte
    assert "--partition=gpu queue" in v["prepare"]["SBATCH"]
    assert "--partition=gpu queue" in v["collect"]["SBATCH"]
    assert v[""]["RUN_DIR"] == str(tmp_path / "run") and v["prepare"]["RUN"] == "1"
    inits = ("pretrained", "scratch")
    expected = [f"{t}-{i}-seed{s}" for t in ("sst2", "conll", "ptb") for i in inits for s in (0, 1)]
    assert v["finetune"]["TASKS"] == expected
    assert v["finetune"]["ARRAY"] == ",".join(str(i) for i in range(12)) + "%256"
    assert {"--nodes=1", "--ntasks-per-node=2", "--signal=USR2@120", "--requeue"} <= set(
        v["pretrain"]["SBATCH"]
    )
    assert "--signal=B:USR2@90" in v["finetune"]["SBATCH"]
    assert v["pretrain"]["RUN"] == v["collect"]["RUN"] == "1"
    assert [v[s]["SCRIPT"] for s in list(v)[1:]] == [
        "prepare.sbatch",
        "pretrain.sbatch",
        "finetune.sbatch",
        "collect.sbatch",
    ]
    assert (
        v["collect"]["CONFIG"]
        == v["finetune"]["CONFIG"]
        == str(tmp_path / "run" / "stages" / "finetune.yaml")
    )
    # the stage files the jobs run hold the resolved stage configs
    stage = (tmp_path / "run" / "stages" / "pretrain.yaml").read_text()
    assert f"run_dir: {tmp_path / 'run' / 'pretrain'}" in stage and "nproc: 2" in stage
    # the jobs run a snapshot of the code: its rnnpipe command runs, from the snapshot
    code = Path(v[""]["CODE"])
    assert code.parent.parent == tmp_path / "run" / "slurm"
    assert (code / "rnnpipe" / "launch" / "cli.py").exists()
    assert (code / "rnnpipe" / "slurm" / "common.sh").exists()
    assert sorted(p.name for p in code.iterdir()) == ["SNAPSHOT.json", "bin", "rnnpipe", "submitit_job.py"]
    marker = json.loads((code / "SNAPSHOT.json").read_text())
    assert code.name == f"code-{marker['digest'][:12]}"
    where = subprocess.run(
        [str(code / "bin" / "rnnpipe"), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert where.returncode == 0 and "rnnpipe" in where.stdout, where.stderr


def test_plain_sbatch_chains_the_backward_lm_as_its_own_stage(tmp_path):
    """backward_lm: slurm/pipeline.sh runs every stage the pipeline has: the backward LM is the
    pretrain script on its own resolved config, after the forward run."""
    v = _plan(tmp_path, "backward_lm=true")
    assert list(v) == ["", "prepare", "pretrain", "pretrain-backward", "finetune", "collect"]
    back = v["pretrain-backward"]
    assert back["SCRIPT"] == "pretrain.sbatch" and back["RUN"] == "1"
    assert back["CONFIG"] == str(tmp_path / "run" / "stages" / "pretrain-backward.yaml")
    assert "direction: backward" in Path(str(back["CONFIG"])).read_text()
    # the same shape, its own name and log
    named = ("--job-name=", "--output=")
    assert [o for o in back["SBATCH"] if not o.startswith(named)] == [
        o for o in v["pretrain"]["SBATCH"] if not o.startswith(named)
    ]
    assert "--job-name=rnnpipe-pretrain-backward" in back["SBATCH"]
    assert back["LOG"].endswith("/logs/pretrain-backward-%j.out")


def _sbatch_lines(text: str) -> set[str]:
    return {m for m in re.findall(r"^#SBATCH (\S+)", text, flags=re.M)}


def test_sbatch_options_are_what_the_submitit_launcher_submits(tmp_path, monkeypatch):
    """slurm/pipeline.sh and `rnnpipe run --executor slurm` ask Slurm for the same resources."""
    from rnnpipe.launch.processes.executors import SlurmExecutor
    from rnnpipe.launch.processes.slurm import sbatch_flags
    from rnnpipe.launch.stages import pretrain

    monkeypatch.setattr("shutil.which", lambda name, *a, **k: f"/usr/bin/{name}")  # no Slurm needed
    p = workflow.load(
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
    ex = pretrain.slurm_executor(p.jobs["pretrain"], str(tmp_path / "%j"))
    theirs = _sbatch_lines(ex._make_submission_file_text("python -c 1", "uid"))
    ours = sbatch_flags(
        p.jobs["pretrain"].executor.slurm,
        nodes=4,
        ntasks_per_node=8,
        gpus_per_node=8,
        signal=f"USR2@{p.jobs['pretrain'].distributed.signal_grace_s}",
        requeue=True,
    )
    assert set(ours) <= theirs, set(ours) - theirs
    ft = SlurmExecutor(p.jobs["finetune"].executor.slurm, str(tmp_path)).submitit_executor("finetune")
    theirs = _sbatch_lines(ft._make_submission_file_text("python -c 1", "uid"))
    ours = sbatch_flags(p.jobs["finetune"].executor.slurm)
    assert set(ours) <= theirs, set(ours) - theirs


def test_a_failed_stage_stops_the_local_pipeline_and_status_names_it(tmp_path, capsys):
    for name in ("sst2", "conll2003", "ptb"):  # the fine-tune stage's files are checked first
        data_file(name)
    missing = tmp_path / "no-such-corpus.txt"
    run_dir = tmp_path / "run"
    args = [
        "run",
        QUICKSTART,
        f"run_dir={run_dir}",
        f"prepare.source.paths=[{missing}]",
        f"finetune.data_root={DATA}",
    ]
    assert rnnpipe(*args, "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"prepare   run   no dataset yet in {run_dir / 'data'}; missing input: {missing}" in out
    assert rnnpipe("-q", *args) == 1
    assert str(missing) in capsys.readouterr().err
    assert rnnpipe("status", run_dir) == 1
    out = capsys.readouterr().out
    assert re.search(r"prepare\s+FAILED", out) and str(missing) in out
    for later in ("pretrain", "finetune", "collect"):
        assert re.search(rf"{later}\s+CANCELLED\s+prepare failed", out), out
    assert not (run_dir / "data" / "manifest.json").exists() and not (run_dir / "pretrain").exists()
