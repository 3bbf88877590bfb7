"""Where a process sits among the ranks of a job: :class:`RankContext`.

The pretrain loop builds one from the process group (``torch.distributed``); the evaluation
functions (:func:`rnnpipe.pipeline.train.evaluate.evaluate`, ``evaluate_dynamic``, the final
evaluation) take one instead of a rank, a world size and a device; a single process (a test, an
export's evaluation) uses :meth:`RankContext.single`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

CPU = torch.device("cpu")


@dataclass(frozen=True)
class RankContext:
    """Where this process sits: its rank, the number of ranks, its device and the run dir.

    ``rank``: this process's index among the job's processes, 0 … ``world`` − 1 (a count of
    processes, one per GPU). ``world``: the number of processes (ranks), at least 1. ``device``:
    the device this rank computes on (the launcher's for this rank: its local rank's GPU, or the
    CPU). ``run_dir``: the run's directory (checkpoints, metrics), None where there is none (an
    export's evaluation, a test).
    """

    rank: int
    world: int
    device: torch.device
    run_dir: Path | None = None

    @classmethod
    def single(cls, device: torch.device = CPU) -> RankContext:
        """One process on its own: rank 0 of 1 on ``device`` (the CPU by default), no run dir."""
        return cls(0, 1, device)

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes the run's files."""
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank: a collective (an all-reduce of one integer on
        ``device``) when a process group is set up and ``world`` > 1, every rank must then call
        it; without one, this rank's ``flag``."""
        x = torch.tensor([int(flag)], device=self.device)
        if self.world > 1 and dist.is_initialized():
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return bool(x.item())
