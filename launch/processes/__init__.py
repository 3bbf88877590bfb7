"""How a process starts and is tracked: process groups from the environment, local ranks, Slurm
glue and submitit executors, the code snapshot a submission runs, the node preflight, the run
record, the shipped configs. Imports nothing else of ``launch/``.
"""
