"""benchmarks/gpu_check.py --dry-run: the GPU check's code paths at tiny shapes on CPU (Triton's
interpreter, gloo, a 2-layer model, a few steps), writing its markdown table and JSON with every
section present and passing; and the parts of its GPU-only paths that a CPU can check (the
profile's split of device time, the start section's CUDA expectations, the time limits)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from harness import DATA, REPO, benchmark

SECTIONS = ("start", "kernels", "mingru_bf16", "speed", "lm", "loop", "resume", "compile", "shuffle", "twin")
# The dry run in two processes at once (each its own --out and --work), about as much CPU time
# each: the interpreter's sections and the resume's runs beside the loop's (which compile and
# shuffle compare with) and the twin's: on two cores, sooner than one after the other.
SPLIT = ("start,kernels,mingru_bf16,speed,lm,resume", "loop,compile,shuffle,twin")
pytest.importorskip("triton", reason="Triton is not installed (it is Linux-only)")


def merged(reports: list[dict]) -> dict:
    """One report of the split dry runs: each section from the run that ran it."""
    sections = {}
    for report in reports:
        sections |= {k: v for k, v in report["sections"].items() if v["status"] != "skipped"}
    return {
        "dry_run": all(r["dry_run"] for r in reports),
        "all_passed": all(r["all_passed"] for r in reports),
        "total_s": max(r["total_s"] for r in reports),
        "budget_s": min(r["budget_s"] for r in reports),
        "sections": sections,
    }


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[dict, str]:
    env = {**os.environ, "RNNPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RNNPIPE_KERNELS", None)
    data = DATA / "tinyshakespeare" / "input.txt"
    runs = []
    for sections in SPLIT:
        out = tmp_path_factory.mktemp("gpu_check")
        cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)]
        cmd += ["--sections", sections]
        if data.is_file():  # else the dry run writes a synthetic text
            cmd += ["--data", str(data)]
        log = (out / "log.txt").open("w")
        runs.append(
            (out, log, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        )
    try:
        for out, log, proc in runs:
            proc.wait(timeout=420)
            log.close()
            assert proc.returncode == 0, (out / "log.txt").read_text()[-6000:]
    finally:
        for _, _, proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    reports = [json.loads((out / "gpu_check.json").read_text()) for out, _, _ in runs]
    return merged(reports), "\n".join((out / "gpu_check.md").read_text() for out, _, _ in runs)


@pytest.mark.slow
def test_every_section_ran_and_passed(dry_run):
    report, md = dry_run
    assert report["dry_run"] is True and report["all_passed"] is True
    assert report["total_s"] <= report["budget_s"]
    assert set(report["sections"]) == set(SECTIONS)
    for name in SECTIONS:
        sec = report["sections"][name]
        assert sec["status"] == "ok", (name, sec["error"])
        assert sec["rows"] and sec["checks"], name
        assert all(c["pass"] for c in sec["checks"]), (name, [c for c in sec["checks"] if not c["pass"]])
        assert sec["seconds"] <= sec["limit_s"]
    for title in ("(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)", "(h)", "(i)", "(j)"):
        assert f"## {title}" in md
    assert "| mean \\|h\\| fp32 |" in md  # a column name with a bar keeps the table's columns


@pytest.mark.slow
def test_kernel_errors_within_tolerance(dry_run):
    """Every op, both dtypes, values and gradients, from the JSON's own numbers."""
    report, md = dry_run
    rows = report["sections"]["kernels"]["rows"]
    assert {r["op"] for r in rows} == {"linear_scan", "lrn", "olrn", "sru"}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert {r["h0"] for r in rows} == {"yes", "no"}
    for r in rows:
        assert r["pass"] is True
        for key in ("value rel", "grad rel"):
            assert 0 <= r[key] <= r["tol"], r
        if r["dtype"] == "float32":  # the same fp32 arithmetic up to rounding order
            assert r["value rel"] < 1e-5 and r["grad rel"] < 1e-5, r
    assert md.count("| pass |") >= len(rows)


@pytest.mark.slow
def test_speed_peers_and_training_numbers(dry_run):
    report, _ = dry_run
    speed = report["sections"]["speed"]
    assert speed["copy_gbs"] > 0
    ours = [r for r in speed["rows"] if r["op"] in ("linear_scan", "lrn_recurrence")]
    assert ours and all(r["ms"] > 0 and r["GB/s"] > 0 for r in ours)
    peers = [r for r in speed["rows"] if r.get("equal") is not None]
    # The dry run's stand-ins compute the peers' documented recurrences from our converted inputs.
    assert {r["op"] for r in peers} == {"fla chunk_hgrn", "fla fused_recurrent_hgrn", "accelerated-scan warp"}
    assert all(r["equal"] and r["rel vs ours"] <= 3e-2 for r in peers)
    lm = report["sections"]["lm"]["rows"]
    assert [r["config"] for r in lm] == ["enwik8-50m.yaml", "wiki-350m.yaml"]
    for r in lm:
        assert r["tokens/s"] > 0 and math.isfinite(r["loss"]) and r["estimate GiB (1 GPU)"] > 0
        assert r["docs estimate"].endswith(")"), r  # found in docs/pretrain.md's table
    (twin,) = report["sections"]["twin"]["rows"]
    assert twin["steps"] >= 1
    assert math.isfinite(twin["valid loss (carried)"]) and math.isfinite(twin["valid loss (256-windows)"])
    assert twin["nanoGPT"] == 1.4697


@pytest.mark.slow
def test_a_second_rank_with_one_visible_device_starts(dry_run):
    """LOCAL_RANK=1 and SLURM_LOCALID=1 with one visible device: init() set the layout from Slurm's
    variables, gave the process group the explicit timeout, and the preflight found nothing."""
    report, _ = dry_run
    start = report["sections"]["start"]
    found = start["found"]
    assert found["env"] == {"LOCAL_RANK": "1", "SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "0"}
    assert found["layout"] == {"source": "slurm", "rank": 0, "local_rank": 1, "world": 1}
    assert found["device"] == "cpu" and found["backend"] == "gloo"
    assert found["timeout_passed_s"] == 450 and found["timeout_held_s"] in (450, None)
    assert found["all_reduce"]["value"] == 1.0
    for part in ("check_gpus", "check_triton_launcher", "check_nccl"):
        assert found[part]["findings"] == [], part
    assert [r["what"] for r in start["rows"]][:3] == ["rank starts", "process group", "explicit timeout"]


@pytest.mark.slow
def test_loop_resume_compile_and_shuffle_numbers(dry_run):
    """The real loop's rows: both ZeRO stages with a profile, the resume bit for bit, the compiled
    and shuffle-mode runs beside the loop's ZeRO-0 speed."""
    report, _ = dry_run
    sections = report["sections"]
    loop = sections["loop"]["rows"]
    assert [r["run"] for r in loop] == ["enwik8-50m.yaml, ZeRO-0", "enwik8-50m.yaml, ZeRO-1"]
    for r in loop:
        assert r["tokens/s"] > 0 and r["step (ms)"] > 0 and math.isfinite(r["loss"])
        assert r["profile"].startswith("CPU time of operators, steps 5-6"), r
        for cat in ("recurrence", "matmul", "optimizer", "other"):
            assert r[f"{cat} (ms)"] > 0, (cat, r)  # each category found in the loop's own operators
        assert r["host (ms)"] >= 0 and r["estimate GiB"] > 0
    before, after = sections["resume"]["rows"]
    assert before["steps"] == "1-3" and after["steps"] == "4-6"
    assert before["equal bit for bit"] is True and after["equal bit for bit"] is True
    # killed once its checkpoint of step 3 was complete (the next step's line may have come first)
    assert after["max |Δ|"] == 0 and 3 <= after["stopped at step (logged)"] < 6
    losses = sections["resume"]["losses"]
    assert sorted(int(s) for s in losses["stopped and resumed"]) == list(range(1, 7))
    (compiled,) = sections["compile"]["rows"]
    assert compiled["run"].endswith("(aot_eager)") and compiled["tokens/s"] > 0
    assert compiled["uncompiled tokens/s (loop, ZeRO-0)"] == loop[0]["tokens/s"] and compiled["speed-up"] > 0
    assert compiled["loss, last window"] < compiled["loss, first window"]
    (shuffle,) = sections["shuffle"]["rows"]
    assert shuffle["run"].endswith("2 workers") and shuffle["tokens/s"] > 0
    assert shuffle["stream-mode tokens/s (loop, ZeRO-0)"] == loop[0]["tokens/s"]


@pytest.mark.slow
def test_min_rnn_rows(dry_run):
    report, _ = dry_run
    rows = report["sections"]["mingru_bf16"]["rows"]
    assert [r["layer"] for r in rows] == ["mingru", "minlstm"]
    for r in rows:
        assert 0.95 < r["ratio"] < 1.05 and r["carried state"] == "float32" and r["pass"] is True


# ------------------------------------------------------------------- the GPU paths, checked on CPU


def test_profile_splits_device_time_by_the_launching_operator():
    """summarize() on CUDA-like events: each kernel goes to the category of the operator that
    launched it (the optimizer's range first), unlinked ones by name; device-side annotations are
    not counted; busy time is the union of the kernels' intervals."""
    from torch.autograd import DeviceType

    profile = benchmark("gpu_check_profile")

    def op(id_, name, parent=None):
        return SimpleNamespace(
            id=id_,
            name=name,
            cpu_parent=parent,
            device_type=DeviceType.CPU,
            is_async=False,
            linked_correlation_id=0,
        )

    def kernel(name, start, end, linked=0, annotation=False):
        return SimpleNamespace(
            name=name,
            device_type=DeviceType.CUDA,
            is_async=False,
            is_user_annotation=annotation,
            linked_correlation_id=linked,
            time_range=SimpleNamespace(start=start, end=end),
        )

    step = op(1, profile.OPTIMIZER_RANGE)
    events = [
        op(2, "rnnpipe::lrn_packed"),
        op(3, "aten::addmm", op(9, "aten::linear")),
        op(4, "aten::mul_", step),  # AdamW's arithmetic, under the engine's step
        op(5, "aten::mm", step),  # a product under the step is the optimizer's
        op(6, "aten::gelu"),
        kernel("_lrn_fwd_kernel", 0, 400, linked=2),
        kernel("nvjet_tst_128x256", 400, 700, linked=3),
        kernel("multi_tensor_apply_kernel", 700, 800, linked=4),
        kernel("ampere_sgemm", 800, 850, linked=5),
        kernel("elementwise_kernel", 850, 900, linked=6),
        kernel("_scan_kernel", 1000, 1200),  # unlinked: by its name
        kernel("sm90_xmma_gemm", 1100, 1300),
        kernel("gpu_check::optimizer", 700, 900, annotation=True),  # the range's device copy
    ]
    s = profile.summarize(events, steps=2)
    assert s["basis"] == "device time"
    assert s["ms"] == pytest.approx({"recurrence": 0.3, "matmul": 0.25, "optimizer": 0.075, "other": 0.025})
    assert s["busy_ms"] == pytest.approx(1.2 / 2)  # 0-900 and 1000-1300 µs
    assert s["top"][0][:2] == ["_lrn_fwd_kernel", "recurrence"]


def test_the_start_rows_expect_cuda_0_and_nccl_on_a_gpu():
    start = benchmark("gpu_check_start")
    found = {
        "env": {"LOCAL_RANK": "1", "SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "3"},
        "visible": 1,
        "choice": {"1 of 1": 0, "1 of 8": 1, "3 of 2": "refused"},
        "layout": {"source": "slurm", "rank": 0, "local_rank": 1, "world": 1},
        "master": "localhost:15001",
        "init_s": 2.0,
        "device": "cuda:0",
        "device_name": "NVIDIA H100 80GB HBM3",
        "backend": "nccl",
        "timeout_passed_s": 450.0,
        "timeout_held_s": 450.0,
        "all_reduce": {"value": 1.0, "device": "cuda:0"},
        "tasks_on_node": 2,
        "nccl_env": {"NCCL_DEBUG": "INFO"},
        **{p: {"findings": [], "s": 0.1} for p in ("check_gpus", "check_triton_launcher", "check_nccl")},
    }
    assert all(ok for _, _, ok in start.start_rows(found, cuda=True))
    assert not all(ok for _, _, ok in start.start_rows(found, cuda=False))  # a CPU run must not pick cuda:0
    wrong = {**found, "device": "cuda:1", "timeout_passed_s": 600.0}
    assert [what for what, _, ok in start.start_rows(wrong, cuda=True) if not ok] == [
        "rank starts",
        "explicit timeout",
    ]
    found["check_nccl"] = {"findings": ["NCCL_SOCKET_IFNAME=ib9 names no interface"], "s": 0.0}
    assert [what for what, _, ok in start.start_rows(found, cuda=True) if not ok] == ["preflight check_nccl"]


def test_the_probe_rank_is_a_slurm_task_whose_rendezvous_port_is_free(monkeypatch):
    start = benchmark("gpu_check_start")
    from rnnpipe.launch.processes.distributed import PORT_BASE, PORT_SPAN, detect

    monkeypatch.setenv("RANK", "5")  # a stray export: removed for the probe
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    changes = start.rank_env(cuda=False)
    assert changes["RANK"] is None and changes["SLURM_ARRAY_TASK_ID"] is None
    env = {k: v for k, v in {**os.environ, **changes}.items() if v is not None}
    d = detect(env)
    assert (d.source, d.rank, d.local_rank, d.world_size, d.master_addr) == ("slurm", 0, 1, 1, "localhost")
    assert PORT_BASE <= d.master_port < PORT_BASE + PORT_SPAN
    assert "SLURM_GPUS_ON_NODE" not in env and start.rank_env(cuda=True)["SLURM_GPUS_ON_NODE"] == "2"


def test_section_limits_fit_8_minutes():
    """The nominal seconds sum to the default budget; a section may overrun its nominal seconds
    only while the later ones keep most of theirs; the twin takes what is left."""
    gpu_check = benchmark("gpu_check")
    nominal = {name: s for name, _, s in gpu_check.SECTIONS}
    assert sum(nominal.values()) <= 450
    for name, seconds in nominal.items():  # the module's docstring states each
        assert f"``{name}`` ({seconds:.0f} s" in gpu_check.__doc__, name
    wanted = set(nominal)
    i = [n for n, _, _ in gpu_check.SECTIONS].index("loop")
    later = sum(s for n, s in nominal.items() if list(nominal).index(n) > i)
    assert gpu_check.section_limit(i, wanted, 450.0, dry=False) == 1.5 * nominal["loop"]
    squeezed = gpu_check.section_limit(i, wanted, later + 20.0, dry=False)
    assert squeezed == max(0.5 * nominal["loop"], later + 20.0 - 0.7 * later)
    assert gpu_check.section_limit(len(nominal) - 1, wanted, 33.0, dry=False) == 33.0  # the twin
    assert gpu_check.section_limit(i, {"loop"}, 450.0, dry=True) == 2 * 1.5 * nominal["loop"]


def test_loop_row_sets_host_time_against_the_device_busy_time(tmp_path):
    loop = benchmark("gpu_check_loop")
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for step in range(5, 31, 5):  # steps 21-25 profiled: their window and the first are left out
        ms = 200.0 if step in (5, 25) else 50.0
        rec = {"step": step, "train/tokens_per_s": 32768 / ms * 1e3, "train/step_time_s": ms / 1e3}
        lines.append(json.dumps({**rec, "train/mfu": 0.3, "train/memory_gb": 9.5, "train/loss": 3.0}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    profile = tmp_path / "profile.json"
    ms = {"recurrence": 10.0, "matmul": 25.0, "optimizer": 5.0, "other": 4.0}
    summary = {"basis": "device time", "ms": ms, "busy_ms": 44.0, "first_step": 21, "last_step": 25}
    profile.write_text(json.dumps({**summary, "top": [["nvjet", "matmul", 20.0]]}))
    row = loop.loop_row(run, 5, profile, (20, 25))
    assert row["step (ms)"] == pytest.approx(50.0) and row["tokens/s"] == pytest.approx(32768 / 0.05)
    assert row["host (ms)"] == pytest.approx(6.0) and row["MFU"] == "30.0 %" and row["peak GiB"] == 9.5
    assert loop.windows(run, 5, (20, 25))[1] == [json.loads(line) for line in lines[1:3] + lines[5:]]


def test_needs_the_flag_on_the_command_line(tmp_path):
    """--dry-run sets TRITON_INTERPRET before imports: main() refuses it from elsewhere."""
    gpu_check = benchmark("gpu_check")

    assert not gpu_check.DRY_RUN  # pytest's command line has no --dry-run
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path), "--dry-run"])
    assert e.value.code == 2
    assert not (Path(tmp_path) / "gpu_check.json").exists()
