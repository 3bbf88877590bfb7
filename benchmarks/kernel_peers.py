"""The CPU kernel tables of ``benchmarks/kernel_speed.py``: the linear scan against its peers, and the
LRN, oLRN and SRU layers against ``nn.LSTM``, timed interleaved in one process (medians).

Peers of the scan, each forward + backward of h_t = a_t ⊙ h_{t−1} + b_t at the same shape:
- a plain Python loop over T (``h = a_t * h + b_t``, autograd through it);
- accelerated-scan's reference ``accelerated_scan.ref.scan`` (``pip install accelerated-scan``),
  on [B, D, T] copies made before timing;
- minGRU-pytorch's log-space ``heinsen_associative_scan_log`` (``pip install minGRU-pytorch``), on
  log a and log b (b > 0 here, which it needs) made before timing;
- ``torch._higher_order_ops.associative_scan`` under ``torch.compile`` (compiled before timing).
A peer that is not installed or does not run is a row saying why.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from rnnpipe import kernels

SCAN_SHAPES = [(16, 4096, 128), (64, 512, 256), (1, 8192, 256)]
LAYER_SHAPES = [(16, 256, 128), (32, 256, 256), (64, 512, 256)]

Step = Callable[[], torch.Tensor]  # a forward pass whose output gets backward(ones)


def interleaved(steps: dict[str, tuple[Step, list[torch.Tensor]]], repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward per name; one round runs every step once (the first
    round is warm-up), so drifts of a shared machine hit every contender alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(repeats + 1):
        for name, (fn, leaves) in steps.items():
            for x in leaves:
                x.grad = None
            t = time.perf_counter()
            y = fn()
            y.backward(torch.ones_like(y))
            if r:
                times[name].append(time.perf_counter() - t)
            del y
    return {name: statistics.median(v) for name, v in times.items()}


def _plain_loop(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    h, out = torch.zeros_like(a[:, 0]), []
    for a_t, b_t in zip(a.unbind(1), b.unbind(1), strict=True):
        h = a_t * h + b_t
        out.append(h)
    return torch.stack(out, 1)


def _combine(x, y):
    (a1, b1), (a2, b2) = x, y
    return a1 * a2, a2 * b1 + b2


def scan_contenders(B: int, T: int, D: int) -> tuple[dict[str, tuple[Step, list]], dict[str, str]]:
    """(name -> (step, leaves)) of the scan and its peers at [B, T, D], and (name -> why not)."""
    a = torch.rand(B, T, D).mul_(0.5).add_(0.5).requires_grad_()  # in (0.5, 1): no underflow
    b = torch.rand(B, T, D).add_(0.01).requires_grad_()  # positive, for the log-space peer
    steps: dict[str, tuple[Step, list]] = {
        "rnnpipe linear_scan": (lambda: kernels.linear_scan(a, b)[0], [a, b]),
        "plain Python loop": (lambda: _plain_loop(a, b), [a, b]),
    }
    missing: dict[str, str] = {}
    try:
        from accelerated_scan.ref import scan as ref_scan

        at, bt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (a, b))
        steps["accelerated-scan ref"] = (lambda: ref_scan(at, bt), [at, bt])
    except ImportError:
        missing["accelerated-scan ref"] = "not installed (pip install accelerated-scan)"
    try:
        from minGRU_pytorch.minGRU import heinsen_associative_scan_log

        la, lb = (x.detach().log().requires_grad_() for x in (a, b))
        steps["minGRU-pytorch log-space"] = (lambda: heinsen_associative_scan_log(la, lb), [la, lb])
    except ImportError:
        missing["minGRU-pytorch log-space"] = "not installed (pip install minGRU-pytorch)"
    try:
        from torch._higher_order_ops.associative_scan import associative_scan

        def assoc(a, b):
            return associative_scan(_combine, (a, b), dim=1, combine_mode="generic")[1]

        compiled = torch.compile(assoc)
        y = compiled(a, b)  # compile (minutes on CPU) before timing
        y.backward(torch.ones_like(y))
        steps["torch associative_scan (compiled)"] = (lambda: compiled(a, b), [a, b])
    except Exception as e:  # any failure to compile is a result to report
        missing["torch associative_scan (compiled)"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return steps, missing


def scan_rows(shapes, repeats: int) -> list[str]:
    """Rows: contender, shape, ms, and time relative to rnnpipe's scan (> 1: slower than ours)."""
    rows = []
    for B, T, D in shapes:
        steps, missing = scan_contenders(B, T, D)
        med = interleaved(steps, repeats)
        ours = med["rnnpipe linear_scan"]
        for name, s in sorted(med.items(), key=lambda kv: kv[1]):
            rows.append(f"| {name} | {B}×{T}×{D} | {s * 1e3:,.1f} | {s / ours:.2f}× |")
            print(rows[-1], flush=True)
        rows += [f"| {name} | {B}×{T}×{D} | n/a: {why} | – |" for name, why in missing.items()]
    return rows


def layer_steps(B: int, T: int, D: int) -> dict[str, tuple[Step, list]]:
    """nn.LSTM(D, D) and the LRN, oLRN and SRU layers (their mixers' projection + recurrence)."""
    x = torch.randn(B, T, D).requires_grad_()
    lstm = nn.LSTM(D, D, batch_first=True)
    lrn, olrn, sru = nn.Linear(D, 3 * D), nn.Linear(D, 4 * D), nn.Linear(D, 3 * D, bias=False)
    v = nn.Parameter(torch.empty(2, D).uniform_(-0.5, 0.5))

    def sru_step():
        u, f, r = sru(x).chunk(3, -1)
        return kernels.sru_recurrence(u, f, r, x, v[0], v[1])[0]

    return {
        "nn.LSTM": (lambda: lstm(x)[0], [x, *lstm.parameters()]),
        "LRN": (lambda: kernels.lrn_recurrence(*lrn(x).chunk(3, -1))[0], [x, *lrn.parameters()]),
        "oLRN": (lambda: kernels.olrn_recurrence(*olrn(x).chunk(4, -1))[0], [x, *olrn.parameters()]),
        "SRU": (sru_step, [x, v, *sru.parameters()]),
    }


def layer_rows(shapes, repeats: int) -> list[str]:
    """Rows: shape, ms of nn.LSTM(D, D) and of each layer (input projection + recurrence), and
    nn.LSTM's time over the layer's (> 1: the layer is faster)."""
    rows = []
    for B, T, D in shapes:
        med = interleaved(layer_steps(B, T, D), repeats)
        lstm = med["nn.LSTM"]
        cells = " | ".join(f"{med[k] * 1e3:,.1f} ({lstm / med[k]:.2f}×)" for k in ("LRN", "oLRN", "SRU"))
        rows.append(f"| {B}×{T}×{D} | {lstm * 1e3:,.1f} | {cells} |")
        print(rows[-1], flush=True)
    return rows
