"""Launching rnnpipe: the ``rnnpipe`` CLI and the executors that run a stage's tasks
in this process, in parallel on this machine, or as a Slurm job array through submitit."""
