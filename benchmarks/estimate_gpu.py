"""Estimated training tokens/s and MFU of the shipped GPU configs on one H100 SXM, from their FLOP
counts and bytes moved (no GPU needed): what to expect, and what benchmarks/gpu_check.py measures.

    python benchmarks/estimate_gpu.py [--write docs/benchmarks.md]

A roofline, per token of one GPU's training step (forward + backward, bf16):

- matrix products: 3 × the forward's matmul FLOPs (rnnpipe.pipeline.models.flops) at ``MATMUL_EFF``
  of the H100's dense bf16 peak (989 TFLOP/s): large GEMMs, M = batch × sequence tokens;
- element-wise work (the recurrences, norms, activations): bandwidth-bound; every activation a block
  keeps for backward (train/memory.py's count, in bytes of its dtype) is written once in the forward
  pass and read and its gradient written in the backward: 3 passes, at ``HBM_EFF`` of 3.35 TB/s;
- the optimizer: AdamW reads and writes fp32 master weights, two moments, the bf16 weights and
  gradients (32 bytes per parameter, this GPU's share under ZeRO), once per step;
- the recurrences' sequential loops: each time step waits for the last one's state (a dependent
  load and store, ``STEP_LATENCY``), once in the forward pass and twice in the backward, per layer
  and sequence, however wide the batch (the lanes run in parallel, the steps do not);

added, not overlapped (a pessimistic choice: some element-wise work overlaps GEMMs). MFU divides the
model's training FLOPs per token (what the loop logs) by the peak. Every figure is an estimate until
gpu_check measures it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kernel_speed import replace_section

from rnnpipe.launch.processes.shipped import find_shipped
from rnnpipe.launch.stages.pretrain_job import PretrainJob
from rnnpipe.pipeline.config import load_config
from rnnpipe.pipeline.models.flops import flops_per_token, model_params, training_flops_per_token
from rnnpipe.pipeline.train.memory import block_activation_values

PEAK_BF16 = 989e12  # H100 SXM, dense bf16 tensor-core FLOP/s
HBM = 3.35e12  # H100 SXM HBM3 bytes/s
MATMUL_EFF, HBM_EFF = 0.6, 0.7  # what large bf16 GEMMs and streaming kernels reach in practice
ADAM_BYTES_PER_PARAM = 32
STEP_LATENCY = 1e-6  # seconds per time step of a Triton recurrence loop: a dependent global load/store
# (config, vocabulary of the dataset it is made for)
CONFIGS = [("tinyshakespeare-gpu", 65), ("enwik8-50m", 256), ("wiki-350m", 32000), ("wiki-1.3b", 32000)]
BEGIN, END = "<!-- estimate-gpu:begin -->", "<!-- estimate-gpu:end -->"


def estimate(name: str, vocab: int) -> dict[str, float]:
    """The roofline above for one shipped config on one GPU of its job."""
    path = find_shipped(name, "pretrain")
    job = load_config(PretrainJob, str(path), ["data.path=x"])
    m, t = job.model, job.train
    tokens = job.data.batch_size * job.data.seq_len * t.grad_accum  # per GPU per step
    fwd = flops_per_token(m, vocab, job.data.seq_len)
    t_matmul = 3 * fwd["matmul"] / (MATMUL_EFF * PEAK_BF16)
    width = 2  # bf16
    acts = sum(block_activation_values(k, m, bf16=True) for k in m.layer_kinds())
    t_memory = 3 * acts * width / (HBM_EFF * HBM)
    params = model_params(m, vocab)
    world = job.distributed.nodes * max(1, job.distributed.gpus_per_node)
    shard = world if t.zero_stage >= 1 else 1
    t_optimizer = params * ADAM_BYTES_PER_PARAM / shard / (HBM_EFF * HBM) / tokens
    recurrent = sum(k != "attention" for k in m.layer_kinds())
    t_latency = recurrent * 3 * job.data.seq_len * STEP_LATENCY * t.grad_accum / tokens
    per_token = t_matmul + t_memory + t_optimizer + t_latency
    tokens_per_s = 1 / per_token
    return {
        "params_m": params / 1e6,
        "gpus": world,
        "train_flops_per_token": training_flops_per_token(m, vocab, job.data.seq_len),
        "tokens_per_s": tokens_per_s,
        "mfu": training_flops_per_token(m, vocab, job.data.seq_len) * tokens_per_s / PEAK_BF16,
        "matmul_share": t_matmul / per_token,
    }


def table() -> str:
    rows = [
        "| config | parameters | GPUs | training FLOPs/token | est. tokens/s per GPU | est. MFU "
        "| time in GEMMs |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, vocab in CONFIGS:
        e = estimate(name, vocab)
        rows.append(
            f"| {name} | {e['params_m']:.0f}M | {e['gpus']} | {e['train_flops_per_token'] / 1e9:.2f} G | "
            f"{e['tokens_per_s']:,.0f} | {100 * e['mfu']:.0f}% | {100 * e['matmul_share']:.0f}% |"
        )
    note = (
        f"Estimates for one H100 SXM (dense bf16 {PEAK_BF16 / 1e12:.0f} TFLOP/s, {HBM / 1e12:.2f} TB/s), not "
        f"measurements: GEMMs at {MATMUL_EFF:.0%} of the peak, element-wise work and AdamW at "
        f"{HBM_EFF:.0%} of the bandwidth, {STEP_LATENCY * 1e6:g} µs per recurrence time step, added "
        "(`python benchmarks/estimate_gpu.py`; the model is in "
        "its docstring). `benchmarks/gpu_check.py` measures them when a GPU is lent."
    )
    return "\n".join([*rows, "", note])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", help="replace the estimate section of this markdown file")
    args = parser.parse_args()
    text = table()
    print(text)
    if args.write:
        replace_section(Path(args.write), BEGIN, END, text)


if __name__ == "__main__":
    main()
