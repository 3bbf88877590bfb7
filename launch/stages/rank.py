"""What a pretrain rank runs: :func:`run_rank` (its part of the run), :func:`start_rank` (first
thing, under every launcher), :func:`slurm_task` (one task of the Slurm job), and the entry point of
a local launch's ranks, ``python -P -m rnnpipe.launch.stages.rank RUN_DIR/config.yaml``.

:func:`rnnpipe.launch.processes.local.launch_local` starts one per process with RANK/WORLD_SIZE/MASTER_*
set. The stop flag goes in before anything heavy loads, so a signal during start-up is kept; and the rank
is killed if its launcher dies (kill -9 included), so it never trains on as an orphan. Its log
lines come at the launcher's level (RNNPIPE_LOG_LEVEL), DeepSpeed's messages below them
(:func:`rnnpipe.launch.processes.distributed.setup_logging`).

Nothing heavy is imported at the top: submitit unpickles :func:`slurm_task` by importing this module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rnnpipe.pipeline.engine.signals import StopFlag
    from rnnpipe.pipeline.train.config import PretrainConfig


def run_rank(cfg: PretrainConfig, stop: StopFlag | None = None, timeout_min: float | None = None) -> int:
    """This process's part of the run; returns the exit status (0; 75 or 130 after a signal).
    ``timeout_min``: the process group's (``distributed.timeout_min``; its default when None)."""
    from rnnpipe.launch.processes import distributed, preflight
    from rnnpipe.pipeline.engine.signals import ignore_late_warnings
    from rnnpipe.pipeline.train.loop import train

    preflight.check_node(cfg)  # before DeepSpeed and the process group: seconds, not a timeout
    distributed.init(distributed.DEFAULT_TIMEOUT_MIN if timeout_min is None else timeout_min)
    result = train(cfg, stop)
    distributed.shutdown()
    if result.status == "preempted":
        return result.exit_status
    ignore_late_warnings()
    return 0


def start_rank() -> StopFlag:
    """What a rank does first: the stop flag, installed before torch and DeepSpeed load so that a
    signal arriving meanwhile is kept (and not taken by submitit's own handler, which would end the
    job as failed); then, under Slurm, the node-local caches, threads and logging."""
    from rnnpipe.pipeline.engine.signals import early

    stop = early()  # the entry point may have installed it already
    if "SLURM_JOB_ID" in os.environ:
        from rnnpipe.launch.processes.distributed import setup_logging
        from rnnpipe.launch.processes.slurm import task_setup

        setup_logging()  # first: at the submitter's RNNPIPE_LOG_LEVEL (task_setup's is then a no-op)
        task_setup()
    return stop


def slurm_task(cfg: PretrainConfig, export: bool = False, timeout_min: float | None = None) -> int:
    """One task of the Slurm job (run by submitit through srun on every node). Rank 0 holds the
    run dir's lock over the training and the export (the loop re-enters it); a refused rank 0
    fails the job step, and srun stops the other tasks."""
    from rnnpipe.launch.stages.pretrain_job import export_final
    from rnnpipe.pipeline.engine.signals import EXIT_PREEMPTED
    from rnnpipe.pipeline.locking import exclusive
    from rnnpipe.pipeline.train.checkpoint import RUN_LOCK

    stop = start_rank()
    rank0 = os.environ.get("SLURM_PROCID") == "0"
    with exclusive(cfg.run_dir, RUN_LOCK, "pretrain") if rank0 else contextlib.nullcontext():
        code = run_rank(cfg, stop, timeout_min)
        # Checkpointed on a signal: rank 0 asks Slurm to run the job again (it was submitted --requeue).
        if code == EXIT_PREEMPTED and rank0:  # (not after Ctrl-C: the user stopped it)
            subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        if code == 0 and export and rank0:
            export_final(cfg)
    return code


def main(argv: list[str]) -> int:
    """Run the rank of the config file ``argv[0]``; returns its exit status (0; 75 or 130 after a
    signal, with a checkpoint)."""
    from rnnpipe.pipeline.engine.signals import STOP_SIGNALS, early

    stop = early()
    # The launcher starts ranks with these blocked (so that one forwarded before this point waits):
    # with the handler in, let them in; a pending one arrives now and sets the flag.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    from rnnpipe.pipeline.locking import die_with_parent

    # SIGKILL: a launcher killed with -9 means the whole launch is to stop now (its lock on the
    # run dir, held by rank 0, goes with it); a graceful stop goes through the launcher's signals.
    launcher = os.environ.get("RNNPIPE_LAUNCHER_PID")
    die_with_parent(signal.SIGKILL, parent=int(launcher) if launcher else None)
    from rnnpipe.launch.processes.distributed import setup_logging
    from rnnpipe.launch.stages.pretrain_job import PretrainJob, stage_config
    from rnnpipe.pipeline.config import load_config
    from rnnpipe.pipeline.errors import ConfigError, PipelineError

    setup_logging()  # at the launcher's level (RNNPIPE_LOG_LEVEL); DeepSpeed's messages below it
    try:
        job = load_config(PretrainJob, argv[0])
        return run_rank(stage_config(job), stop, job.distributed.timeout_min)
    except ConfigError as e:  # the preflight's, or the config's: exit 2, as the CLI's
        print(f"rnnpipe: config error: {e}", file=sys.stderr)
        return 2
    except PipelineError as e:
        print(f"rnnpipe: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from rnnpipe.launch.processes.distributed import exit_now

    exit_now(main(sys.argv[1:]))
