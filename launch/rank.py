"""One rank of a local pretrain launch: ``python -m launch.rank RUN_DIR/config.yaml``.

:func:`launch.local.launch_local` starts one per process with RANK/WORLD_SIZE/MASTER_* set. The
stop flag goes in before anything heavy loads, so a signal during start-up is kept; and the rank
is killed if its launcher dies (kill -9 included), so it never trains on as an orphan.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    """Run the rank of the config file ``argv[0]``; returns its exit status (0; 75 or 130 after a
    signal, with a checkpoint)."""
    from pipeline.train.signals import STOP_SIGNALS, early

    stop = early()
    # The launcher starts ranks with these blocked (so that one forwarded before this point waits):
    # with the handler in, let them in; a pending one arrives now and sets the flag.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    from pipeline.locking import die_with_parent

    # SIGKILL: a launcher killed with -9 means the whole launch is to stop now (its lock on the
    # run dir, held by rank 0, goes with it); a graceful stop goes through the launcher's signals.
    launcher = os.environ.get("RNNPIPE_LAUNCHER_PID")
    die_with_parent(signal.SIGKILL, parent=int(launcher) if launcher else None)
    import logging

    from launch.pretrain import PretrainJob, run_rank, stage_config
    from pipeline.config import load_config
    from pipeline.errors import PipelineError

    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return run_rank(stage_config(load_config(PretrainJob, argv[0])), stop)
    except PipelineError as e:
        print(f"rnnpipe: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    from launch.distributed import exit_now

    exit_now(main(sys.argv[1:]))
