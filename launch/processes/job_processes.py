"""The local executor of a fine-tune sweep: worker processes that run one job at a time each, so
that a worker killed (``kill -9``, the out-of-memory killer) fails its own job alone, where a
``concurrent.futures`` process pool would break and fail every job still in it."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

from rnnpipe.launch.processes.executors import Executor, TaskFn, TasksFailed, _Progress
from rnnpipe.pipeline.errors import PipelineError

STOP_WAIT_S = 60  # after Ctrl-C: how long the jobs' processes get to checkpoint before SIGTERM


class JobProcesses(Executor):
    """The local executor of a sweep: ``workers`` processes (0: one per CPU; spawned, dying with
    this one), each running one job at a time, reused from job to job. A worker that dies
    (``kill -9``, the out-of-memory killer) fails its own job alone, its checkpoint kept for the
    next run, and a new worker takes its place: a ``concurrent.futures`` process pool would break
    and fail every job still in it.

    Call :meth:`map` from a thread that outlives the workers (the main thread): the kernel's
    parent-death signal follows the thread that started each process."""

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers or len(os.sched_getaffinity(0))
        self._ctx = mp.get_context("spawn")  # never fork a process that may hold threads or CUDA
        self._idle: list[_Worker] = []

    def _start(self, fn: TaskFn, item: Any) -> _Worker:
        """The worker now running ``fn(item, report)``: an idle one still alive, or a new one."""
        while self._idle:
            worker = self._idle.pop()
            try:
                worker.conn.send((fn, item))
                return worker
            except OSError:  # it died while idle
                worker.close()
        worker = _Worker(self._ctx)
        worker.conn.send((fn, item))
        return worker

    def map(
        self, fn: TaskFn, items: Sequence[Any], *, name: str, weights: Sequence[int] | None = None
    ) -> list[Any]:
        """Run ``fn(item, report)`` for every item on the workers; the results in item order, or
        :class:`TasksFailed` naming every failed item (with how its worker died) once all ended."""
        progress = _Progress(name, None, len(items))
        results: list[Any] = [None] * len(items)
        failures: list[tuple[str, str]] = []
        waiting = list(range(len(items)))[::-1]
        busy: dict[Connection, tuple[int, _Worker]] = {}
        try:
            while waiting or busy:
                while waiting and len(busy) < self.workers:
                    i = waiting.pop()
                    worker = self._start(fn, items[i])
                    busy[worker.conn] = (i, worker)
                for conn in wait(list(busy)):
                    i, worker = busy.pop(conn)
                    ok, value = worker.outcome()
                    if ok:
                        results[i] = value
                    else:
                        failures.append((str(getattr(items[i], "label", items[i])), value))
                    if worker.proc.is_alive():
                        self._idle.append(worker)
                    else:
                        worker.close()
                    progress.finish(i)
        except BaseException:
            # Ctrl-C reached the workers too: their jobs checkpoint and stop; wait for that
            for _, worker in busy.values():
                worker.conn.poll(STOP_WAIT_S)
            self._idle += [worker for _, worker in busy.values()]
            self.close()
            raise
        finally:
            progress.close()
        if failures:
            raise TasksFailed(name, failures, len(items))
        return results

    def close(self) -> None:
        """Stop the idle workers (all asked at once: each exits as its pipe closes)."""
        workers, self._idle = self._idle, []
        for worker in workers:
            worker.conn.close()
        for worker in workers:
            worker.close()


class _Worker:
    """A spawned process that runs the jobs it is sent, one at a time, through a pipe."""

    def __init__(self, ctx: Any) -> None:
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_work, args=(theirs, os.getpid()))
        self.proc.start()
        theirs.close()  # the worker's end lives in the worker alone: its death ends the pipe

    def outcome(self) -> tuple[bool, Any]:
        """(True, result) of the job it ran, else (False, what to say): the job's error, or how
        the worker died."""
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):  # it died before it answered
            status, value = "died", None
        if status == "ok":
            return True, value
        if status == "error":
            return False, value
        self.proc.join()
        code = self.proc.exitcode
        how = f"exit status {code}"
        if code is not None and code < 0:
            how = signal.Signals(-code).name
            how += ": kill -9, or the out-of-memory killer?" if code == -signal.SIGKILL else ""
        return False, (
            f"its process died ({how}); the other jobs ran on, and its last checkpoint is kept: run "
            "the sweep again to resume it"
        )

    def close(self) -> None:
        """End the worker: asked to (its pipe closed), else after 10 s with SIGTERM."""
        self.conn.close()  # (closing a closed connection does nothing)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


def _work(conn: Connection, parent: int) -> None:
    """A worker's loop: each (fn, item) it receives run, ("ok", result) or ("error", what went
    wrong) sent back; it ends when its pipe closes."""
    from rnnpipe.pipeline.locking import die_with_parent

    die_with_parent(signal.SIGTERM, parent)
    while True:
        try:
            fn, item = conn.recv()
        except KeyboardInterrupt:  # Ctrl-C while idle: the sweep decides
            continue
        except (EOFError, OSError):
            return
        try:
            outcome: tuple[str, Any] = ("ok", fn(item, lambda n: None))
        except KeyboardInterrupt:
            outcome = ("error", "interrupted (it checkpointed): run the sweep again to continue it")
        except PipelineError as e:
            outcome = ("error", str(e))
        except Exception as e:  # a bug: the end of its traceback
            outcome = ("error", "".join(traceback.format_exception(type(e), e, e.__traceback__)[-3:]))
        try:
            conn.send(outcome)
        except (BrokenPipeError, OSError):
            return
