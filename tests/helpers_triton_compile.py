"""Compile every Triton kernel variant the launchers use, for real GPU targets, without a GPU.

Run by tests/unit/kernels/test_kernels_triton.py in a process without TRITON_INTERPRET (the interpreter runs
kernels but never compiles them, so it cannot catch what only the compiler rejects). Triton ships
its own LLVM and ptxas: TTIR → TTGIR → LLVM IR → PTX → cubin works on a CPU-only machine.
Prints one line per compiled variant and exits non-zero on the first failure.

``--cubins DIR`` also writes each cubin to DIR as ``sm<arch>-<name>-<dtype>-<flags>.cubin``, for
the SASS checks (tests/helpers_sass.py).

Each variant is specialised as Triton specialises a launch at the shipped shapes (e.g. wiki-350m:
B = 8, T = 2048, D = 1536 on an H100): the feature strides are 1 (Triton makes an int argument
equal to 1 a constant), every other int argument and every pointer is a multiple of 16, and the
program has the launchers' BLOCK_D and num_warps.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rnnpipe.kernels import triton_rnn, triton_scan

FP32_ALWAYS = {"SUM_P", "SUM_H", "DVF", "DVR"}  # buffers the launchers always allocate in float32
RNN_BLOCK = 32  # triton_rnn._grid's choice at B = 8, D = 1536 on 132 SMs
SCAN_BLOCK = 128


def compile_variant(fn, dtype: str, flags: dict[str, object], target: GPUTarget) -> bytes:
    """The cubin of ``fn`` with these constexpr ``flags``; pointers ``dtype`` (bf16, fp32, ...)."""
    names = fn.arg_names
    constexpr = {names[i] for i in fn.constexprs}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in constexpr:
            signature[name] = "constexpr"
            constants[(i,)] = flags[name]
        elif name.endswith("_sd"):  # a feature stride of 1: a constant once specialised
            signature[name] = "constexpr"
            constants[(i,)] = 1
        elif name.islower() or name in ("T", "D", "CHUNK"):  # sizes and the other strides
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "*fp32" if name in FP32_ALWAYS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": warps(flags["BLOCK_D"], fn)}
    return triton.compile(source, target=target, options=options).asm["cubin"]


def warps(block: int, fn) -> int:
    """The launchers' num_warps for a program of ``block`` channels."""
    return triton_scan._blocks(block)[1] if fn is triton_scan._scan_kernel else triton_rnn._warps(block)


def variants() -> Iterator[tuple[str, object, dict[str, object]]]:
    """(name, kernel, constexpr flags) of every variant the launchers use."""
    # (REVERSE, SHIFT, HAS_INIT, WRITE_OUT, WRITE_SUM, WRITE_DCOEF, HAS_H0), as scan_fwd/scan_bwd use them
    scan_flags = [
        (False, False, False, True, False, False, False),  # forward, one chunk, no h0
        (False, False, True, True, False, False, False),  # forward with h0 / final pass / chunk carries
        (False, False, False, False, True, False, False),  # forward chunk summaries
        (True, True, False, False, True, False, False),  # backward chunk summaries
        (True, False, False, True, False, False, False),  # backward carries over chunks
        (True, True, False, True, False, True, False),  # backward, one chunk, no h0
        (True, True, True, True, False, True, True),  # backward final pass with h0
    ]
    keys = ("REVERSE", "SHIFT", "HAS_INIT", "WRITE_OUT", "WRITE_SUM", "WRITE_DCOEF", "HAS_H0")
    for flags in scan_flags:
        yield "scan", triton_scan._scan_kernel, {**dict(zip(keys, flags, strict=True)), "BLOCK_D": SCAN_BLOCK}
    for gate, h0 in itertools.product((False, True), (False, True)):
        flags = {"OUTPUT_GATE": gate, "HAS_H0": h0, "BLOCK_D": RNN_BLOCK}
        yield "olrn" if gate else "lrn", triton_rnn._lrn_fwd_kernel, flags
        yield ("olrn" if gate else "lrn") + "_bwd", triton_rnn._lrn_bwd_kernel, flags
    for h0 in (False, True):
        yield "sru", triton_rnn._sru_fwd_kernel, {"HAS_H0": h0, "BLOCK_D": RNN_BLOCK}
        for dc in (False, True):  # without dL/dc (only h used, the mixers' case) and with it
            yield "sru_bwd", triton_rnn._sru_bwd_kernel, {"HAS_H0": h0, "HAS_DC": dc, "BLOCK_D": RNN_BLOCK}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archs", nargs="*", default=["90"], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--cubins", type=Path, help="also write each cubin to this folder")
    args = parser.parse_args()
    for arch in args.archs:
        target = GPUTarget("cuda", int(arch), 32)
        for name, fn, flags in variants():
            for dtype in ("fp32", "bf16"):
                cubin = compile_variant(fn, dtype, flags, target)
                on = ",".join(k for k, v in flags.items() if v is True) or "-"
                if args.cubins:
                    (args.cubins / f"sm{arch}-{name}-{dtype}-{on}.cubin").write_bytes(cubin)
                print(f"sm_{target.arch} {name:9s} {dtype} [{on}] cubin {len(cubin)} bytes", flush=True)


if __name__ == "__main__":
    main()
