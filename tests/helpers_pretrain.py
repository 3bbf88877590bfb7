"""One rank of a pretrain run that also saves the trained model's logits on a fixed batch.

    python helpers_pretrain.py CONFIG LOGITS_OUT [key=value ...]    (RANK/WORLD_SIZE/... set)

Run by tests/integration/train/test_pretrain.py to compare an export's logits with the training model's.
"""

from __future__ import annotations

import sys

import torch

from rnnpipe.launch.processes import distributed
from rnnpipe.launch.stages.pretrain import PretrainJob, stage_config
from rnnpipe.pipeline.config import load_config
from rnnpipe.pipeline.train.loop import train


def fixed_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 17), generator=torch.Generator().manual_seed(7))


def main(config: str, out: str, overrides: list[str]) -> None:
    job = load_config(PretrainJob, config, overrides)
    env = distributed.init()
    result = train(stage_config(job))
    result.model.eval()
    with torch.no_grad():  # every rank runs it: ZeRO-3 gathers the parameters collectively
        logits, _ = result.model(fixed_tokens(result.model.vocab_size))
    if env.rank == 0:
        torch.save(logits.float(), out)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    distributed.exit_now(0)
