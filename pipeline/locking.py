"""One writer per directory, and no orphans: the locks and the process hygiene every stage shares.

    with exclusive(run_dir, ".rnnpipe-pretrain.lock", "pretrain"):
        ...                      # a second writer fails at once, naming this process's host and pid

An advisory ``fcntl.flock`` on a file in the directory: the kernel releases it when the holder
dies (kill -9 included), so a stale lock never blocks a re-run. Linux's NFS client maps flock to
POSIX byte-range locks, so it holds across the nodes of a cluster too. Object stores have no locks:
there, one writer per directory is the user's to keep.

:func:`die_with_parent` makes a child process receive SIGTERM when the process that started it
dies, however it dies (Linux's parent-death signal); a pool worker or a training rank never lives
on as an orphan after its launcher was killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.errors import PipelineError

_PR_SET_PDEATHSIG = 1
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}  # "no locks here", not "taken"
log = logging.getLogger("rnnpipe")
HELD_ENV = "RNNPIPE_HELD_LOCKS"  # lock files an ancestor holds for this process (os.pathsep-separated)
_held: dict[str, int] = {}  # lock files this process holds, and how many blocks hold each


def holder(directory: str, name: str) -> str | None:
    """Who holds the lock ``name`` in ``directory`` now ("pid P on HOST since T"), or None."""
    if not fsio.is_local(directory):
        return None
    path = os.path.realpath(os.path.join(directory, name))
    if path in _held or path in os.environ.get(HELD_ENV, "").split(os.pathsep):
        return None  # this process (or its launcher, for it) holds it
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _lock_soon(fd: int, tries: int = 5) -> None:
    """LOCK_EX without waiting for a real holder, but past a :func:`holder` probe's moment of
    LOCK_SH (a few retries over 0.2 s); BlockingIOError if it stays taken."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == tries - 1:
                raise
            time.sleep(0.05)


def inherited() -> dict[str, str]:
    """The environment that tells this process's children that the locks it holds are theirs too
    (a launcher's ranks write into the run dir their launcher holds): merge it into theirs."""
    return {HELD_ENV: os.pathsep.join(sorted(_held))}


@contextlib.contextmanager
def exclusive(directory: str, name: str, what: str) -> Iterator[None]:
    """Hold ``directory`` for this process while the block runs (creating the directory). A second
    holder raises :class:`PipelineError` at once: "<directory> is in use by <what> pid P on HOST
    since T". ``what`` names the kind of writer ("pretrain", "prepare", "rnnpipe run").

    Re-entrant: a process that holds the lock already (or whose launcher passed it down with
    :func:`inherited`) enters at once."""
    if not fsio.is_local(directory):
        yield
        return
    os.makedirs(directory, exist_ok=True)
    path = os.path.realpath(os.path.join(directory, name))
    if path in _held or path in os.environ.get(HELD_ENV, "").split(os.pathsep):
        _held[path] = _held.get(path, 0) + 1
        try:
            yield
        finally:
            _held[path] -= 1
            if not _held[path]:
                del _held[path]
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        locked = True
        try:
            _lock_soon(fd)
        except BlockingIOError:
            who = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise PipelineError(
                f"{directory} is in use by {who}: wait for it to finish (or stop it), or use another one"
            ) from None
        except OSError as e:
            if e.errno not in _NO_LOCKS:
                raise
            # Lustre without -o flock, some FUSE mounts: the filesystem has no locks to give.
            log.warning(
                "%s: this filesystem refuses file locks (%s): running without one; keep one writer "
                "per directory yourself (on Lustre, mount with -o flock)",
                directory,
                os.strerror(e.errno or 0),
            )
            locked = False
        if locked:
            since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{what} pid {os.getpid()} on {os.uname().nodename} since {since}\n".encode(), 0)
            _held[path] = 1
        try:
            yield
        finally:
            if locked:
                del _held[path]
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; elsewhere a
    no-op). Call it first thing in a child: as a ``preexec_fn``, a pool ``initializer`` or at the
    top of a rank's entry point. ``parent``: the pid that started this process (e.g. passed in its
    environment); if it is already gone, the signal is sent now."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # orphaned before the signal was armed
        os.kill(os.getpid(), sig)
