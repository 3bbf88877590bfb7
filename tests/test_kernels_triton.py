"""The Triton kernels against the references: on a GPU when there is one, else in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest before the kernels load) at small shapes."""

from __future__ import annotations

import pytest
import torch

from rnnpipe import kernels
from rnnpipe.kernels import reference as R

triton = pytest.importorskip("triton", reason="Triton is not installed (it is Linux-only)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, T, D): T = 1; T and D not multiples of any block (D = 130 spans two blocks of 128).
SHAPES = [(1, 1, 7), (2, 19, 20), (2, 9, 130)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("RNNPIPE_KERNELS", "triton")
    # The inputs come from the global generator: seeded per test, so a test's numbers do not
    # depend on which tests ran before it (bf16's 2e-2 tolerance is met by the kernels' rounding
    # differences at these shapes, not by every possible draw).
    torch.manual_seed(0)


def both(fn, inputs, dtype, monkeypatch):
    """fn on the Triton kernels and on the reference, with gradients of a random projection."""
    results = []
    for choice in ("triton", "reference"):
        monkeypatch.setenv("RNNPIPE_KERNELS", choice)
        xs = [None if x is None else x.detach().to(DEVICE, dtype).requires_grad_() for x in inputs]
        out = fn(*xs)
        gen = torch.Generator().manual_seed(1)
        loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(DEVICE)).sum() for o in out)
        grads = torch.autograd.grad(loss, [x for x in xs if x is not None])
        results.append(([o.float() for o in out], [g.float() for g in grads]))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_h0", [False, True])
def test_linear_scan(monkeypatch, dtype, shape, with_h0):
    B, T, D = shape
    inputs = [torch.rand(B, T, D), torch.randn(B, T, D), torch.randn(B, D) if with_h0 else None]
    (out, g), (out_ref, g_ref) = both(kernels.linear_scan, inputs, dtype, monkeypatch)
    for x, y in zip(out + g, out_ref + g_ref, strict=True):
        torch.testing.assert_close(x, y, **TOL[dtype])


@pytest.mark.parametrize("chunks", [2, 3, 7])
def test_linear_scan_chunked_in_time(chunks):
    """Long T with small B·D runs chunks of time in parallel: the same numbers."""
    from rnnpipe.kernels import triton_scan

    B, T, D = 2, 29, 6
    a, b, h0 = (
        torch.rand(B, T, D, device=DEVICE),
        torch.randn(B, T, D, device=DEVICE),
        torch.randn(B, D, device=DEVICE),
    )
    h = triton_scan.scan_fwd(a, b, h0, chunks=chunks)
    torch.testing.assert_close(h, R.scan_fwd(a, b, h0), **TOL[torch.float32])
    dh = torch.randn(B, T, D, device=DEVICE)
    for x, y in zip(triton_scan.scan_bwd(a, h, h0, dh, chunks=chunks), R.scan_bwd(a, h, h0, dh), strict=True):
        torch.testing.assert_close(x, y, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["lrn", "olrn"])
def test_lrn_family(monkeypatch, dtype, shape, name):
    B, T, D = shape
    n = 3 if name == "lrn" else 4
    fn = kernels.lrn_recurrence if name == "lrn" else kernels.olrn_recurrence
    inputs = [torch.randn(B, T, D) for _ in range(n)] + [torch.randn(B, D) if T > 1 else None]
    (out, g), (out_ref, g_ref) = both(fn, inputs, dtype, monkeypatch)
    for x, y in zip(out + g, out_ref + g_ref, strict=True):
        torch.testing.assert_close(x, y, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_sru(monkeypatch, dtype, shape):
    B, T, D = shape
    inputs = [torch.randn(B, T, D) for _ in range(4)] + [torch.randn(D), torch.randn(D)]
    inputs.append(torch.randn(B, D) if T > 1 else None)
    (out, g), (out_ref, g_ref) = both(kernels.sru_recurrence, inputs, dtype, monkeypatch)
    for x, y in zip(out + g, out_ref + g_ref, strict=True):
        torch.testing.assert_close(x, y, **TOL[dtype])


def test_float64_is_refused_by_the_triton_path():
    with pytest.raises(TypeError, match="float64 runs on the reference"):
        kernels.linear_scan(
            torch.rand(1, 2, 3, dtype=torch.float64, device=DEVICE),
            torch.rand(1, 2, 3, dtype=torch.float64, device=DEVICE),
        )


def test_every_kernel_variant_compiles_for_gpus(tmp_path):
    """The interpreter runs kernels without compiling them; compile each variant for sm_80 and
    sm_90 (Triton's own LLVM and ptxas, no GPU needed) so compiler-only errors fail here too."""
    import os
    import subprocess
    import sys

    from harness import REPO

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run(
        [sys.executable, str(REPO / "tests" / "helpers_triton_compile.py"), "80", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    lines = [line for line in run.stdout.splitlines() if "cubin" in line]
    assert len(lines) == 2 * 19 * 2  # targets × kernel variants × dtypes
    assert all(int(line.split("cubin ")[1].split()[0]) > 1000 for line in lines)
