"""Executors: run a stage's independent tasks inline, on a local process pool, or on Slurm.

Every stage that fans out calls ``executor.map(fn, items, name=..., weights=...)``. ``fn`` is a
module-level function ``fn(item, report) -> result``; ``report(n)`` says n more units (bytes) of
the item's weight are done, for the progress bar (MB/s, ETA). A failed task does not stop the
others: when all have ended, :class:`TasksFailed` names every failed item with its error (on
Slurm, its log tail). Results come back in item order.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import submitit
from tqdm import tqdm

from rnnpipe.pipeline.config import check_range
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.locking import die_with_parent

Report = Callable[[int], None]
TaskFn = Callable[[Any, Report], Any]


_SBATCH_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")


def _one_line(key: str, value: str) -> None:
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ConfigError(f"{key}: {value!r} holds a control character ({bad!r}); Slurm values are one line")


class ExecutorKind(Enum):
    inline = "inline"  # in this process, one task after another
    local = "local"  # a pool of processes on this machine
    slurm = "slurm"  # a Slurm job array through submitit


@dataclass
class SlurmConfig:
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    cpus_per_task: int = 4
    gpus_per_node: int = 0
    mem_gb: float = 16.0
    time_min: int = 120
    array_parallelism: int = 256  # array tasks running at once
    max_array_size: int = 1000  # Slurm's MaxArraySize: more items are grouped into fewer tasks
    extra: dict[str, str] = field(default_factory=dict)  # more sbatch options: {mail-type: FAIL}
    setup: list[str] = field(default_factory=list)  # shell lines run first (module load ...)
    log_dir: str = ""  # submitit's folder; "" = <work dir>/slurm
    max_requeues: int = 3  # checkpointable tasks (fine-tune jobs): requeues on preemption or timeout
    poll_s: float = 5.0

    def validate(self) -> None:
        for key in ("max_array_size", "array_parallelism", "cpus_per_task", "time_min"):
            check_range(key, getattr(self, key), ge=1)
        check_range("mem_gb", self.mem_gb, gt=0)
        check_range("gpus_per_node", self.gpus_per_node, ge=0)
        check_range("max_requeues", self.max_requeues, ge=0)
        check_range("poll_s", self.poll_s, gt=0)
        # Each value becomes part of an #SBATCH line: a newline would end it and start a command.
        for key in ("partition", "account", "qos", "constraint", "log_dir"):
            _one_line(f"slurm.{key}", getattr(self, key))
        for key, value in self.extra.items():
            if not _SBATCH_OPTION.match(key):
                raise ConfigError(
                    f"slurm.extra: {key!r} is not an sbatch option name (letters, digits and '-', "
                    "as in mail-type)"
                )
            _one_line(f"slurm.extra.{key}", "" if value is None else str(value))


@dataclass
class ExecutorConfig:
    kind: ExecutorKind = ExecutorKind.local
    workers: int = 0  # local: processes at once; 0 = the CPUs this process may use
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def validate(self) -> None:
        check_range("workers", self.workers, ge=0)


class TasksFailed(PipelineError):
    """Some tasks of a map failed; ``failures`` holds (item label, error text) pairs."""

    def __init__(self, name: str, failures: list[tuple[str, str]], total: int):
        self.failures = failures
        lines = [f"{len(failures)} of {total} {name} task(s) failed:"]
        for label, err in failures[:5]:
            lines.append(f"- {label}: " + err.strip().replace("\n", "\n    "))
        if len(failures) > 5:
            lines.append(f"... and {len(failures) - 5} more")
        super().__init__("\n".join(lines))


def _label(item: Any) -> str:
    return str(getattr(item, "label", item))


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, PipelineError):
        return str(exc)
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return "".join(tb[-3:])


class _Progress:
    """A byte-weighted tqdm bar that shows MB/s and ETA; quiet when RNNPIPE_PROGRESS=0."""

    def __init__(self, name: str, weights: Sequence[int] | None, n: int):
        tty = sys.stderr.isatty()
        disable = os.environ.get("RNNPIPE_PROGRESS", "1") == "0"
        self.weights = list(weights) if weights else [1] * n  # unweighted: count tasks
        self.done = [0] * len(self.weights)
        self.bar = tqdm(
            total=sum(self.weights),
            desc=name,
            unit="B" if weights else "task",
            unit_scale=bool(weights),
            disable=disable,
            mininterval=0.5 if tty else 30.0,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def add(self, index: int, n: int) -> None:
        n = max(0, min(n, self.weights[index] - self.done[index]))
        self.done[index] += n
        self.bar.update(n)

    def finish(self, index: int) -> None:
        self.add(index, self.weights[index])

    def close(self) -> None:
        self.bar.close()


class Executor:
    """Maps a task function over items; see the module docstring. Use as a context manager."""

    def map(
        self, fn: TaskFn, items: Sequence[Any], *, name: str, weights: Sequence[int] | None = None
    ) -> list[Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers (a no-op for executors without any)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InlineExecutor(Executor):
    """Runs tasks one after another in this process (debugging, tests, tiny inputs)."""

    def map(self, fn, items, *, name, weights=None):
        progress = _Progress(name, weights, len(items))
        results: list[Any] = [None] * len(items)
        failures = []
        try:
            for i, item in enumerate(items):
                try:
                    results[i] = fn(item, lambda n, i=i: progress.add(i, n))
                except Exception as e:
                    failures.append((_label(item), _error_text(e)))
                progress.finish(i)
        finally:
            progress.close()
        if failures:
            raise TasksFailed(name, failures, len(items))
        return results


_worker_queue: Any = None


def _init_worker(q: Any, parent: int) -> None:
    """Pool initializer: keep the progress queue, and die with the process that started the pool
    (``parent``), however it dies: a ``kill -9`` of ``rnnpipe prepare`` leaves no worker behind
    (and so no resource tracker: it exits when the last process holding its pipe is gone)."""
    global _worker_queue
    # SIGTERM: a prepare task dies at once; a task that handles it (a fine-tune job) checkpoints
    # and stops, and its worker then ends on the broken pipe to the dead parent.
    die_with_parent(signal.SIGTERM, parent)
    _worker_queue = q


def _run_in_worker(fn: TaskFn, tag: tuple[int, int], item: Any) -> Any:
    pending = [0]

    def report(n: int) -> None:  # batch small reports: a queue put per byte range is costly
        pending[0] += n
        if pending[0] >= 1 << 20:
            _worker_queue.put((tag, pending[0]))
            pending[0] = 0

    try:
        return fn(item, report)
    except PipelineError:
        raise
    except Exception as e:  # keep the worker's traceback: the pool only re-raises the exception
        raise RuntimeError(_error_text(e)) from None


class LocalExecutor(Executor):
    """Runs tasks on a pool of ``workers`` spawned processes on this machine.

    The pool lives as long as the executor (close it, or use it as a context manager), so the
    stages of one command pay for starting workers once. Workers die with this process (Linux's
    parent-death signal). The kernel sends it when the *thread* that spawned a worker ends, and
    workers are spawned by the thread calling :meth:`map`: call it from a thread that outlives
    the pool (the main thread, as every stage does).
    """

    def __init__(self, workers: int = 0):
        self.workers = workers or len(os.sched_getaffinity(0))
        self._ctx = mp.get_context("spawn")  # never fork a process that may hold threads or CUDA
        self._pool: cf.ProcessPoolExecutor | None = None
        self._reports: Any = None
        self._maps = 0

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            self._reports = self._ctx.Queue()
            self._pool = cf.ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=self._ctx,
                initializer=_init_worker,
                initargs=(self._reports, os.getpid()),
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, fn, items, *, name, weights=None):
        if not items:
            return []
        self._maps += 1
        map_id = self._maps
        pool = self._get_pool()
        progress = _Progress(name, weights, len(items))
        stop = threading.Event()
        reports = self._reports

        def drain() -> None:
            while not stop.is_set():
                try:
                    (mid, index), n = reports.get(timeout=0.2)
                except queue.Empty:
                    continue
                if mid == map_id:
                    progress.add(index, n)

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        results: list[Any] = [None] * len(items)
        failures: list[tuple[str, str]] = []
        broken = False
        try:
            futures = {pool.submit(_run_in_worker, fn, (map_id, i), item): i for i, item in enumerate(items)}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                try:
                    results[i] = fut.result()
                except cf.process.BrokenProcessPool:
                    broken = True
                    failures.append((_label(items[i]), "a worker process died (killed, or out of memory?)"))
                except Exception as e:
                    failures.append(
                        (_label(items[i]), str(e) if isinstance(e, RuntimeError) else _error_text(e))
                    )
                progress.finish(i)
        except BaseException:
            self.close()
            raise
        finally:
            stop.set()
            drainer.join()
            progress.close()
        if broken:
            self.close()
        if failures:
            raise TasksFailed(name, failures, len(items))
        return results


class ChunkFailed(RuntimeError):
    """An array task ran its items and some failed: the task exits non-zero, so Slurm (sacct, and
    ``afterok`` dependencies) sees it FAILED. The message names each failed item with its error."""


def _run_chunk(fn: TaskFn, chunk: list[Any]) -> list[Any]:
    """One Slurm array task: runs every item of its chunk in order, then fails if any failed."""
    from rnnpipe.launch.processes.slurm import task_setup

    task_setup()
    out: list[Any] = []
    failures: list[str] = []
    for item in chunk:
        try:
            out.append(fn(item, lambda n: None))
        except Exception as e:
            print(f"task {_label(item)} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            failures.append(f"task {_label(item)} failed: {_error_text(e).strip()}")
            out.append(None)
    if failures:
        raise ChunkFailed("\n".join(failures))
    return out


class _RequeueableChunk(submitit.helpers.Checkpointable):
    """An array task that submitit requeues on preemption or timeout (USR2 before the limit):
    it runs its chunk again, so its task function must resume or skip finished work."""

    def __call__(self, fn: TaskFn, chunk: list[Any]) -> list[Any]:
        return _run_chunk(fn, chunk)


@dataclass
class SubmittedArray:
    """A job array submitted for a map: its submitit jobs and which items each task runs."""

    name: str
    jobs: list[Any]
    chunks: list[list[int]]
    log_dir: str

    @property
    def job_id(self) -> str:
        """The array's job id (what ``afterok:`` and ``sacct -j`` take)."""
        return str(self.jobs[0].job_id).split("_")[0]


class SlurmExecutor(Executor):
    """Submits the items as one Slurm job array through submitit and waits for it.

    With ``requeue`` the array tasks are checkpointable: submitit requeues a task that is
    preempted or reaches its time limit, up to ``max_requeues`` times.
    """

    def __init__(self, cfg: SlurmConfig, log_dir: str, requeue: bool = False, code: Any = None):
        self.cfg = cfg
        self.log_dir = cfg.log_dir or log_dir
        self.requeue = requeue
        self._code = code  # the processes.snapshot.Snapshot the jobs run; taken at the first submission

    @property
    def code(self) -> Any:
        """The snapshot of the code this executor's jobs run (:mod:`rnnpipe.launch.processes.snapshot`)."""
        if self._code is None:
            from rnnpipe.launch.processes.snapshot import take

            self._code = take(self.log_dir)
        return self._code

    def slurm_parameters(self, name: str) -> dict[str, Any]:
        """submitit ``SlurmExecutor`` parameters (sbatch options) for a map called ``name``."""
        c = self.cfg
        params: dict[str, Any] = dict(
            job_name=f"rnnpipe-{name}",
            time=c.time_min,
            mem=f"{c.mem_gb:g}GB",
            cpus_per_task=c.cpus_per_task,
            nodes=1,
            ntasks_per_node=1,
            array_parallelism=c.array_parallelism,
        )
        for key in ("partition", "account", "qos", "constraint", "gpus_per_node"):
            if getattr(c, key):
                params[key] = getattr(c, key)
        if c.extra:
            from rnnpipe.launch.processes.slurm import submitit_extra

            params["additional_parameters"] = submitit_extra(c.extra)
        if c.setup:
            params["setup"] = list(c.setup)
        return params

    def submitit_executor(self, name: str) -> Any:
        """The configured ``submitit.SlurmExecutor`` for a map called ``name``."""
        try:
            ex = submitit.SlurmExecutor(
                folder=os.path.join(self.log_dir, name, "%j"),
                max_num_timeout=self.cfg.max_requeues,
                python=self.code.python_command(),
            )
        except RuntimeError as e:
            raise PipelineError(
                "executor.kind=slurm, but this machine has no Slurm (srun is not on PATH); "
                "run on a cluster login node or use --executor local"
            ) from e
        ex.update_parameters(**self.slurm_parameters(name))
        return ex

    def submit_job(self, fn: Callable[..., Any], *args: Any, name: str, dependency: str = "") -> Any:
        """One job (not an array) running ``fn(*args)`` after ``dependency``; submitit's job."""
        from rnnpipe.launch.processes.slurm import with_dependency

        ex = with_dependency(self.submitit_executor(name), dependency)
        with submitit.helpers.clean_env():  # from inside a job, inherit none of its SLURM_* settings
            return ex.submit(fn, *args)

    def submit(self, fn: TaskFn, items: Sequence[Any], *, name: str, dependency: str = "") -> SubmittedArray:
        """Submit ``items`` as one job array (at most ``max_array_size`` tasks) and return at once.
        ``dependency``: an sbatch ``--dependency`` value (``afterok:123``); the array is then also
        cancelled when the dependency can never be met (``--kill-on-invalid-dep``)."""
        import submitit

        n_chunks = min(len(items), self.cfg.max_array_size)
        bounds = [round(k * len(items) / n_chunks) for k in range(n_chunks + 1)]
        chunks = [list(range(bounds[k], bounds[k + 1])) for k in range(n_chunks)]
        from rnnpipe.launch.processes.slurm import with_dependency

        ex = with_dependency(self.submitit_executor(name), dependency)
        runner = _RequeueableChunk() if self.requeue else _run_chunk
        with submitit.helpers.clean_env():  # from inside a job, inherit none of its SLURM_* settings
            jobs = ex.map_array(runner, [fn] * n_chunks, [[items[i] for i in c] for c in chunks])
        return SubmittedArray(name, jobs, chunks, os.path.join(self.log_dir, name))

    def map(self, fn, items, *, name, weights=None):
        if not items:
            return []
        array = self.submit(fn, items, name=name)
        jobs, chunks = array.jobs, array.chunks
        print(
            f"{name}: submitted Slurm job array {array.job_id} "
            f"({len(chunks)} tasks, logs in {array.log_dir})",
            file=sys.stderr,
            flush=True,
        )
        progress = _Progress(name, weights, len(items))
        results: list[Any] = [None] * len(items)
        failures: list[tuple[str, str]] = []
        pending = set(range(len(chunks)))
        try:
            while pending:
                for k in sorted(pending):
                    job = jobs[k]
                    if not job.done():
                        continue
                    pending.discard(k)
                    try:
                        outcomes = job.result()
                    except Exception as e:
                        failures.extend(_chunk_failures(job, e, [items[i] for i in chunks[k]]))
                        for i in chunks[k]:
                            progress.finish(i)
                        continue
                    for i, value in zip(chunks[k], outcomes, strict=True):
                        results[i] = value
                        progress.finish(i)
                if pending:
                    time.sleep(self.cfg.poll_s)
        except KeyboardInterrupt:
            for k in pending:
                jobs[k].cancel(check=False)
            raise
        finally:
            progress.close()
        if failures:
            raise TasksFailed(name, failures, len(items))
        return results


def _chunk_failures(job: Any, error: Exception, chunk: list[Any]) -> list[tuple[str, str]]:
    """(label, error) for each item of a failed array task. A :class:`ChunkFailed` names its failed
    items; the others of its chunk ran, but their results went with the task (a re-run skips their
    finished work). A task that died another way (killed, out of memory) fails every item."""
    text = str(error)
    if "ChunkFailed: " in text:
        message = text.split("ChunkFailed: ", 1)[1].split("\n----", 1)[0]
        sections = message.split("\ntask ")
        out = []
        for item in chunk:
            mine = [m for m in sections if m.removeprefix("task ").startswith(f"{_label(item)} failed:")]
            if mine:
                out.append((_label(item), f"job {job.job_id}: " + mine[0].split(" failed: ", 1)[1]))
            else:
                lost = "its result was lost with its array task (another item failed)"
                out.append((_label(item), f"job {job.job_id}: {lost}"))
        return out
    tail = "\n".join((job.stderr() or "").splitlines()[-20:])
    return [(_label(item), f"job {job.job_id}: {text}\n{tail}") for item in chunk]


def make_executor(cfg: ExecutorConfig, log_dir: str, requeue: bool = False, code: Any = None) -> Executor:
    """The executor ``cfg`` asks for; ``log_dir`` holds Slurm logs unless the config names one.
    ``requeue``: Slurm array tasks are requeued on preemption or timeout (tasks must resume).
    ``code``: the snapshot Slurm jobs run (default: one taken at the first submission)."""
    if cfg.kind is ExecutorKind.inline:
        return InlineExecutor()
    if cfg.kind is ExecutorKind.local:
        return LocalExecutor(cfg.workers)
    return SlurmExecutor(cfg.slurm, log_dir, requeue, code)
