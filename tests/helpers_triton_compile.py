"""Compile every Triton kernel variant the launchers use, for real GPU targets, without a GPU.

Run by tests/test_kernels_triton.py in a process without TRITON_INTERPRET (the interpreter runs
kernels but never compiles them, so it cannot catch what only the compiler rejects). Triton ships
its own LLVM and ptxas: TTIR → TTGIR → LLVM IR → PTX → cubin works on a CPU-only machine.
Prints one line per compiled variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rnnpipe.kernels import triton_rnn, triton_scan

FP32_ALWAYS = {"SUM_P", "SUM_H", "DVF", "DVR"}  # buffers the launchers always allocate in float32


def compile_variant(fn, dtype: str, flags: dict[str, object], target: GPUTarget) -> int:
    names = fn.arg_names
    constexpr = {names[i] for i in fn.constexprs}
    signature, constants = {}, {}
    for i, name in enumerate(names):
        if name in constexpr:
            signature[name] = "constexpr"
            constants[(i,)] = flags[name]
        elif name in ("T", "D", "CHUNK"):
            signature[name] = "i32"
        else:
            signature[name] = "*fp32" if name in FP32_ALWAYS else f"*{dtype}"
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constants), target=target)
    return len(kernel.asm["cubin"])


def variants():
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
        yield "scan", triton_scan._scan_kernel, {**dict(zip(keys, flags, strict=True)), "BLOCK_D": 128}
    for gate, h0 in itertools.product((False, True), (False, True)):
        flags = {"OUTPUT_GATE": gate, "HAS_H0": h0, "BLOCK_D": 64}
        yield "olrn" if gate else "lrn", triton_rnn._lrn_fwd_kernel, flags
        yield ("olrn" if gate else "lrn") + "_bwd", triton_rnn._lrn_bwd_kernel, flags
    for h0 in (False, True):
        yield "sru", triton_rnn._sru_fwd_kernel, {"HAS_H0": h0, "BLOCK_D": 64}
        yield "sru_bwd", triton_rnn._sru_bwd_kernel, {"HAS_H0": h0, "BLOCK_D": 64}


def main() -> None:
    targets = [GPUTarget("cuda", int(arch), 32) for arch in sys.argv[1:] or ["90"]]
    for target in targets:
        for name, fn, flags in variants():
            for dtype in ("fp32", "bf16"):
                size = compile_variant(fn, dtype, flags, target)
                on = ",".join(k for k, v in flags.items() if v is True) or "-"
                print(f"sm_{target.arch} {name:9s} {dtype} [{on}] cubin {size} bytes", flush=True)


if __name__ == "__main__":
    main()
