"""Preemption: SIGUSR2 and SIGTERM set a flag; the loop checkpoints at the next step and exits.

Nothing is saved inside the handler (a handler can run between any two bytecodes, mid-collective).
SIGUSR1 is left alone: NCCL uses it.
"""

from __future__ import annotations

import signal
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on a signal; run again (requeue) to continue


class StopFlag:
    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal = signum

    def install(self) -> StopFlag:
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def ignore_late_warnings() -> None:
    """After the work is done: ignore a USR2 (Slurm's time-limit warning) from now on. Python puts
    its handlers back to the default as the interpreter exits, and by default USR2 kills: a warning
    that arrives then would fail a job that has finished."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
