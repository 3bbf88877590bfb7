"""Module-level task functions for executor tests (spawned workers import them by name)."""

from __future__ import annotations

import os
import signal


def square_or_fail(x: int, report) -> int:
    report(x)
    if x == 3:
        raise ValueError("three is not allowed")
    return x * x


def die_on_two(x: int, report) -> int:
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return x
