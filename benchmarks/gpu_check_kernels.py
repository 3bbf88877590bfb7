"""Sections (b) and (d) of benchmarks/gpu_check.py: the Triton kernels against the reference, and
their speed against the device's copy bandwidth and the peer packages' scans.

Every function fills the section dict ``out`` it is given as it goes (``rows``, ``checks``,
``notes``), so a section cut short by its time limit keeps what it measured.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from rnnpipe import kernels

# (B, T, D): long T with a modest batch, wide channels, a large batch at short T, and one where
# B·D alone fills the device (one time chunk in the scan, 128-wide channel blocks).
GPU_SHAPES = [(64, 512, 1024), (8, 2048, 2048), (16, 4096, 1024), (64, 256, 4096)]
# Accuracy at the shapes but the longest: the reference's step-by-step loop (and its autograd) at
# T = 4096 would take most of the section's time; its speed row still runs the Triton kernels there.
ACCURACY_SHAPES = [(64, 512, 1024), (8, 2048, 2048), (64, 256, 4096)]
REFERENCE_REPEATS = 3  # the reference scan's speed row (for scale): a few of its slow loops
# Dry run (Triton's interpreter takes about 10 ms per step of a program): T not a multiple of any
# block; D over one 128-wide block. tests/unit/kernels/test_kernels_triton.py covers more shapes.
DRY_SHAPES = [(2, 11, 20), (1, 5, 130)]
DRY_SPEED_SHAPES = [(1, 8, 16)]
# Max |triton − reference| / max |reference| per tensor, against the reference at the same dtype
# (both read the same stored values and accumulate in fp32, so only rounding order differs).
# bf16: about 4 units in the last place of the largest element (a stored h that rounds the other
# way moves the gradients that read it by one more).
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
PEER_TOL = {torch.float32: 1e-3, torch.bfloat16: 3e-2}  # a peer against ours, same effective inputs


@contextmanager
def kernels_backend(choice: str) -> Iterator[None]:
    """Force ``RNNPIPE_KERNELS`` (triton | reference) for the calls inside."""
    was = os.environ.get("RNNPIPE_KERNELS")
    os.environ["RNNPIPE_KERNELS"] = choice
    try:
        yield
    finally:
        if was is None:
            os.environ.pop("RNNPIPE_KERNELS", None)
        else:
            os.environ["RNNPIPE_KERNELS"] = was


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup``, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------------------------- the operations


def _sru(u, fp, rp, x, vf, vr, c0=None):
    return kernels.sru_recurrence(u, fp, rp, x, vf, vr, c0)


# name -> (function, number of [B, T, D] inputs, whether it takes the [D] vectors vf, vr (SRU))
OPS: dict[str, tuple[Callable[..., tuple[Tensor, Tensor]], int, bool]] = {
    "linear_scan": (kernels.linear_scan, 2, False),
    "lrn": (kernels.lrn_recurrence, 3, False),
    "olrn": (kernels.olrn_recurrence, 4, False),
    "sru": (_sru, 4, True),
}


def make_inputs(op: str, shape: tuple[int, int, int], dev: torch.device, seed: int) -> list[Tensor]:
    """fp32 inputs of ``op`` at ``shape`` = (B, T, D), with an initial state [B, D] last.

    The scan's a is in (0, 1) (a decay); everything else is standard normal (SRU's vf, vr halved).
    """
    B, T, D = shape
    gen = torch.Generator(device=dev).manual_seed(seed)
    _, n, vectors = OPS[op]
    xs = [torch.randn(B, T, D, generator=gen, device=dev) for _ in range(n)]
    if op == "linear_scan":
        xs[0] = torch.rand(B, T, D, generator=gen, device=dev)
    if vectors:
        xs += [0.5 * torch.randn(D, generator=gen, device=dev) for _ in range(2)]
    return [*xs, torch.randn(B, D, generator=gen, device=dev)]


def run_op(
    op: str, inputs: list[Tensor], dtype: torch.dtype, dh_seed: int
) -> tuple[list[Tensor], list[Tensor]]:
    """(outputs, gradients) of ``op`` on ``inputs`` cast to ``dtype``, on the current backend.

    Outputs: h [B, T, D] and the last state [B, D]; gradients: of Σ h ⊙ dh (dh a fixed random
    cotangent, drawn in fp32 and cast) with respect to every input, the state and SRU's vectors too.
    """
    fn = OPS[op][0]
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    h, last = fn(*xs)
    gen = torch.Generator(device=h.device).manual_seed(dh_seed)
    dh = torch.randn(h.shape, generator=gen, device=h.device).to(h.dtype)
    grads = torch.autograd.grad(h, xs, dh)
    return [h.detach(), last.detach()], list(grads)


def max_errors(xs: list[Tensor], ys: list[Tensor]) -> tuple[float, float, bool]:
    """(max abs error, max relative error, all finite) of ``xs`` against ``ys`` pairwise.

    Relative: max |x − y| / max |y| per tensor (an element-wise ratio explodes where y ≈ 0)."""
    abs_err, rel_err, finite = 0.0, 0.0, True
    for x, y in zip(xs, ys, strict=True):
        x, y = x.float(), y.float()
        finite = finite and bool(torch.isfinite(x).all())
        diff = float((x - y).abs().max())
        abs_err = max(abs_err, diff)
        rel_err = max(rel_err, diff / max(float(y.abs().max()), 1e-30))
    return abs_err, rel_err, finite


def accuracy_section(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    """(b): every Triton op against the reference, values and gradients, fp32 and bf16."""
    dev, dry = ctx["device"], ctx["dry_run"]
    shapes = DRY_SHAPES if dry else ACCURACY_SHAPES
    out["notes"] = [
        "error = max |Triton − reference| / max |reference| per tensor (max over h, the last state, "
        "and over every gradient); the reference runs on the same device, at the same dtype "
        f"(tolerance fp32 {TOL[torch.float32]:g}, bf16 {TOL[torch.bfloat16]:g}); bf16 vs fp32: the "
        "Triton bf16 result against the fp32 reference on the same (bf16-rounded) inputs, for "
        "information",
        "initial state: given on every other shape (both kernel variants compile)",
    ]
    rows, checks = out.setdefault("rows", []), out.setdefault("checks", [])
    for i, shape in enumerate(shapes):
        for op in OPS:
            inputs = make_inputs(op, shape, dev, seed=i)
            if i % 2 == 0:
                inputs[-1] = None  # no initial state
            for dtype in (torch.float32, torch.bfloat16):
                started = time.perf_counter()
                with kernels_backend("triton"):
                    vals, grads = run_op(op, [x for x in inputs if x is not None], dtype, dh_seed=i)
                with kernels_backend("reference"):
                    rvals, rgrads = run_op(op, [x for x in inputs if x is not None], dtype, dh_seed=i)
                va, vr, vfin = max_errors(vals, rvals)
                ga, gr, gfin = max_errors(grads, rgrads)
                row = {
                    "op": op,
                    "B×T×D": list(shape),
                    "dtype": str(dtype)[6:],
                    "h0": "yes" if i % 2 else "no",
                    "value abs": va,
                    "value rel": vr,
                    "grad abs": ga,
                    "grad rel": gr,
                    "tol": TOL[dtype],
                }
                if dtype == torch.bfloat16:  # the fp32 truth on the same rounded inputs
                    rounded = [None if x is None else x.to(dtype).float() for x in inputs]
                    with kernels_backend("reference"):
                        tvals, tgrads = run_op(op, [x for x in rounded if x is not None], torch.float32, i)
                    row["bf16 vs fp32 value rel"] = max_errors(vals, tvals)[1]
                    row["bf16 vs fp32 grad rel"] = max_errors(grads, tgrads)[1]
                ok = vfin and gfin and vr <= TOL[dtype] and gr <= TOL[dtype]
                row["pass"] = ok
                row["s"] = round(time.perf_counter() - started, 2)
                rows.append(row)
                checks.append({"name": f"{op} {shape} {row['dtype']}", "pass": ok, "value": max(vr, gr)})
                print(f"  {op:12s} {shape} {row['dtype']:9s} value {vr:.2e} grad {gr:.2e} {ok}", flush=True)
            del inputs
        if dev.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- speed


def copy_bandwidth(dev: torch.device, mib: int) -> float:
    """GB/s of a device-to-device copy of ``mib`` MiB, counting bytes read and written."""
    x = torch.ones(mib * 2**20 // 4, device=dev)
    y = torch.empty_like(x)
    s = timeit(lambda: y.copy_(x), dev, repeats=10 if dev.type == "cuda" else 3, warmup=2)
    return 2 * x.numel() * 4 / s / 1e9


def _scan_fwd_bwd(a: Tensor, b: Tensor, dh: Tensor) -> None:
    h, _ = kernels.linear_scan(a, b)
    torch.autograd.grad(h, (a, b), dh)


def _lrn_fwd_bwd(q: Tensor, k: Tensor, v: Tensor, dh: Tensor) -> None:
    h, _ = kernels.lrn_recurrence(q, k, v)
    torch.autograd.grad(h, (q, k, v), dh)


class Peer:
    """A peer package's scan of h_t = a_t ⊙ h_{t−1} + b_t, with its layout conversions.

    ``convert(a, b)`` gives the peer's arguments (done before timing), ``call(*args)`` runs it,
    ``back(out)`` gives h [B, T, D], and ``effective(args)`` the (a, b) [B, T, D] it really computes
    with (fla's gates are in log space: exp(log a) is not a bit for bit). ``stand_in`` is a torch
    version of the documented semantics, used by the dry run to test the conversions on CPU."""

    def __init__(self, name, module, attr, convert, back, effective, stand_in, needs=None, build=False):
        self.name, self.module, self.attr = name, module, attr
        self.convert, self.back, self.effective, self.stand_in = convert, back, effective, stand_in
        self.needs = needs  # (B, T, D) -> reason it cannot run, or ""
        self.build_on_import = build  # compiles an extension when imported
        self._loaded: tuple[Callable[..., Tensor] | None, str] | None = None  # load()'s answer, once

    def load(self, dry: bool) -> tuple[Callable[..., Tensor] | None, str]:
        """(callable, "") or (None, why not); imported once (a failed build is not retried)."""
        if dry:
            return self.stand_in, ""
        if self._loaded is None:
            if importlib.util.find_spec(self.module.split(".")[0]) is None:
                self._loaded = None, "not installed"
            else:
                try:  # accelerated-scan's warp builds a CUDA extension on import (nvcc)
                    self._loaded = getattr(importlib.import_module(self.module), self.attr), ""
                except Exception as e:
                    self._loaded = None, f"unavailable: {type(e).__name__}: {str(e)[:120]}"
        return self._loaded


def _hgrn_loop(x: Tensor, g: Tensor) -> Tensor:
    """fla's naive_recurrent_hgrn: h_t = exp(g_t) ⊙ h_{t−1} + x_t over [B, T, D], fp32 inside."""
    h, outs = torch.zeros_like(x[:, 0], dtype=torch.float32), []
    for t in range(x.shape[1]):
        h = g[:, t].float().exp() * h + x[:, t].float()
        outs.append(h)
    return torch.stack(outs, 1).to(x.dtype)


def _warp_loop(gates: Tensor, tokens: Tensor) -> Tensor:
    """accelerated_scan.warp.scan's semantics over [B, D, T]: x_t = a_t x_{t−1} + b_t."""
    h, outs = torch.zeros_like(gates[..., 0], dtype=torch.float32), []
    for t in range(gates.shape[-1]):
        h = gates[..., t].float() * h + tokens[..., t].float()
        outs.append(h)
    return torch.stack(outs, -1).to(gates.dtype)


def _fla_convert(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    # fla: (x, g) with h_t = exp(g_t) h_{t−1} + x_t: g = log a, computed in fp32, then cast.
    return b.detach().clone().requires_grad_(), a.detach().float().log().to(a.dtype).requires_grad_()


def _pow2_t(shape: tuple[int, int, int]) -> str:
    T = shape[1]
    return "" if T & (T - 1) == 0 else f"needs T a power of 2 (T = {T})"


PEERS = [  # accelerated-scan first: its extension builds in the background from the start
    Peer(
        "accelerated-scan warp",
        "accelerated_scan.warp",
        "scan",
        # [B, D, T] contiguous, T a power of 2
        lambda a, b: tuple(x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (a, b)),
        lambda out: out.transpose(1, 2),
        lambda args: tuple(x.detach().float().transpose(1, 2) for x in args),
        _warp_loop,
        needs=_pow2_t,
        build=True,
    ),
    Peer(
        "fla chunk_hgrn",
        "fla.ops.hgrn",
        "chunk_hgrn",
        _fla_convert,
        lambda out: out[0] if isinstance(out, tuple) else out,
        lambda args: (args[1].detach().float().exp(), args[0].detach().float()),
        lambda x, g: (_hgrn_loop(x, g), None),
    ),
    Peer(
        "fla fused_recurrent_hgrn",
        "fla.ops.hgrn",
        "fused_recurrent_hgrn",
        _fla_convert,
        lambda out: out[0] if isinstance(out, tuple) else out,
        lambda args: (args[1].detach().float().exp(), args[0].detach().float()),
        lambda x, g: (_hgrn_loop(x, g), None),
    ),
]


def _row(name, shape, dtype, s, moved, copy, **extra) -> dict[str, Any]:
    n, item = shape[0] * shape[1] * shape[2], torch.finfo(dtype).bits // 8
    gbs = moved * n * item / s / 1e9
    return {
        "op": name,
        "B×T×D": list(shape),
        "dtype": str(dtype)[6:],
        "ms": s * 1e3,
        "GB/s": gbs,
        "of copy": f"{100 * gbs / copy:.0f} %",
        **extra,
    }


def start_peer_builds(ctx: dict[str, Any]) -> None:
    """Import the peers that build on import (accelerated-scan's warp: nvcc, about a minute) in
    background threads, from the start of the check, so section (b) finds them built."""
    if ctx["dry_run"] or ctx["device"].type != "cuda":
        return
    builds = ctx.setdefault("peer_builds", {})
    for peer in PEERS:
        if peer.build_on_import and importlib.util.find_spec(peer.module.split(".")[0]) is not None:
            thread = threading.Thread(target=peer.load, args=(False,), daemon=True)
            thread.start()
            builds[peer.name] = thread


def speed_section(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    """(d): forward + backward time and GB/s of ours and the reference scan, then of the peers."""
    dev, dry = ctx["device"], ctx["dry_run"]
    shapes = DRY_SPEED_SHAPES if dry else GPU_SHAPES
    repeats = 1 if dry else 10
    rows, checks = out.setdefault("rows", []), out.setdefault("checks", [])
    out["notes"] = [
        "GB/s: the bytes each op must move at least (scan: a, b, h forward and a, h, dh, da, db "
        "backward, 8 tensors; LRN: 12) over the median time of forward + backward (no gradient "
        "accumulation); peers' inputs are converted to their layouts before timing",
        "peers compute the same h_t = a_t ⊙ h_{t−1} + b_t: fla's hgrn as exp(g) with g = log a "
        "(checked against ours on the same effective a = exp(g); 'raw a': against ours on the "
        "original a, the log/exp round trip included), accelerated-scan on [B, D, T]; the peers "
        "run at the shapes with D = 1024 only (fla autotunes its kernels per D)",
    ]
    if dry:
        out["notes"].append("dry run: the peers are torch stand-ins of their documented semantics")
    copy = copy_bandwidth(dev, 8 if dry else 1024)
    out["copy_gbs"] = copy
    rows.append({"op": "device copy (read + write)", "B×T×D": None, "dtype": "float32", "ms": None})
    rows[-1].update({"GB/s": copy, "of copy": "100 %"})
    print(f"  copy {copy:.1f} GB/s", flush=True)
    cases = [(shape, dtype) for shape in shapes for dtype in (torch.float32, torch.bfloat16)]
    for shape, dtype in cases:
        a, b, dh = _scan_case(shape, dtype, dev)
        q, k, v = (x.to(dtype).requires_grad_() for x in make_inputs("lrn", shape, dev, 1)[:3])
        steps = [
            ("linear_scan", "triton", lambda a=a, b=b, dh=dh: _scan_fwd_bwd(a, b, dh), 8),
            ("lrn_recurrence", "triton", lambda q=q, k=k, v=v, dh=dh: _lrn_fwd_bwd(q, k, v, dh), 12),
        ]
        if dev.type == "cuda":  # for scale: the reference scan on the same device
            steps.append(
                ("linear_scan (reference)", "reference", lambda a=a, b=b, dh=dh: _scan_fwd_bwd(a, b, dh), 8)
            )
        for name, choice, fn, moved in steps:
            with kernels_backend(choice):
                s = timeit(fn, dev, min(repeats, REFERENCE_REPEATS) if choice == "reference" else repeats)
            rows.append(_row(name, shape, dtype, s, moved, copy))
            print(f"  {name:24s} {shape} {str(dtype)[6:]:9s} {s * 1e3:8.2f} ms", flush=True)
    peer_cases = [(shape, dtype) for shape, dtype in cases if dry or shape[2] == 1024]
    for peer in PEERS:  # the peers after all of ours: a slow peer cannot cost our rows
        for shape, dtype in peer_cases:
            _peer_row(peer, shape, dtype, ctx, repeats, copy, rows, checks)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def _scan_case(shape, dtype, dev) -> tuple[Tensor, Tensor, Tensor]:
    """The scan's (a, b, dh) at ``shape`` in ``dtype``, a and b requiring gradients."""
    a, b = (x.to(dtype).requires_grad_() for x in make_inputs("linear_scan", shape, dev, 0)[:2])
    gen = torch.Generator(device=dev).manual_seed(2)
    return a, b, torch.randn(shape, generator=gen, device=dev).to(dtype)


def _peer_row(peer: Peer, shape, dtype, ctx, repeats, copy, rows, checks) -> None:
    """Time one peer at one shape and dtype and check its h against ours on its effective inputs."""
    dev, dry = ctx["device"], ctx["dry_run"]
    label = {"op": peer.name, "B×T×D": list(shape), "dtype": str(dtype)[6:]}
    build = ctx.get("peer_builds", {}).get(peer.name)
    if build is not None and build.is_alive():
        build.join(timeout=max(0.0, ctx["section_deadline"] - time.perf_counter() - 10))
        if build.is_alive():
            rows.append({**label, "note": "its extension was still building"})
            return
    fn, why = peer.load(dry)
    why = why or (peer.needs(shape) if peer.needs else "")
    if fn is None or why:
        rows.append({**label, "note": why})
        return
    try:
        a, b, dh = _scan_case(shape, dtype, dev)
        args = peer.convert(a, b)

        def step():
            h = peer.back(fn(*args))  # [B, T, D] (a view for accelerated-scan): dh fits as it is
            torch.autograd.grad(h, args, dh)

        s = timeit(step, dev, repeats)
        with torch.no_grad():
            h = peer.back(fn(*args)).float()
            ea, eb = peer.effective(args)
            with kernels_backend("triton"):
                # in fp32: the peer's bf16 result then differs by its own output rounding only
                want = kernels.linear_scan(ea.contiguous(), eb.contiguous())[0]
                ours = kernels.linear_scan(a.detach(), b.detach())[0]
        _, rel, finite = max_errors([h], [want])
        _, rel_raw, _ = max_errors([h], [ours])
        ok = finite and rel <= PEER_TOL[dtype]
        rows.append(
            _row(peer.name, shape, dtype, s, 8, copy, **{"rel vs ours": rel, "rel vs ours, raw a": rel_raw})
        )
        rows[-1]["equal"] = ok
        checks.append({"name": f"{peer.name} {shape} {label['dtype']} equals ours", "pass": ok, "value": rel})
        print(f"  {peer.name:24s} {shape} {label['dtype']:9s} {s * 1e3:8.2f} ms rel {rel:.1e}", flush=True)
    except Exception as e:  # a peer's shape or dtype limits: a row, not a failure of ours
        if "SectionTimeout" in repr(e):
            raise
        rows.append({**label, "note": f"{type(e).__name__}: {e}"[:160]})
