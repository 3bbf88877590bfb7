"""``rnnpipe plot`` and the benchmarks' chart helpers: PNGs of a known pixel size, labels, errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from harness import benchmark, rnnpipe

from rnnpipe.launch.commands import plot

pytest.importorskip("matplotlib")

WIDTH, HEIGHT = round(plot.FIGSIZE[0] * plot.DPI), round(plot.FIGSIZE[1] * plot.DPI)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk (the first, right after the 8-byte signature)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", head[16:24])


def config_yaml(mixer: str, layers: int = 2, width: int = 64, attention_every: int = 0) -> str:
    return (
        "data:\n  seq_len: 32\n  batch_size: 4\n"
        f"model:\n  mixer: {mixer}\n  n_layers: {layers}\n  d_model: {width}\n"
        f"  attention_every: {attention_every}\n"
        "train:\n  grad_accum: 1\ndistributed:\n  nproc: 2\n  nodes: 1\n"
    )


def write_run(run_dir: Path, mixer: str, steps: int = 100, tokens_per_step: int = 256, **model) -> Path:
    """A pretrain run dir as pretrain leaves it: config.yaml and metrics.jsonl (train, valid, test)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_yaml(mixer, **model))
    lines = []
    for step in range(10, steps + 1, 10):
        bpb = 2.0 + 6.0 / step**0.5
        seen = step * tokens_per_step
        lines.append({"step": step, "time": 0.0, "train/bpb": bpb, "train/tokens_seen": seen})
        if step % 50 == 0:
            lines.append({"step": step, "time": 0.0, "valid/bpb": bpb + 0.1, "valid/ppl": 4.0})
    lines.append({"step": steps, "time": 0.0, "test/loss": 1.5, "test/bpb": 2.5, "test/ppl": 4.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir


def test_plot_writes_png_of_known_size(tmp_path, capsys):
    a = write_run(tmp_path / "a", "lrn")
    b = write_run(tmp_path / "b", "mingru", steps=200, tokens_per_step=512)
    out = tmp_path / "fig" / "loss.png"
    assert rnnpipe("plot", a, b, "--out", out, "--title", "two mixers") == 0
    assert png_size(out) == (WIDTH, HEIGHT) == (800, 450)
    assert str(out) in capsys.readouterr().out
    assert not list(out.parent.glob("*.partial"))  # written under a temp name, then renamed


def test_labels_come_from_the_model():
    assert plot.run_label({"model": {"mixer": "mingru", "n_layers": 4, "d_model": 256}}) == "mingru, 4×256"
    hybrid = {"model": {"mixer": "lrn", "attention_every": 3, "n_layers": 6, "d_model": 128}}
    assert plot.run_label(hybrid) == "lrn + attention every 3, 6×128"
    assert plot.run_label({"model": {"mixer": "attention", "attention_every": 2}}).startswith("attention, ")
    # Two runs of one model: the run dir's name (or as many trailing parts as differ) tells them apart.
    got = plot.unique_labels(["lrn, 2×64", "lrn, 2×64", "gru, 1×8"], ["/r/x", "/r/y", "/r/z"])
    assert got == ["lrn, 2×64 (x)", "lrn, 2×64 (y)", "gru, 1×8"]
    got = plot.unique_labels(["a", "a"], ["/one/pretrain", "/two/pretrain"])
    assert got == ["a (one/pretrain)", "a (two/pretrain)"]


def test_curves_put_valid_points_on_the_train_lines_tokens(tmp_path):
    run = write_run(tmp_path / "r", "lrn", steps=100, tokens_per_step=256)
    curve = plot.load_curve(str(run))
    assert curve.label == "lrn, 2×64"
    assert [x for x, _ in curve.train] == [s * 256.0 for s in range(10, 101, 10)]
    assert [x for x, _ in curve.valid] == [50 * 256.0, 100 * 256.0]
    # Between and beyond logged steps: linear, at the nearest lines' tokens per step.
    assert plot.tokens_at([10, 20], [100.0, 300.0], 15) == 200.0
    assert plot.tokens_at([10, 20], [100.0, 300.0], 5) == 50.0
    assert plot.tokens_at([10, 20], [100.0, 300.0], 30) == 500.0


def test_without_token_counts_the_config_gives_tokens_per_step(tmp_path):
    run = write_run(tmp_path / "r", "lrn")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    stripped = [{k: v for k, v in x.items() if k != "train/tokens_seen"} for x in lines if "valid/bpb" in x]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in stripped))
    # batch 4 × seq_len 32 × grad_accum 1 × nproc 2 (no checkpoint marker to say otherwise)
    assert [x for x, _ in plot.load_curve(str(run)).valid] == [50 * 256.0, 100 * 256.0]


def test_missing_metrics_exits_1_naming_it(tmp_path, capsys):
    good = write_run(tmp_path / "good", "lrn")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text(config_yaml("mingru"))
    out = tmp_path / "x.png"
    assert rnnpipe("plot", good, bare, "--out", out) == 1
    err = capsys.readouterr().err
    assert str(bare / "metrics.jsonl") in err and "missing" in err
    assert not out.exists()
    (bare / "metrics.jsonl").write_text("")
    assert rnnpipe("plot", bare, "--out", out) == 1
    assert "empty" in capsys.readouterr().err
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert rnnpipe("plot", empty, "--out", out) == 1
    assert f"{empty}: not a pretrain run directory" in capsys.readouterr().err


def test_out_must_be_png(tmp_path, capsys):
    run = write_run(tmp_path / "r", "lrn")
    assert rnnpipe("plot", run, "--out", tmp_path / "x.jpg") == 2
    assert "x.jpg" in capsys.readouterr().err
    assert not (tmp_path / "x.jpg").exists()


def test_chart_helpers_write_pngs_from_a_small_table(tmp_path):
    charts = benchmark("charts")
    bar_chart, line_chart = charts.bar_chart, charts.line_chart

    speeds = {"lrn": [(512, 7000.0), (128, 7200.0)], "mingru": [(128, 8000.0), (512, 8700.0)]}
    out = line_chart(
        tmp_path / "speed.png", speeds, xlabel="T", ylabel="tok/s", note="n", logx=True, xticks=[128, 512]
    )
    assert png_size(Path(out)) == (WIDTH, HEIGHT)
    out = bar_chart(
        tmp_path / "gbs.png",
        ["8×4096×1536", "16×4096×128"],
        {"linear_scan float32": [1.5, 8.8], "lrn_recurrence bfloat16": [None, 0.7]},
        xlabel="B×T×D",
        ylabel="GB/s",
        reference=("copy", 5.4),
    )
    assert png_size(Path(out)) == (WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="2 values for 1 groups"):
        bar_chart(tmp_path / "bad.png", ["a"], {"s": [1.0, 2.0]}, xlabel="", ylabel="")


def test_benchmarks_draw_their_tables(tmp_path):
    plot_kernels = benchmark("kernel_speed").plot_kernels
    plot_speed = benchmark("pretrain").plot_speed

    records = [{"op": "device copy", "shape": None, "dtype": "float32", "ms": None, "gbs": 5.4}]
    for shape in ((8, 64, 32), (1, 512, 16)):
        for dtype in ("float32", "bfloat16"):
            for op in ("linear_scan", "lrn_recurrence"):
                records.append({"op": op, "shape": shape, "dtype": dtype, "ms": 1.0, "gbs": 2.0})
    out = plot_kernels(str(tmp_path / "k.png"), records, "a CPU", "PyTorch reference (CPU)", 2)
    assert png_size(Path(out)) == (WIDTH, HEIGHT)
    speeds = {"lrn": [(128, 7000.0), (512, 6900.0)], "attention": [(128, 5000.0), (512, 4000.0)]}
    assert png_size(Path(plot_speed(str(tmp_path / "s.png"), speeds, "setup"))) == (WIDTH, HEIGHT)
