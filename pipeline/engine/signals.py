"""Stopping cleanly: SIGUSR2, SIGTERM and SIGINT set a flag; the loop checkpoints at the next step
and exits.

Nothing is saved inside the handler (a handler can run between any two bytecodes, mid-collective).
SIGUSR1 is left alone: NCCL uses it. A second SIGINT (Ctrl-C twice) exits at once, without a
checkpoint. The exit status says what happened: 75 after USR2/TERM (Slurm's time-limit warning, a
preemption: requeue to continue), 130 after Ctrl-C (128 + SIGINT, as a shell reports it).

A rank's entry point installs the flag first thing, before torch loads, with :func:`early`: a
signal that arrives while the process is still importing is then kept, not lost or fatal.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on a signal; run again (requeue) to continue
EXIT_INTERRUPTED = 130  # checkpointed after Ctrl-C (SIGINT)
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

_early: StopFlag | None = None


class StopFlag:
    """Set by the first stop signal; ``bool(flag)`` says whether one came, ``flag.signal`` which."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            # Ctrl-C twice: the user does not want to wait for the checkpoint.
            os.write(2, b"rnnpipe: second interrupt: exiting now, without a checkpoint\n")
            os._exit(EXIT_INTERRUPTED)
        if self.signal is None or signum == signal.SIGINT:
            self.signal = signum

    def install(self, signals: tuple[int, ...] = STOP_SIGNALS) -> StopFlag:
        """Catch ``signals`` from now on (from the main thread only; elsewhere this is a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in signals:
            previous = signal.signal(sig, self._handle)
            if previous != self._handle:  # installed again (over submitit's): keep the first "before"
                self._previous.setdefault(sig, previous)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def exit_status(self) -> int:
        """The status a process stopped by this flag exits with: 130 after SIGINT, else 75."""
        return EXIT_INTERRUPTED if self.signal == signal.SIGINT else EXIT_PREEMPTED


def early() -> StopFlag:
    """This process's stop flag, installed on the first call (cheap: imports nothing). Entry points
    call it before importing torch; the code that runs the work later gets the same flag back,
    installed again (a library may have taken the signals meanwhile: submitit does, just before
    it calls the job's function), with any signal it already caught kept."""
    global _early
    if _early is None:
        _early = StopFlag()
    return _early.install()


def current() -> StopFlag | None:
    """The flag :func:`early` installed in this process, if any (without installing one)."""
    return _early


def is_stop_status(code: int) -> bool:
    """True for the exit statuses of a process that checkpointed on a signal (75, 130)."""
    return code in (EXIT_PREEMPTED, EXIT_INTERRUPTED)


def ignore_late_warnings() -> None:
    """After the work is done: ignore a USR2 (Slurm's time-limit warning) from now on. Python puts
    its handlers back to the default as the interpreter exits, and by default USR2 kills: a warning
    that arrives then would fail a job that has finished."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def wants_early_flag(argv: list[str]) -> bool:
    """Whether a ``rnnpipe`` command line may train in this process (``rnnpipe pretrain``: a rank
    of an inline launch, or the launcher of local ranks, which forwards what it catches)."""
    words = [a for a in argv if not a.startswith("-")]
    return bool(words) and words[0] == "pretrain"


__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "StopFlag",
    "current",
    "early",
    "ignore_late_warnings",
    "is_stop_status",
    "wants_early_flag",
]
