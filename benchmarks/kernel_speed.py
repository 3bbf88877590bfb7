"""Benchmark the recurrence kernels, the mixers against torch's GRU/LSTM, and LM training speed.

    python benchmarks/kernel_speed.py [--quick] [--write docs/benchmarks.md]
        [--tables kernels,mixers,lm,scan-peers,layers] [--no-rnn] [--plot docs/figures/kernels-gbs.png]
        [--shapes 16x4096x128,...]

Three tables (CPU always; on a GPU the kernels are the Triton ones, on CPU the references):
1. ``linear_scan`` and ``lrn_recurrence`` forward + backward at the issue's (B, T, D) shapes, fp32
   and bf16: time and effective GB/s (the bytes the pass must at least move, over its time),
   beside nn.GRU and nn.LSTM layers of the same width;
2. a minGRU layer vs nn.GRU and minLSTM vs nn.LSTM, one training step at T = 512 and 4096
   (the minGRU paper's headline, 175× at T = 512 on a T4);
3. LM training tokens/s for LRN, minGRU and transformer models of about equal parameter count;
4. ``scan-peers``: the CPU linear scan against a Python loop, accelerated-scan's reference,
   minGRU-pytorch's log-space scan and torch's compiled associative_scan (benchmarks/kernel_peers.py);
5. ``layers``: LRN, oLRN and SRU layers (input projection + recurrence) against nn.LSTM(D, D).
The default runs tables 1–3; 4 and 5 are asked for by name (``--tables scan-peers,layers``).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]

import kernel_peers  # noqa: E402

from rnnpipe import kernels  # noqa: E402
from rnnpipe.pipeline.models import LanguageModel, MixerKind, ModelConfig, model_params  # noqa: E402
from rnnpipe.pipeline.models.mixers import MinGRU, MinLSTM  # noqa: E402

SHAPES = [(8, 4096, 1536), (16, 4096, 128), (1, 65536, 1024), (64, 512, 1024)]
QUICK_SHAPES = [(8, 1024, 512), (16, 4096, 128), (1, 8192, 256), (64, 512, 256)]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(dev: torch.device) -> float:
    """GB/s of a large device copy (read + write): the practical memory bandwidth of this device."""
    x = torch.empty(256 * 2**20 // 4, device=dev, dtype=torch.float32).fill_(1.0)  # 256 MiB
    s = timeit(lambda: x.clone(), 5)
    return 2 * x.numel() * 4 / s / 1e9


def peer_scans(a, b):
    """The peer packages' scans of the same recurrence (CUDA only, optional): name -> callable."""
    peers = {}
    try:
        from accelerated_scan.warp import scan as warp_scan  # [B, D, T], power-of-two T

        a_t, b_t = a.detach().transpose(1, 2).contiguous(), b.detach().transpose(1, 2).contiguous()
        a_t.requires_grad_(), b_t.requires_grad_()
        peers["accelerated-scan (warp)"] = lambda: warp_scan(a_t, b_t)
    except ImportError:
        pass
    try:
        from fla.ops.hgrn import chunk_hgrn  # h = exp(g) ⊙ h + x

        g = a.detach().float().log().to(a.dtype).requires_grad_()
        x = b.detach().clone().requires_grad_()
        peers["flash-linear-attention chunk_hgrn"] = lambda: chunk_hgrn(x, g)[0]
    except ImportError:
        pass
    return peers


def kernel_rows(shapes, repeats: int, records: list[dict] | None = None, rnn: bool = True) -> list[str]:
    """The kernel table's rows. ``records`` (if given) gets one dict per measured op and shape
    (op, shape, dtype, ms, gbs; the copy rate as op "device copy") for the chart; ``rnn=False``
    leaves out the nn.GRU/nn.LSTM rows for scale (minutes on CPU at the full shapes)."""
    records = [] if records is None else records
    dev = device()
    copy = copy_bandwidth(dev)
    records.append({"op": "device copy", "shape": None, "dtype": "float32", "ms": None, "gbs": copy})
    rows = [f"| device copy (read + write, 256 MiB) | – | float32 | – | {copy:.1f} | 100 % |"]
    print(rows[-1], flush=True)
    for B, T, D in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            n, item = B * T * D, torch.finfo(dtype).bits // 8
            a = torch.rand(B, T, D, device=dev, dtype=dtype).requires_grad_()
            b = torch.randn(B, T, D, device=dev, dtype=dtype).requires_grad_()
            q, k, v = (torch.randn(B, T, D, device=dev, dtype=dtype).requires_grad_() for _ in range(3))

            def scan_step(a=a, b=b):
                h, _ = kernels.linear_scan(a, b)
                h.backward(torch.ones_like(h))

            def lrn_step(q=q, k=k, v=v):
                h, _ = kernels.lrn_recurrence(q, k, v)
                h.backward(torch.ones_like(h))

            # Least bytes: scan fwd reads a, b, writes h; bwd reads a, h, dh, writes da, db (8 × n).
            # LRN fwd reads q, k, v, writes h; bwd reads q, k, v, h, dh, writes dq, dk, dv (12 × n).
            steps = [("linear_scan", scan_step, 8), ("lrn_recurrence", lrn_step, 12)]
            if dev.type == "cuda":  # the same ops on the PyTorch reference, on the same tensors

                def on_reference(step):
                    def run():
                        os.environ["RNNPIPE_KERNELS"] = "reference"
                        try:
                            step()
                        finally:
                            os.environ.pop("RNNPIPE_KERNELS")

                    return run

                steps += [
                    ("linear_scan (reference)", on_reference(scan_step), 8),
                    ("lrn_recurrence (reference)", on_reference(lrn_step), 12),
                ]
                for name, fn in peer_scans(a, b).items():

                    def peer_step(fn=fn):
                        out = fn()
                        out.backward(torch.ones_like(out))

                    steps.append((name, peer_step, 8))
            for name, step, moved in steps:
                try:
                    s = timeit(step, repeats)
                except Exception as e:  # a peer's shape or dtype limits
                    rows.append(
                        f"| {name} | {B}×{T}×{D} | {str(dtype)[6:]} | n/a: {type(e).__name__} | – | – |"
                    )
                    continue
                gbs = moved * n * item / s / 1e9
                records.append(
                    {"op": name, "shape": (B, T, D), "dtype": str(dtype)[6:], "ms": s * 1e3, "gbs": gbs}
                )
                rows.append(
                    f"| {name} | {B}×{T}×{D} | {str(dtype)[6:]} | {s * 1e3:,.1f} | {gbs:.2f} | "
                    f"{100 * gbs / copy:.0f} % |"
                )
                print(rows[-1], flush=True)
        for name, cls in (("nn.GRU", nn.GRU), ("nn.LSTM", nn.LSTM)) if rnn else ():
            rnn = cls(D, D, batch_first=True).to(dev)
            x = torch.randn(B, T, D, device=dev).requires_grad_()

            def rnn_step(rnn=rnn, x=x):
                y, _ = rnn(x)
                y.backward(torch.ones_like(y))

            s = timeit(rnn_step, 1, warmup=0)
            rows.append(
                f"| {name} (same width, for scale) | {B}×{T}×{D} | float32 | {s * 1e3:,.1f} | – | – |"
            )
            print(rows[-1], flush=True)
    return rows


def mixer_rows(repeats: int, lengths=(512, 4096), batch: int = 64, width: int = 128) -> list[str]:
    dev = device()
    rows = []
    for T in lengths:
        x = torch.randn(batch, T, width, device=dev).requires_grad_()
        for ours, theirs in (
            (MinGRU(width), nn.GRU(width, width, batch_first=True)),
            (MinLSTM(width), nn.LSTM(width, width, batch_first=True)),
        ):
            ours, theirs = ours.to(dev), theirs.to(dev)

            def step(module, x=x):
                y = module(x)[0]
                y.backward(torch.ones_like(y))

            ours_s = timeit(lambda ours=ours: step(ours), repeats)
            theirs_s = timeit(lambda theirs=theirs: step(theirs), max(1, repeats // 2))
            rows.append(
                f"| {type(ours).__name__} vs nn.{type(theirs).__name__} | {T} | "
                f"{ours_s * 1e3:,.1f} | {theirs_s * 1e3:,.1f} | {theirs_s / ours_s:.1f}× |"
            )
            print(rows[-1], flush=True)
    return rows


def width_for(kind: MixerKind, target: int, layers: int, vocab: int) -> int:
    """The d_model (a multiple of 32) whose model is closest to ``target`` parameters."""

    def params(d: int) -> int:
        return model_params(
            ModelConfig(mixer=kind, n_layers=layers, d_model=d, mlp_ratio=4.0, n_heads=4), vocab
        )

    return min(range(32, 2048, 32), key=lambda d: abs(params(d) - target))


def lm_rows(lengths, tokens_per_step: int, target: int, steps: int) -> list[str]:
    dev = device()
    rows = []
    vocab, layers = 256, 4
    for T in lengths:
        for kind in (MixerKind.lrn, MixerKind.mingru, MixerKind.attention):
            d = width_for(kind, target, layers, vocab)
            cfg = ModelConfig(mixer=kind, n_layers=layers, d_model=d, mlp_ratio=4.0, n_heads=4)
            model = LanguageModel(cfg, vocab).to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            B = max(1, tokens_per_step // T)
            tokens = torch.randint(0, vocab, (B, T + 1), device=dev)

            def step(model=model, opt=opt, tokens=tokens):
                logits, _ = model(tokens[:, :-1])
                loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()

            s = timeit(step, steps)
            rows.append(
                f"| {kind.value} | {d} | {model.num_params() / 1e6:.2f} M | {T} | {B} | {B * T / s:,.0f} |"
            )
            print(rows[-1], flush=True)
    return rows


def machine() -> str:
    """The device the numbers come from, in words (the GPU's name, or the CPU, its cores and threads)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = "unknown CPU"
    if Path("/proc/cpuinfo").exists():
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else cpu
    # The charts must say what they ran on: the cores and that no GPU took part.
    return f"{cpu}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, no GPU"


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process on this machine has spent busy since boot (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()  # children: the finished subprocesses (pretrain runs) this process waited for
    return t.user + t.system + t.children_user + t.children_system


def others_share():
    """Start watching; the returned function gives the share (0–1) of this machine's CPU time that
    *other* processes took since. A benchmark on a shared machine is only as good as this is small:
    two cores shared with a test suite halve the numbers without any other sign."""
    busy0, own0, t0 = _busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()

    def share() -> float:
        busy = _busy_cpu_seconds()
        if busy is None or busy0 is None:
            return 0.0
        wall = max(time.perf_counter() - t0, 1e-9)
        others = (busy - busy0) - (_own_cpu_seconds() - own0)
        return min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1))))

    return share


def replace_section(path: Path, begin: str, end: str, body: str) -> None:
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def plot_kernels(out: str, records: list[dict], where: str, backend: str, repeats: int) -> str:
    """Grouped bars of effective GB/s per shape, one bar per op and dtype, the copy rate dashed."""
    from charts import bar_chart

    measured = [r for r in records if r["shape"] is not None]
    shapes = list(dict.fromkeys(r["shape"] for r in measured))
    ops = list(dict.fromkeys(r["op"] for r in measured))
    dtypes = list(dict.fromkeys(r["dtype"] for r in measured))
    series: dict[str, list[float | None]] = {}
    # Each op's dtypes side by side (not the order measured: all of float32 first).
    for r in sorted(measured, key=lambda r: (ops.index(r["op"]), dtypes.index(r["dtype"]))):
        series.setdefault(f"{r['op']} {r['dtype']}", [None] * len(shapes))[shapes.index(r["shape"])] = r[
            "gbs"
        ]
    copy = next(r["gbs"] for r in records if r["op"] == "device copy")
    return bar_chart(
        out,
        ["×".join(map(str, shape)) for shape in shapes],
        series,
        xlabel="shape B×T×D",
        ylabel="GB/s = least bytes moved / time",
        title=f"Recurrence kernels, forward + backward: {backend}",
        note=(
            "Bytes moved: linear_scan reads a, b and writes h (forward), reads a, h, dh and writes da, db "
            "(backward): 8 tensors of B·T·D; lrn_recurrence reads q, k, v and writes h, then reads "
            "q, k, v, h, dh and writes dq, dk, dv: 12 tensors; 4 bytes an element in float32, 2 in "
            f"bfloat16. Above the copy line: the working set fits in cache. Median of {repeats} on {where}"
        ),
        reference=(f"device copy (256 MiB): {copy:.1f} GB/s", copy),
    )


TABLES = ("kernels", "mixers", "lm")
EXTRA_TABLES = ("scan-peers", "layers")


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """'16x4096x128,64x512x256' -> [(16, 4096, 128), (64, 512, 256)]."""
    shapes = []
    for part in text.split(","):
        dims = part.strip().lower().replace("×", "x").split("x")
        if len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
            raise ValueError(f"--shapes: {part!r} is not BxTxD")
        shapes.append(tuple(int(d) for d in dims))
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller shapes (minutes, not tens of minutes)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", help="markdown file for the tables (between markers)")
    parser.add_argument(
        "--tables",
        default=",".join(TABLES),
        help=f"which to measure, comma-separated ({','.join(TABLES + EXTRA_TABLES)})",
    )
    parser.add_argument("--shapes", help="B×T×D list for scan-peers or layers (e.g. 16x4096x128,64x512x256)")
    parser.add_argument(
        "--no-rnn", action="store_true", help="leave out the nn.GRU/nn.LSTM rows for scale (minutes on CPU)"
    )
    parser.add_argument("--plot", metavar="PNG", help="draw the kernel table's GB/s as a chart")
    args = parser.parse_args()
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    if unknown := set(tables) - set(TABLES + EXTRA_TABLES):
        parser.error(
            f"--tables: unknown {', '.join(sorted(unknown))} (choose from {', '.join(TABLES + EXTRA_TABLES)})"
        )
    try:
        custom = parse_shapes(args.shapes) if args.shapes else None
    except ValueError as e:
        parser.error(str(e))
    if args.plot and "kernels" not in tables:
        parser.error("--plot draws the kernels table: add kernels to --tables")
    if args.plot and not args.plot.lower().endswith(".png"):  # before minutes of measuring, not after
        parser.error(f"--plot {args.plot}: must end in .png")
    where = f"{machine()}, torch {torch.__version__}, Python {platform.python_version()}"
    backend = "Triton kernels" if torch.cuda.is_available() else "PyTorch reference (CPU)"
    shapes = QUICK_SHAPES if args.quick else SHAPES
    sections = {}
    if "kernels" in tables:
        records: list[dict] = []
        share = others_share()
        rows = kernel_rows(shapes, args.repeats, records, rnn=not args.no_rnn)
        others = f"Other processes took {share():.0%} of the CPU time while it ran."
        sections["kernels"] = "\n".join(
            [
                f"Kernels on {where}; backend: {backend}. Forward + backward of one call, median of "
                f"{args.repeats}. GB/s: the bytes a pass must move at least (scan 8, LRN 12 tensors of "
                "B·T·D) over its time; %: of this device's copy bandwidth (working sets that fit in cache "
                "exceed 100 %). nn.GRU/nn.LSTM: one run, float32. On a GPU the optional peers "
                f"(accelerated-scan, flash-linear-attention) run when installed. {others}",
                "",
                "| op | B×T×D | dtype | ms | GB/s | % of copy |",
                "|---|---|---|---|---|---|",
                *rows,
            ]
        )
        if args.plot:
            print(plot_kernels(args.plot, records, f"{where}. {others}", backend, args.repeats))
    if "mixers" in tables:
        sections["mixers"] = "\n".join(
            [
                f"One training step (forward + backward) of a layer, batch 64, width 128, on {where}.",
                "",
                "| layers | T | ours ms | torch ms | speed-up |",
                "|---|---|---|---|---|",
                *mixer_rows(args.repeats),
            ]
        )
    if "lm" in tables:
        lengths = (512, 2048) if args.quick else (512, 2048, 8192)
        sections["lm"] = "\n".join(
            [
                f"LM training (forward, backward, AdamW) on {where}: 4 layers, MLP ratio 4, vocabulary "
                "256, about 3 M parameters each (width chosen to match), 16,384 tokens per step.",
                "",
                "| mixer | d_model | parameters | T | batch | tokens/s |",
                "|---|---|---|---|---|---|",
                *lm_rows(lengths, 16384, 3_000_000, args.repeats),
            ]
        )
    for name, rows_of, default, head in (
        (
            "scan-peers",
            kernel_peers.scan_rows,
            kernel_peers.SCAN_SHAPES,
            "| contender | B×T×D | ms | time / rnnpipe's |\n|---|---|---|---|",
        ),
        (
            "layers",
            kernel_peers.layer_rows,
            kernel_peers.LAYER_SHAPES,
            "| B×T×D | nn.LSTM ms | LRN ms (LSTM's time / LRN's) | oLRN ms (ratio) | SRU ms (ratio) |\n"
            "|---|---|---|---|---|",
        ),
    ):
        if name not in tables:
            continue
        share = others_share()
        rows = rows_of(custom or default, args.repeats)
        what = (
            "the linear scan h_t = a_t ⊙ h_{t−1} + b_t against its peers"
            if name == "scan-peers"
            else "layers of width D: the input projection (nn.Linear) + the recurrence, against nn.LSTM(D, D)"
        )
        sections[name] = "\n".join(
            [
                f"Forward + backward, float32, {what}; on {where}, glibc's allocator defaults (no MALLOC_* "
                f"settings). All contenders interleaved in one process, median of {args.repeats} rounds "
                f"after one warm-up round. Other processes took {share():.0%} of the CPU time while it ran.",
                "",
                head,
                *rows,
            ]
        )
    if args.write:
        for name, body in sections.items():  # only what was measured: the other tables stay
            replace_section(
                Path(args.write), f"<!-- {name}-benchmark:begin -->", f"<!-- {name}-benchmark:end -->", body
            )


if __name__ == "__main__":
    main()
