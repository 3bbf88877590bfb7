"""One rank of a local pretrain launch: ``python -m launch.rank RUN_DIR/config.yaml``.

:func:`launch.pretrain.run_local` starts one per process with RANK/WORLD_SIZE/MASTER_* set. The
stop flag goes in before anything heavy loads, so a signal during start-up is kept.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    """Run the rank of the config file ``argv[0]``; returns its exit status (0, 75 on a signal)."""
    from pipeline.train.signals import StopFlag

    stop = StopFlag().install()
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
    sys.exit(main(sys.argv[1:]))
