"""The recurrence kernels' references and custom ops: fast forms against the loops, gradcheck."""

from __future__ import annotations

import pytest
import torch

from rnnpipe import kernels
from rnnpipe.kernels import reference as R

SHAPES = [(2, 1, 5), (3, 17, 7), (1, 64, 3), (2, 37, 11)]  # T = 1, prime T, T a square, ...


def rand(*shape, dtype=torch.float64, positive=False, grad=True):
    x = torch.rand(*shape, dtype=dtype) if positive else torch.randn(*shape, dtype=dtype)
    return x.requires_grad_(grad)


def grads(out, inputs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, dtype=o.dtype, generator=gen) for o in out]
    return torch.autograd.grad(
        sum((o * w).sum() for o, w in zip(out, weights, strict=True)),
        [x for x in inputs if x is not None],
        allow_unused=True,
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_linear_scan_op_matches_the_loop(shape, with_h0):
    B, T, D = shape
    a, b = rand(B, T, D, positive=True), rand(B, T, D)
    h0 = rand(B, D) if with_h0 else None
    h, h_last = kernels.linear_scan(a, b, h0)
    h_ref, last_ref = R.linear_scan_loop(a, b, h0)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_last, last_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads([h, h_last], [a, b, h0]), grads([h_ref, last_ref], [a, b, h0]), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [1, 2, 5, 64, 100])
def test_chunked_scan_any_chunk_size_and_zero_coefficients(chunk):
    a, b = torch.rand(2, 23, 4, dtype=torch.float64), torch.randn(2, 23, 4, dtype=torch.float64)
    a[:, 5] = 0.0  # a reset: chunked forms that divide by a cumulative product break here
    a[:, 6:9] = 1e-30
    torch.testing.assert_close(
        R.scan_fwd(a, b, None, chunk=chunk), R.linear_scan_loop(a, b)[0], rtol=0, atol=1e-13
    )


RECURRENCES = {
    "lrn": (kernels.lrn_recurrence, R.lrn_loop, 3),
    "olrn": (kernels.olrn_recurrence, R.olrn_loop, 4),
}


@pytest.mark.parametrize("name", list(RECURRENCES))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_lrn_family_ops_match_the_loop(name, shape, with_h0):
    op, loop, n = RECURRENCES[name]
    B, T, D = shape
    xs = [rand(B, T, D) for _ in range(n)]
    h0 = rand(B, D) if with_h0 else None
    out, ref = op(*xs, h0), loop(*xs, h0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads(out, [*xs, h0]), grads(ref, [*xs, h0]), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_c0", [False, True])
def test_sru_op_matches_the_loop(shape, with_c0):
    B, T, D = shape
    xs = [rand(B, T, D) for _ in range(4)]
    vf, vr = rand(D), rand(D)
    c0 = rand(B, D) if with_c0 else None
    h, c_last = kernels.sru_recurrence(*xs, vf, vr, c0)
    h_ref, c_ref = R.sru_loop(*xs, vf, vr, c0)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c_last, c_ref[:, -1], rtol=1e-12, atol=1e-12)
    inputs = [*xs, vf, vr, c0]
    for g, g_ref in zip(grads([h, c_last], inputs), grads([h_ref, c_ref[:, -1]], inputs), strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_gradcheck_every_op_in_float64():
    B, T, D = 2, 6, 3
    a, b, h0 = rand(B, T, D, positive=True), rand(B, T, D), rand(B, D)
    assert torch.autograd.gradcheck(lambda a, b, h0: kernels.linear_scan(a, b, h0), (a, b, h0))
    q, k, v, o = (rand(B, T, D) for _ in range(4))
    assert torch.autograd.gradcheck(lambda q, k, v, h0: kernels.lrn_recurrence(q, k, v, h0), (q, k, v, h0))
    assert torch.autograd.gradcheck(lambda *x: kernels.olrn_recurrence(*x), (q, k, v, o, h0))
    vf, vr = rand(D), rand(D)
    assert torch.autograd.gradcheck(lambda *x: kernels.sru_recurrence(*x), (q, k, v, o, vf, vr, h0))
    assert torch.autograd.gradcheck(lambda *x: kernels.sru_recurrence(*x), (q, k, v, o, vf, vr))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    a = torch.rand(2, 300, 8) * 0.02 + 0.98  # a long product: float16 state would drift
    b = torch.randn(2, 300, 8)
    h, h_last = kernels.linear_scan(a.to(dtype), b.to(dtype))
    assert h.dtype == dtype and h_last.dtype == dtype
    expected = R.linear_scan_loop(a.to(dtype).double(), b.to(dtype).double())[0]
    torch.testing.assert_close(h.double(), expected, rtol=1e-2, atol=2e-2)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"linear_scan: input shapes differ"):
        kernels.linear_scan(torch.rand(2, 3, 4), torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match=r"h0 must be \[B, D\]"):
        kernels.lrn_recurrence(*(torch.rand(2, 3, 4) for _ in range(3)), torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"T >= 1"):
        kernels.linear_scan(torch.rand(2, 0, 4), torch.rand(2, 0, 4))
    with pytest.raises(TypeError, match="int64"):
        kernels.linear_scan(torch.ones(1, 2, 3, dtype=torch.int64), torch.ones(1, 2, 3, dtype=torch.int64))


def test_dispatch_can_be_forced(monkeypatch):
    x = torch.rand(1, 2, 3)
    monkeypatch.setenv("RNNPIPE_KERNELS", "reference")
    assert kernels.backend(x) is R
    monkeypatch.setenv("RNNPIPE_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="RNNPIPE_KERNELS must be"):
        kernels.backend(x)
    monkeypatch.setenv("RNNPIPE_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.backend(x)


def test_torch_compile_traces_through_the_ops():
    a, b = torch.rand(2, 9, 4), torch.randn(2, 9, 4)
    q, k, v = (torch.randn(2, 9, 4) for _ in range(3))

    def f(a, b, q, k, v):
        return kernels.linear_scan(a, b)[0].sum() + kernels.lrn_recurrence(q, k, v)[0].sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(a, b, q, k, v), f(a, b, q, k, v))
