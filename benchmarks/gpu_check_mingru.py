"""Section (c) of benchmarks/gpu_check.py: minGRU and minLSTM in bf16 keep forgetting over a long
carried stream, through Triton's scan (tests/unit/models/test_models.py's CPU test, on the GPU).

A decay of 1 − σ(−7) = 0.99909 is exactly 1.0 in bf16: a layer that computed its gates in bf16
stopped forgetting and its state grew with the stream (mean |h| 3x fp32's after 10k tokens). The
layers now compute gates and scan in fp32 and carry an fp32 state (pipeline/models/mixers.py).
"""

from __future__ import annotations

from typing import Any

import torch
from gpu_check_kernels import kernels_backend
from torch import Tensor

from rnnpipe import kernels

# (batch, d_model, chunk, chunks): 10,240 carried tokens on a GPU (the test's stream,
# tests/unit/models/test_models.py::test_a_bf16_min_rnn_keeps_forgetting_over_a_long_carried_stream); a few
# steps in the dry run (Triton's interpreter runs each time step in Python).
MIN_RNN_STREAM, MIN_RNN_STREAM_DRY = (4, 256, 512, 20), (1, 8, 8, 2)


def _bf16_gates(layer: torch.nn.Module, kind: Any, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
    """The layer as it was before its gates went to fp32: gates, decay and scan all in bf16 (for
    scale: what the fix prevents)."""
    from rnnpipe.pipeline.models.config import MixerKind

    if kind is MixerKind.mingru:
        z_pre, h_tilde = layer.proj(x).chunk(2, dim=-1)
        z = torch.sigmoid(z_pre)
        return kernels.linear_scan(1 - z, z * h_tilde, state)
    f_pre, i_pre, h_tilde = layer.proj(x).chunk(3, dim=-1)
    f, i = torch.sigmoid(f_pre), torch.sigmoid(i_pre)
    return kernels.linear_scan(f / (f + i), (i / (f + i)) * h_tilde, state)


def min_rnn_stream(kind: Any, dev: torch.device, stream: tuple[int, int, int, int]) -> dict[str, float]:
    """Mean |h| of the last chunk of a stream carried through a minGRU/minLSTM layer in fp32, in bf16
    (the layer as it is) and in bf16 with bf16 gates (as it was); the gate biases make the decay
    1 − σ(−7) = 0.99909, which bf16 rounds to 1.0."""
    from rnnpipe.pipeline.models.config import MixerKind, ModelConfig
    from rnnpipe.pipeline.models.lm import make_mixer

    B, d, chunk, chunks = stream
    torch.manual_seed(0)
    layer = make_mixer(kind, ModelConfig(mixer=kind, d_model=d))
    with torch.no_grad():
        layer.proj.weight.mul_(0.05)  # the gates' bias decides
        bias = layer.proj.bias.view(-1, d)
        bias.zero_()
        bias[0] = -7.0 if kind is MixerKind.mingru else 7.0  # minGRU: z; minLSTM: f (then i)
        if kind is MixerKind.minlstm:
            bias[1] = -7.0
        bias[-1] = 1.0  # h̃ around 1: what the state accumulates
    half = make_mixer(kind, ModelConfig(mixer=kind, d_model=d)).to(torch.bfloat16)
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in layer.state_dict().items()})
    layer, half = layer.to(dev), half.to(dev)
    x = torch.randn(chunks, B, chunk, d, generator=torch.Generator().manual_seed(1)).to(dev)
    s32 = s16 = s_old = None
    with torch.no_grad():
        for c in range(chunks):
            h32, s32 = layer(x[c], s32)
            h16, s16 = half(x[c].to(torch.bfloat16), s16)
            h_old, s_old = _bf16_gates(half, kind, x[c].to(torch.bfloat16), s_old)
    return {
        "fp32": float(h32.abs().mean()),
        "bf16": float(h16.float().abs().mean()),
        "bf16 gates": float(h_old.float().abs().mean()),
        "state dtype": str(s16.dtype)[6:],
    }


def mingru_section(ctx: dict[str, Any], out: dict[str, Any]) -> None:
    """(c): minGRU and minLSTM in bf16 keep forgetting over a long carried stream (Triton's scan)."""
    from rnnpipe.pipeline.models.config import MixerKind

    dev, dry = ctx["device"], ctx["dry_run"]
    stream = MIN_RNN_STREAM_DRY if dry else MIN_RNN_STREAM
    B, d, chunk, chunks = stream
    out["notes"] = [
        f"one layer, d_model {d}, batch {B}, {chunks} chunks of {chunk} tokens carried ({chunks * chunk:,} "
        "tokens); the gate biases make the decay 1 − σ(−7) = 0.99909 (bf16: 1.0 exactly); mean |h| of "
        "the last chunk; ratio = bf16 / fp32 (within 5 %: the layer computes gates and scan in fp32); "
        "'bf16 gates' runs the same bf16 weights with the gates and scan in bf16, for scale",
        "the scan is Triton's (RNNPIPE_KERNELS=triton" + (", interpreted on CPU)" if dry else ")"),
    ]
    rows, checks = out.setdefault("rows", []), out.setdefault("checks", [])
    for kind in (MixerKind.mingru, MixerKind.minlstm):
        with kernels_backend("triton"):
            m = min_rnn_stream(kind, dev, stream)
        ratio = m["bf16"] / m["fp32"]
        ok = 0.95 < ratio < 1.05 and m["state dtype"] == "float32"
        rows.append(
            {
                "layer": kind.value,
                "tokens": chunks * chunk,
                "mean |h| fp32": m["fp32"],
                "mean |h| bf16": m["bf16"],
                "ratio": ratio,
                "bf16 gates: mean |h|": m["bf16 gates"],
                "bf16 gates: ratio": m["bf16 gates"] / m["fp32"],
                "carried state": m["state dtype"],
                "pass": ok,
            }
        )
        checks.append({"name": f"{kind.value} bf16 keeps forgetting", "pass": ok, "value": ratio})
        print(
            f"  {kind.value}: mean |h| bf16/fp32 {ratio:.3f} (bf16 gates {rows[-1]['bf16 gates: ratio']:.2f})"
        )
