"""The CPU kernels (kernels/cpu_scan.py, kernels/cpu_rnn.py) against the loop oracles.

T is and is not a multiple of the scan's chunk (prime T, T = 1, T under the chunk), with and
without an initial state, float32 and float64, both directions, the backward's time blocks cut
small so that several blocks (and a short last one) run, and the packed-projection ops.
"""

from __future__ import annotations

import pytest
import torch

from rnnpipe import kernels
from rnnpipe.kernels import cpu_native, cpu_rnn, cpu_scan, ops
from rnnpipe.kernels import reference as R

TS = [1, 2, 5, 16, 17, 31, 64, 97]  # T = 1, under the chunk, sequential, primes, a square
TOL = {torch.float64: {"rtol": 1e-11, "atol": 1e-11}, torch.float32: {"rtol": 2e-5, "atol": 2e-5}}


def weighted_grads(outs, inputs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, dtype=o.dtype, generator=gen)).sum() for o in outs)
    return torch.autograd.grad(loss, [x for x in inputs if x is not None])


def assert_same(outs, refs, inputs, dtype):
    for o, r in zip(outs, refs, strict=True):
        torch.testing.assert_close(o, r, **TOL[dtype])
    for g, g_ref in zip(weighted_grads(outs, inputs), weighted_grads(refs, inputs), strict=True):
        torch.testing.assert_close(g, g_ref, **TOL[dtype])


@pytest.fixture
def small_blocks(monkeypatch):
    """Backward blocks of 3 time steps at B·D = 6: several blocks and a short last one."""
    monkeypatch.setattr(cpu_rnn, "_BLOCK_ELEMS", 18)


@pytest.mark.parametrize("T", [*TS, 1009])
def test_plan_covers_t_without_padding(T):
    C, n = cpu_scan.plan(T)
    assert 1 <= n * C <= T and (n == 1 or T - n * C < C)
    assert cpu_scan.plan(T)[0] * cpu_scan.plan(T)[1] == T or all(T % c for c in range(2, C + 1))


def test_plan_chunk_divides_the_benchmark_lengths():
    for T in (512, 4096, 8192, 16384):
        C, n = cpu_scan.plan(T)
        assert C * n == T and C > 1 and n > 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("with_h0", [False, True])
def test_linear_scan_matches_the_loop(T, with_h0, dtype):
    a = torch.rand(2, T, 3, dtype=dtype).requires_grad_()
    b = torch.randn(2, T, 3, dtype=dtype).requires_grad_()
    h0 = torch.randn(2, 3, dtype=dtype).requires_grad_() if with_h0 else None
    assert_same(kernels.linear_scan(a, b, h0), R.linear_scan_loop(a, b, h0), [a, b, h0], dtype)


@pytest.mark.parametrize("T", [1, 7, 23, 97])
@pytest.mark.parametrize("chunk", [0, 1, 3, 5])
@pytest.mark.parametrize("with_s", [False, True])
def test_scan_into_both_directions_on_strided_views(T, chunk, with_s):
    x = torch.rand(2, T, 8, dtype=torch.float64)
    a, b = x[..., :4], x[..., 4:] - 0.5  # views with a batch and time stride, as the kernels get them
    s = torch.randn(2, 4, dtype=torch.float64) if with_s else None
    out = torch.empty(2, 2 * T, 4, dtype=torch.float64)[:, ::2]  # a strided output as well
    fwd = cpu_scan.scan_into(a, b, s, out, reverse=False, chunk=chunk).clone()
    torch.testing.assert_close(fwd, R.linear_scan_loop(a, b, s)[0], rtol=1e-12, atol=1e-12)
    rev = cpu_scan.scan_into(a, b, s, out, reverse=True, chunk=chunk)
    flip = R.linear_scan_loop(a.flip(1), b.flip(1), s)[0].flip(1)
    torch.testing.assert_close(rev, flip, rtol=1e-12, atol=1e-12)


def test_scan_pads_nothing(monkeypatch):
    """No cat or padding on any path: the remainder of a prime T runs in place."""

    def refuse(*args, **kwargs):
        raise AssertionError("the scan copied its input")

    a, b = torch.rand(2, 1009, 3, requires_grad=True), torch.randn(2, 1009, 3, requires_grad=True)
    ref = R.linear_scan_loop(a, b)[0]
    monkeypatch.setattr(torch, "cat", refuse)
    monkeypatch.setattr(torch.nn.functional, "pad", refuse)
    h, _ = kernels.linear_scan(a, b)
    h.sum().backward()
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)


LRN = {"lrn": (kernels.lrn_recurrence, R.lrn_loop, 3), "olrn": (kernels.olrn_recurrence, R.olrn_loop, 4)}


@pytest.fixture(params=["C", "torch"])
def forward_path(request, monkeypatch):
    """Both forwards of LRN and oLRN on CPU: the C loop (kernels/cpu_native.py) and the PyTorch one."""
    if request.param == "C":
        if cpu_native.library() is None:
            pytest.skip("no C compiler here: the C forward cannot be built (the PyTorch one is tested)")
    else:
        monkeypatch.setattr(cpu_native, "forward", lambda *a: None)
    return request.param


@pytest.mark.parametrize("name", list(LRN))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 2, 7, 17])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_lrn_family_matches_the_loop(small_blocks, forward_path, name, dtype, T, with_h0, packed):
    op, loop, n = LRN[name]
    B, D = 2, 3
    if packed:  # a projection's column blocks: the packed op, one gradient tensor
        p = torch.randn(B, T, n * D, dtype=dtype).requires_grad_()
        xs, leaves = p.chunk(n, -1), [p]
        assert ops.packed_source(xs) is p
    else:
        xs = [torch.randn(B, T, D, dtype=dtype).requires_grad_() for _ in range(n)]
        leaves = list(xs)
        assert ops.packed_source(tuple(xs)) is None
    h0 = torch.randn(B, D, dtype=dtype).requires_grad_() if with_h0 else None
    assert_same(op(*xs, h0), loop(*xs, h0), [*leaves, h0], dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 2, 7, 17])
@pytest.mark.parametrize("with_c0", [False, True])
@pytest.mark.parametrize("use_c", [False, True])
def test_sru_matches_the_loop(small_blocks, dtype, T, with_c0, use_c):
    B, D = 2, 3
    xs = [torch.randn(B, T, D, dtype=dtype).requires_grad_() for _ in range(4)]
    vf, vr = (torch.rand(D, dtype=dtype).requires_grad_() for _ in range(2))
    c0 = torch.randn(B, D, dtype=dtype).requires_grad_() if with_c0 else None
    h, c_last = kernels.sru_recurrence(*xs, vf, vr, c0)
    h_ref, c_ref = R.sru_loop(*xs, vf, vr, c0)
    outs, refs = ([h, c_last], [h_ref, c_ref[:, -1]]) if use_c else ([h], [h_ref])  # dc None or not
    assert_same(outs, refs, [*xs, vf, vr, c0], dtype)


def test_packed_source_refuses_what_is_not_a_projection():
    p = torch.randn(2, 5, 12)
    q, k, v = p.chunk(3, -1)
    assert ops.packed_source((q, k, v)) is p
    assert ops.packed_source((k, q, v)) is None  # out of order
    assert ops.packed_source(tuple(p[..., :9].chunk(3, -1))) is None  # a part of the columns
    assert ops.packed_source(tuple(p.chunk(4, -1))[:3]) is None  # columns of a wider tensor


@pytest.mark.parametrize("name", ["lrn", "olrn"])
def test_the_mixers_projection_takes_the_packed_op(monkeypatch, name):
    """nn.Linear on [B, T, D] computes on a flattened view, so its output is itself a view: the
    mixers' ``proj(x).chunk(n, -1)`` still reaches the packed op, with the plain op's values and
    gradients."""
    from rnnpipe.pipeline.models.mixers import LRN, OLRN

    calls = []
    packed = ops.lrn_packed_op
    monkeypatch.setattr(ops, "lrn_packed_op", lambda *a: calls.append(1) or packed(*a))
    torch.manual_seed(0)
    mixer = (LRN if name == "lrn" else OLRN)(8).double()
    x = torch.randn(3, 11, 8, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    h, _ = mixer(x, h0)
    assert calls == [1]
    xs = [t.clone() for t in mixer.proj(x).chunk(4 if name == "olrn" else 3, -1)]  # not packed
    assert ops.packed_source(tuple(xs)) is None
    ref = ops.lrn_op(*xs, h0) if name == "lrn" else ops.olrn_op(*xs, h0)
    assert_same([h], [ref], [x, h0, *mixer.parameters()], torch.float64)


@pytest.mark.parametrize("gated", [False, True])
def test_the_c_forward_reads_any_batch_and_time_strides(gated):
    """Each of q, k, v, o with its own strides (a transposed batch, every other step), on 2 threads
    (rows split across them), against the PyTorch forward."""
    if cpu_native.library() is None:
        pytest.skip("no C compiler here: the C forward cannot be built")
    B, T, D = 5, 40, 96  # B·T·D above the one-thread limit
    xs = [
        torch.randn(T * 2, B, D).transpose(0, 1)[:, ::2],  # batch stride D, time stride 2·B·D
        torch.randn(B, T, D),  # contiguous
        torch.randn(B, T, 3 * D)[..., D : 2 * D],  # a projection's column block
        torch.randn(B, 2 * T, D)[:, 1::2],  # every other step, from the second
    ][: 4 if gated else 3]
    assert len({x.stride() for x in xs}) == len(xs)
    h0 = torch.randn(D, B).t()  # not contiguous
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        h = cpu_native.forward(*xs[:3], xs[3] if gated else None, h0)
    finally:
        torch.set_num_threads(threads)
    assert h is not None and h.is_contiguous()
    ref = (R.olrn_loop(*xs, h0) if gated else R.lrn_loop(*xs, h0))[0]
    torch.testing.assert_close(h, ref, **TOL[torch.float32])


def test_the_c_forward_builds_once_per_cache_and_falls_back_without_a_compiler(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RNNPIPE_NATIVE_CACHE", str(tmp_path / "cache"))
    cpu_native.library.cache_clear()
    try:
        monkeypatch.setenv("CC", "no-such-compiler")
        with caplog.at_level("INFO", logger="rnnpipe.kernels"):
            assert cpu_native.library() is None
        assert "no C compiler (no-such-compiler)" in caplog.text
        monkeypatch.setenv("CC", "false")  # a compiler that fails: a warning, no library, no file
        cpu_native.library.cache_clear()
        with caplog.at_level("INFO", logger="rnnpipe.kernels"):
            assert cpu_native.library() is None
        assert "building lrn_forward.c failed (exit 1)" in caplog.text
        assert list((tmp_path / "cache").iterdir()) == []
        x = torch.randn(2, 3, 4)
        assert cpu_native.forward(x, x, x, None, None) is None  # the PyTorch loop runs instead
        torch.testing.assert_close(kernels.lrn_recurrence(x, x, x)[0], R.lrn_loop(x, x, x)[0])
        monkeypatch.delenv("CC")
        cpu_native.library.cache_clear()
        if cpu_native.library() is None:
            pytest.skip("no C compiler here: the C forward cannot be built")
        built = sorted((tmp_path / "cache").iterdir(), key=lambda p: p.suffix != ".so")
        assert [p.suffix for p in built] == [".so", ".sha256"]  # the library and its hash: no temporary left
        mtime = built[0].stat().st_mtime_ns
        cpu_native.library.cache_clear()
        assert cpu_native.library() is not None
        assert built[0].stat().st_mtime_ns == mtime  # loaded, not built again
    finally:
        cpu_native.library.cache_clear()


def test_bfloat16_packed_lrn_accumulates_in_float32():
    p = torch.randn(2, 40, 12)
    h, _ = kernels.lrn_recurrence(*p.bfloat16().requires_grad_().chunk(3, -1))
    assert h.dtype == torch.bfloat16
    ref, _ = R.lrn_loop(*p.bfloat16().double().chunk(3, -1))
    torch.testing.assert_close(h.double(), ref, rtol=2e-2, atol=2e-2)


def test_bfloat16_sru_accumulates_in_float32():
    xs = [torch.randn(2, 40, 6) for _ in range(4)]
    vf, vr = torch.rand(6), torch.rand(6)
    h, c_last = kernels.sru_recurrence(*(x.bfloat16() for x in xs), vf.bfloat16(), vr.bfloat16())
    assert h.dtype == c_last.dtype == torch.bfloat16
    h_ref, _ = R.sru_loop(
        *(x.bfloat16().double() for x in xs), vf.bfloat16().double(), vr.bfloat16().double()
    )
    torch.testing.assert_close(h.double(), h_ref, rtol=2e-2, atol=2e-2)


def test_inference_mode_then_training_reuses_scratch_safely():
    p = torch.randn(4, 33, 24)
    with torch.inference_mode():
        h_inf, _ = kernels.olrn_recurrence(*p.chunk(4, -1))
    leaf = p.clone().requires_grad_()
    h, _ = kernels.olrn_recurrence(*leaf.chunk(4, -1))
    h.sum().backward()
    torch.testing.assert_close(h.detach(), h_inf)
    ref = leaf.detach().clone().requires_grad_()
    R.olrn_loop(*ref.chunk(4, -1))[0].sum().backward()
    torch.testing.assert_close(leaf.grad, ref.grad, rtol=1e-5, atol=1e-5)
