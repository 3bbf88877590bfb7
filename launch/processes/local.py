"""A local pretrain launch: ``nproc`` ranks on this machine, each ``python -m launch.stages.rank
RUN_DIR/config.yaml`` (:mod:`rnnpipe.launch.stages.rank`) with RANK/WORLD_SIZE/MASTER_* set.

The ranks run in their own session (a terminal's Ctrl-C reaches only the launcher, which forwards
it once), inherit the launcher's lock on the run dir (:func:`rnnpipe.pipeline.locking.inherited`), and are
killed if the launcher dies (kill -9 included): none trains on as an orphan. They log at the
launcher's level (RNNPIPE_LOG_LEVEL, :func:`rnnpipe.launch.processes.distributed.child_log_level`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

STOP = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)  # forwarded to the ranks


def launch_local(config_file: str, nproc: int) -> int:
    """Start ``nproc`` ranks on ``config_file`` (0: one per GPU, or 1) and wait for all; returns
    0, or 75/130 when they checkpointed on a signal. One failing rank stops the others (they would
    wait for it forever). A signal this launcher gets is forwarded to every rank, also one that
    came while they were being started."""
    from rnnpipe.launch.processes.distributed import LOG_LEVEL_ENV, child_log_level, free_port
    from rnnpipe.pipeline.engine.signals import current, is_stop_status
    from rnnpipe.pipeline.errors import PipelineError
    from rnnpipe.pipeline.locking import inherited

    if nproc == 0:
        import torch

        nproc = torch.cuda.device_count() or 1
    early = current()
    if early:  # a signal came during the preflight: start nothing
        return early.exit_status()
    procs: list[subprocess.Popen] = []
    caught: list[int] = []

    def forward(signum, frame):  # a preempted launcher passes the signal on: the ranks checkpoint
        caught.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP}
    try:
        port = free_port()
        threads = max(1, (os.cpu_count() or 1) // nproc)
        level = child_log_level()  # the ranks log at this launcher's level (rnnpipe -v, -q)
        for rank in range(nproc):
            env = {
                **os.environ,
                **inherited(),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": str(threads),
                "RNNPIPE_LAUNCHER_PID": str(os.getpid()),
                **({LOG_LEVEL_ENV: level} if level else {}),
            }
            # -P: the working directory stays off sys.path (a folder there named like a package the
            # rank imports, such as a checkout's kernels/, would shadow it)
            cmd = [sys.executable, "-P", "-m", "rnnpipe.launch.stages.rank", config_file]
            # The rank starts with the stop signals blocked (the mask survives exec) and unblocks
            # them once its own handler is in: one forwarded meanwhile waits, pending, not kills.
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP)
            try:
                procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)  # ours arrive now, and are forwarded
            for signum in caught:  # came while the earlier ranks were being started
                procs[-1].send_signal(signum)
        codes: dict[int, int] = {}
        while len(codes) < nproc:
            for rank, p in enumerate(procs):
                if rank not in codes and p.poll() is not None:
                    codes[rank] = p.returncode
                    if not (p.returncode == 0 or is_stop_status(p.returncode)):
                        for q in procs:
                            if q.poll() is None:
                                q.terminate()
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in procs:  # an exception here (none expected): leave no rank behind
            if p.poll() is None:
                p.kill()
    failed = {r: c for r, c in codes.items() if not (c == 0 or is_stop_status(c))}
    if failed:
        raise PipelineError(
            f"pretrain rank(s) {sorted(failed)} failed (exit status {sorted(set(failed.values()))}); "
            "see their messages above"
        )
    return max(codes.values())  # 130 (Ctrl-C) over 75 (preempted) over 0
