"""One rank of a 2-process DeepSpeed ZeRO-3 run (gloo, CPU): python helpers_zero3.py MIXER OUT.

Trains a small LM for a few SGD steps on half of a fixed batch per rank; rank 0 writes the
gathered final parameters to OUT. Run by tests/integration/train/test_zero3.py. SGD, not Adam:
Adam's first steps are lr·g/(|g| + eps), which turns float32 roundoff in near-zero gradients (a
different summation order across ranks) into visible parameter differences; SGD keeps them at roundoff.
"""

from __future__ import annotations

import os
import sys

import torch

STEPS, VOCAB, LR = 4, 32, 0.5


def build(mixer: str):
    from rnnpipe.pipeline.models import LanguageModel, MixerKind, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(mixer=MixerKind(mixer), n_layers=2, d_model=16, mlp_ratio=2.0)
    model = LanguageModel(cfg, VOCAB)
    tokens = torch.randint(0, VOCAB, (4, 13), generator=torch.Generator().manual_seed(1))
    return model, tokens


def loss_of(model, tokens):
    logits, _ = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def main(mixer: str, out: str) -> None:
    import deepspeed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    model, tokens = build(mixer)
    config = {
        "train_micro_batch_size_per_gpu": len(tokens) // world,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1.0 unless told otherwise
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    mine = tokens.chunk(world)[rank]
    for _ in range(STEPS):
        engine.backward(loss_of(engine, mine))
        engine.step()
    params = list(engine.module.parameters())
    assert any(p.ds_tensor.numel() < p.ds_numel for p in params), "ZeRO-3 did not partition anything"
    with deepspeed.zero.GatheredParameters(params):
        if rank == 0:
            torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, out)
    from rnnpipe.launch.processes.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    from rnnpipe.launch.processes.distributed import exit_now

    main(sys.argv[1], sys.argv[2])
    exit_now(0)
