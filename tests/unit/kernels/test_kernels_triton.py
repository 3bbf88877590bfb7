"""The Triton kernels against the references: on a GPU when there is one, else in Triton's
interpreter (TRITON_INTERPRET=1, set by conftest before the kernels load) at small shapes. Also:
strided and packed inputs against the float64 loop oracles with no copy made, every variant
compiled for sm_80 and sm_90, and the compiled loops checked to be software-pipelined (SASS)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


# ------------------------------------------------------------------ strided and packed inputs


@pytest.fixture
def no_copies(monkeypatch):
    """Fails the test if code in rnnpipe/kernels/ makes a contiguous copy of a tensor: the kernels
    read every input by its strides, so ``.contiguous()`` may only be called where it is a no-op."""
    kernels_dir = Path(kernels.__file__).parent
    original = torch.Tensor.contiguous
    copies = []

    def spy(self, memory_format=torch.contiguous_format):
        if not self.is_contiguous(memory_format=memory_format):
            caller = sys._getframe(1).f_code
            if Path(caller.co_filename).parent == kernels_dir:
                copies.append(f"{caller.co_filename}:{caller.co_name} copied {tuple(self.shape)}")
        return original(self, memory_format=memory_format)

    monkeypatch.setattr(torch.Tensor, "contiguous", spy)
    yield copies
    assert not copies, copies


class Launches:
    """Records the arguments of a Triton kernel's launches (``kernel[grid](*args)``)."""

    def __init__(self, kernel) -> None:
        self.kernel, self.args = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.args.append(dict(zip(self.kernel.arg_names, args, strict=False)))
            return self.kernel[grid](*args, **kwargs)

        return launch


def against_the_oracle(run, oracle, leaves, dtype):
    """``run`` (the Triton kernels) on ``leaves`` in ``dtype`` and ``oracle`` (an fp64 loop of
    reference.py) on the same values in float64: assert their outputs and the gradients of the
    leaves (through a fixed random projection of the outputs) match."""
    results = []
    for fn, as_type in ((run, dtype), (oracle, torch.float64)):
        xs = [x.to(dtype).to(as_type).requires_grad_() for x in leaves]  # the same (rounded) values
        outs = fn(*[x.to(DEVICE) for x in xs])
        gen = torch.Generator().manual_seed(1)
        loss = sum(
            (o.double() * torch.randn(o.shape, generator=gen).to(DEVICE, torch.float64)).sum() for o in outs
        )
        results.append([t.double() for t in (*outs, *torch.autograd.grad(loss, xs))])
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y, **TOL[dtype], check_dtype=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["lrn", "olrn"])
def test_the_packed_projection_is_read_and_its_gradient_written_in_place(monkeypatch, no_copies, dtype, name):
    """LRN's q, k, v (and oLRN's o) as a mixer makes them, ``proj(x).chunk(n, -1)``: the kernels
    get pointers into the projection itself (no copy), write dq, dk, dv (, do) into the column
    blocks of one gradient, and match the fp64 loop; h0 is a strided view (a previous h[:, -1])."""
    from rnnpipe.kernels import triton_rnn

    B, T, D, n = 2, 5, 12, 3 if name == "lrn" else 4
    fwd, bwd = Launches(triton_rnn._lrn_fwd_kernel), Launches(triton_rnn._lrn_bwd_kernel)
    monkeypatch.setattr(triton_rnn, "_lrn_fwd_kernel", fwd)
    monkeypatch.setattr(triton_rnn, "_lrn_bwd_kernel", bwd)
    fn, loop = (
        (kernels.lrn_recurrence, R.lrn_loop) if name == "lrn" else (kernels.olrn_recurrence, R.olrn_loop)
    )
    p, last_h = torch.randn(B, T, n * D), torch.randn(B, 3, D)
    against_the_oracle(
        lambda p, last_h: fn(*p.chunk(n, -1), last_h[:, -1])[:1],
        lambda p, last_h: loop(*p.chunk(n, -1), last_h[:, -1])[:1],
        [p, last_h],
        dtype,
    )
    (f,), (b,) = fwd.args, bwd.args
    size = torch.empty(0, dtype=dtype).element_size()
    inputs, grads = ["Q", "K", "V", "OG"][:n], ["DQ", "DK", "DV", "DOG"][:n]
    assert [f[k].data_ptr() - f["Q"].data_ptr() for k in inputs] == [j * D * size for j in range(n)]
    assert [b[k].data_ptr() - b["DQ"].data_ptr() for k in grads] == [j * D * size for j in range(n)]
    assert f["q_st"] == n * D and b["g_st"] == n * D and f["h0_sb"] == 3 * D


@pytest.mark.parametrize("name", ["LRN", "OLRN", "SRU"])
def test_the_mixers_projection_reaches_the_kernels_uncopied(monkeypatch, no_copies, name):
    """A mixer's ``nn.Linear`` output (a view of the flattened matmul) goes to the kernels as it
    is: the same output and gradients as on the reference, and no copy of the projection."""
    from rnnpipe.kernels import ops
    from rnnpipe.pipeline.models import mixers

    packed, calls = ops.lrn_packed_op, []
    monkeypatch.setattr(
        ops, "lrn_packed_op", lambda *a: calls.append(os.environ["RNNPIPE_KERNELS"]) or packed(*a)
    )
    torch.manual_seed(0)
    mixer = getattr(mixers, name)(12).to(DEVICE)
    x = torch.randn(2, 5, 12, device=DEVICE)
    results = []
    for choice in ("triton", "reference"):
        monkeypatch.setenv("RNNPIPE_KERNELS", choice)
        xs = x.clone().requires_grad_()
        y, _ = mixer(xs)
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        grads = torch.autograd.grad((y * weights).sum(), [xs, *mixer.parameters()])
        results.append([y, *grads])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL[torch.float32])
    assert calls == ([] if name == "SRU" else ["triton", "reference"])  # LRN's: the packed op on both


# [B, T, D] inputs laid out otherwise than contiguous: (make the base, view it as [B, T, D])
LAYOUTS = {
    "a column block": (lambda B, T, D: torch.randn(B, T, 2 * D), lambda x: x[..., x.shape[-1] // 2 :]),
    "feature stride T": (lambda B, T, D: torch.randn(B, D, T), lambda x: x.transpose(1, 2)),
    "time stride B·D": (lambda B, T, D: torch.randn(T, B, D), lambda x: x.transpose(0, 1)),
}
STRIDED = {  # op -> (Triton path, fp64 loop oracle, number of [B, T, D] inputs)
    "lrn": (kernels.lrn_recurrence, R.lrn_loop, 3),
    "olrn": (kernels.olrn_recurrence, R.olrn_loop, 4),
    "sru": (kernels.sru_recurrence, R.sru_loop, 4),
    "scan": (kernels.linear_scan, R.linear_scan_loop, 2),
}


@pytest.mark.parametrize("name", list(STRIDED))
def test_strided_views_match_the_fp64_loops_without_a_copy(no_copies, name):
    """Inputs in every layout of LAYOUTS and a strided initial state (a view [:, 1] of a
    [B, 2, D] tensor; SRU's v_f, v_r columns of a [D, 2] one): the kernels read them where they
    lie and match the fp64 loops. SRU's loss uses h only: its backward has no dL/dc (HAS_DC off)."""
    B, T, D = 2, 7, 10
    op, oracle, n = STRIDED[name]
    layouts = [LAYOUTS[k] for k in itertools.islice(itertools.cycle(LAYOUTS), n)]
    leaves = [make(B, T, D) for make, _ in layouts]
    if name == "scan":
        leaves[0].uniform_(0.0, 1.0)  # decays
    leaves += [torch.randn(D, 2)] if name == "sru" else []
    leaves.append(torch.randn(B, 2, D))

    def call(fn):
        def run(*xs):
            views = [view(x) for (_, view), x in zip(layouts, xs[:n], strict=True)]
            vs = (xs[n][:, 0], xs[n][:, 1]) if name == "sru" else ()
            return fn(*views, *vs, xs[-1][:, 1])[:1]

        return run

    against_the_oracle(call(op), call(oracle), leaves, torch.float32)


@pytest.mark.parametrize("chunks", [1, 3])
def test_strided_linear_scan_in_chunks(no_copies, chunks):
    """The chunked scan's three launches (summaries, the scan over chunks from a strided h0, the
    final pass) on strided a, b, dh: the reference's numbers on contiguous copies."""
    from rnnpipe.kernels import triton_scan

    B, T, D = 2, 11, 6
    a = torch.rand(B, D, T, device=DEVICE).transpose(1, 2)
    b = torch.randn(B, T, 2 * D, device=DEVICE)[..., D:]
    h0 = torch.randn(B, 2, D, device=DEVICE)[:, 1]
    dh = torch.randn(T, B, D, device=DEVICE).transpose(0, 1)
    h = triton_scan.scan_fwd(a, b, h0, chunks=chunks)
    a_c, b_c, h0_c, dh_c = (t.clone(memory_format=torch.contiguous_format) for t in (a, b, h0, dh))
    torch.testing.assert_close(h, R.scan_fwd(a_c, b_c, h0_c), **TOL[torch.float32])
    grads = triton_scan.scan_bwd(a, h, h0, dh, chunks=chunks)
    for x, y in zip(grads, R.scan_bwd(a_c, h, h0_c, dh_c), strict=True):
        torch.testing.assert_close(x, y, **TOL[torch.float32])


# -------------------------------------------------------------- compiled for GPUs, without one


@pytest.fixture(scope="module")
def cubins(tmp_path_factory) -> tuple[list[str], Path]:
    """(one line per compiled variant, the folder of their cubins): every variant compiled for
    sm_80 and sm_90 by tests/helpers_triton_compile.py in a process without TRITON_INTERPRET."""
    from harness import REPO

    folder = tmp_path_factory.mktemp("cubins")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(folder / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    helper = REPO / "tests" / "helpers_triton_compile.py"
    run = subprocess.run(
        [sys.executable, str(helper), "80", "90", "--cubins", str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return [line for line in run.stdout.splitlines() if "cubin" in line], folder


VARIANTS = 7 + 8 + 2 + 4  # scan, LRN/oLRN forward and backward, SRU forward, SRU backward


def test_every_kernel_variant_compiles_for_gpus(cubins):
    """The interpreter runs kernels without compiling them; compile each variant for sm_80 and
    sm_90 (Triton's own LLVM and ptxas, no GPU needed) so compiler-only errors fail here too."""
    lines, _ = cubins
    assert len(lines) == 2 * VARIANTS * 2  # targets × kernel variants × dtypes
    assert all(int(line.split("cubin ")[1].split()[0]) > 1000 for line in lines)


def test_every_loop_loads_the_next_step_before_storing_this_one(cubins):
    """Each variant's sm_90 SASS: in the sequential loop the global loads are issued before the
    stores, and what they load reaches math and stores only in the next pass (step t + 1's
    inputs, loaded while step t computes). The rules and the reader: tests/helpers_sass.py."""
    from helpers_sass import disassemble, loop_problems, parse

    paths = sorted(cubins[1].glob("sm90-*.cubin"))
    assert len(paths) == VARIANTS * 2
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:  # cuobjdump takes about a second per cubin
        sass = dict(zip(paths, pool.map(lambda p: disassemble(p.read_bytes()), paths), strict=True))
    problems = {p.name: found for p, text in sass.items() if (found := loop_problems(parse(text)))}
    report = [f"{name}: {found[0]} (and {len(found) - 1} more)" for name, found in problems.items()]
    assert not problems, f"{len(problems)} of {len(paths)} variants not pipelined:\n" + "\n".join(report)


# Loop bodies in the shape of the kernels' SASS (as cuobjdump -sass prints it, encodings left out).
PLAIN = """
        /*0100*/              @!P2 LDG.E.U16 R9, desc[UR6][R10.64] ;
        /*0110*/                   SHF.L.U32 R9, R9, 0x10, RZ ;
        /*0120*/                   FADD R9, R9, R0 ;
        /*0130*/                   MUFU.EX2 R12, R9 ;
        /*0140*/                   F2FP.BF16.F32.PACK_AB R0, RZ, R12 ;
        /*0150*/               @P0 STG.E.U16 desc[UR6][R8.64], R0 ;
        /*0160*/               @P1 BRA 0x100 ;
"""
ROTATED = """
        /*0100*/                   FFMA R21, R12, R10, R13 ;
        /*0110*/              @!P2 STG.E desc[UR4][R10.64], R21 ;
        /*0120*/              @!P2 LDG.E R12, desc[UR4][R16.64] ;
        /*0130*/               @P1 BRA 0x100 ;
"""
PIPELINED = """
        /*0100*/               @P0 LDG.E.U16 R16, desc[UR12][R4.64] ;
        /*0110*/                   SHF.L.U32 R21, R19, 0x10, RZ ;
        /*0120*/                   FADD R21, -R21, R24 ;
        /*0130*/                   MUFU.EX2 R20, R21 ;
        /*0140*/                   F2FP.BF16.F32.PACK_AB R14, RZ, R20 ;
        /*0150*/              @!P1 STG.E.U16 desc[UR12][R20.64], R14 ;
        /*0160*/                   PRMT R19, R16, 0x7610, R19 ;
        /*0170*/               @P0 BRA 0x100 ;
"""


def test_the_sass_reader_tells_a_pipelined_loop_from_a_plain_one():
    from helpers_sass import loop_problems, parse

    assert "FADD at 0x0120 computes on a value loaded at 0x0100" in loop_problems(parse(PLAIN))[0]
    assert "LDG.E at 0x0120 after the first store at 0x0110" in loop_problems(parse(ROTATED))[0]
    assert loop_problems(parse(PIPELINED)) == []
    labelled = PLAIN.replace("\n        /*0100*/", "\n.L_x_0:\n        /*0100*/").replace(
        "0x100", "`(.L_x_0)"
    )
    assert loop_problems(parse(labelled)) == loop_problems(parse(PLAIN))  # nvdisasm's branches
    stored_as_loaded = PIPELINED.replace("F2FP.BF16.F32.PACK_AB R14, RZ, R20", "MOV R14, R16")
    assert "stores a value loaded at 0x0100" in loop_problems(parse(stored_as_loaded))[0]
    assert loop_problems(parse(PIPELINED.replace("BRA 0x100", "BRA 0x180"))) == [
        "no loop with a global load found"
    ]
