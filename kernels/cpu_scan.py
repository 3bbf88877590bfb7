"""The linear scan h_t = a_t ⊙ h_{t∓1} + b_t on CPU: a two-level chunked scan written in place.

Why this shape of code: on CPU the scan is memory-bound, and once a tensor passes glibc's mmap
threshold (32 MiB at most) every fresh full-size temporary is new zeroed pages from the kernel,
page-faulted in on first touch and handed back when freed, so a temporary costs about as much
as the arithmetic it holds. Here the only full-size allocations are the outputs (h forwards; g
and da backwards); every step writes into its slice of the output (``out=``), the per-chunk
states are [B, n, D], the chunk size is chosen for T (no padding copy) and the backward's shift
by one step is a view (no ``cat``).

Chunks of C steps, n of them (n·C ≤ T, the rest r = T − n·C run step by step at the end):
1. the end state of each chunk from a zero state, and the product of its a (C vectorized steps
   over [B, n, D] and one ``prod``); the last chunk's are not needed;
2. the state entering each chunk (n steps over [B, D]);
3. every chunk again from its entering state, written into the output (C steps);
4. the r remaining steps, one at a time.
About 2·C + n + r Python-level ops instead of T; no division, so a = 0 and tiny a are exact.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

# Below this many steps a plain loop of T fused ops is at least as fast as three passes.
_SEQUENTIAL_T = 16


def plan(T: int, chunk: int = 0) -> tuple[int, int]:
    """(C, n): chunk length and number of chunks for a scan over T steps; n·C ≤ T.

    ``chunk`` > 0 forces C (tests). Otherwise C keeps the op count 2·C + n + (T − n·C) low: the
    divisor of T with the fewest ops (C ≈ √(T/2)) when it is within 10 % of the best C overall,
    else the best C, whose remainder (under C steps) runs step by step (prime T). C = T (n = 1)
    means one sequential pass.
    """
    if chunk > 0:
        C = min(chunk, T)
        return C, T // C
    if T <= _SEQUENTIAL_T:
        return T, 1
    cost = {C: 2 * C + T // C + T % C for C in range(2, math.isqrt(T) + 2)}
    best = min(cost, key=cost.__getitem__)
    divisors = [C for C in cost if T % C == 0]
    if divisors:
        div = min(divisors, key=cost.__getitem__)
        best = div if cost[div] <= 1.1 * cost[best] else best
    if cost[best] >= T:
        return T, 1
    return best, T // best


_SCRATCH = threading.local()  # per thread: {(name, shape, dtype, device): buffer}
_SCRATCH_BYTES = 64 << 20  # past this much cached scratch, start over (shapes changed a lot)


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A reused buffer (uninitialised) for intermediates that never leave a kernel.

    Why: on Linux every fresh allocation of more than a few hundred KiB is new pages that the
    kernel must fault in and zero on first touch (glibc returns freed memory to it), which can
    cost as much as the arithmetic; a buffer kept from the previous call is already mapped.
    One per name, shape, dtype and device, per thread (kernels may run in several threads).
    """
    cache = getattr(_SCRATCH, "bufs", None)
    if cache is None:
        cache = _SCRATCH.bufs = {}
    key = (name, shape, dtype, device)
    buf = cache.get(key)
    if buf is None:
        if sum(b.numel() * b.element_size() for b in cache.values()) > _SCRATCH_BYTES:
            cache.clear()
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            buf = cache[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.no_grad()
def scan_into(a: Tensor, b: Tensor, s: Tensor | None, out: Tensor, reverse: bool, chunk: int = 0) -> Tensor:
    """Write h_t = a_t ⊙ h_{t−1} + b_t (``reverse``: h_t = a_t ⊙ h_{t+1} + b_t) into ``out``.

    a_BTD, b_BTD: any dtype and batch stride, each time step a contiguous row of D (views such
    as ``a[:, 1:]`` are fine); s_BD: the state before the first step (zeros if None); out_BTD:
    the result, in the compute dtype (float32 or float64), possibly a view. Returns ``out``.
    """
    B, T, D = a.shape
    C, n = plan(T, chunk)
    main = n * C if n > 1 else 0  # steps the chunked passes cover; the rest run one at a time
    if main:
        # Forwards the chunks cover [0, main) and the rest follows; backwards the chunks cover the
        # last main steps, which a reverse scan reaches first.
        lo = 0 if not reverse else T - main
        a4, b4, o4 = (x[:, lo : lo + main].unflatten(1, (n, C)) for x in (a, b, out))
        a_i, b_i, o_i = a4.unbind(2), b4.unbind(2), o4.unbind(2)  # [B, n, D] views of step i
        steps = range(C - 1, -1, -1) if reverse else range(C)
        first, *rest = steps
        # 1. end states from zero and a-products, for the chunks whose successors need them.
        need = slice(1, n) if reverse else slice(0, n - 1)
        ends = scratch("scan.ends", (B, n - 1, D), out.dtype, out.device)
        ends.copy_(b_i[first][:, need])
        for i in rest:
            torch.addcmul(b_i[i][:, need], a_i[i][:, need], ends, out=ends)
        prods = scratch("scan.prods", (B, n - 1, D), out.dtype, out.device)
        torch.prod(a4[:, need], dim=2, dtype=out.dtype, out=prods)
        # 2. the state entering every chunk.
        enter = scratch("scan.enter", (B, n, D), out.dtype, out.device)
        if s is None:
            enter[:, n - 1 if reverse else 0].zero_()
        else:
            enter[:, n - 1 if reverse else 0].copy_(s)
        order = range(n - 1, 0, -1) if reverse else range(n - 1)
        for c in order:
            j = c - 1 if reverse else c  # index into ends/prods: chunk c's end and product
            torch.addcmul(ends[:, j], prods[:, j], enter[:, c], out=enter[:, c - 1 if reverse else c + 1])
        # 3. every chunk from its entering state, into the output.
        prev = enter
        for i in steps:
            torch.addcmul(b_i[i], a_i[i], prev, out=o_i[i])
            prev = o_i[i]
    # 4. the steps the chunks did not cover (all of them when n = 1).
    seq = range(T - main - 1, -1, -1) if reverse else range(main, T)
    for t in seq:
        nxt = t + 1 if reverse else t - 1
        if 0 <= nxt < T:
            torch.addcmul(b[:, t], a[:, t], out[:, nxt], out=out[:, t])
        elif s is not None:
            torch.addcmul(b[:, t], a[:, t], s, out=out[:, t])
        else:
            out[:, t].copy_(b[:, t])
    return out


@torch.no_grad()
def scan_fwd(a: Tensor, b: Tensor, h0: Tensor | None, chunk: int = 0) -> Tensor:
    """h_BTD with h_t = a_t ⊙ h_{t−1} + b_t, h_{−1} = h0_BD (zeros if None), in ``a``'s dtype."""
    out = torch.empty(a.shape, dtype=compute_dtype(a), device=a.device)
    with torch.inference_mode():  # less dispatch work per op; out stays a normal tensor
        scan_into(a, b, h0, out, reverse=False, chunk=chunk)
    return out if out.dtype == a.dtype else out.to(a.dtype)


@torch.no_grad()
def scan_bwd(
    a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, chunk: int = 0
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of the linear scan from dh_BTD = dL/dh: (da_BTD, db_BTD, dh0_BD or None).

    g_t = dh_t + a_{t+1} ⊙ g_{t+1} (g_{T−1} = dh_{T−1}) is a reverse scan over the first T − 1
    steps with coefficients ``a[:, 1:]`` (a view: the shift costs nothing); db = g,
    da_t = g_t ⊙ h_{t−1} (h_{−1} = h0), dh0 = a_0 ⊙ g_0.
    """
    T = a.shape[1]
    g = torch.empty(dh.shape, dtype=compute_dtype(a), device=a.device)
    da = torch.empty_like(a)
    with torch.inference_mode():
        g[:, -1].copy_(dh[:, -1])
        if T > 1:
            scan_into(a[:, 1:], dh[:, :-1], g[:, -1], g[:, :-1], reverse=True, chunk=chunk)
            torch.mul(g[:, 1:], h[:, :-1], out=da[:, 1:])
        if h0 is None:
            da[:, 0].zero_()
        else:
            torch.mul(g[:, 0], h0, out=da[:, 0])
    dh0 = None if h0 is None else (a[:, 0] * g[:, 0]).to(h0.dtype)
    return da, (g if g.dtype == dh.dtype else g.to(dh.dtype)), dh0
