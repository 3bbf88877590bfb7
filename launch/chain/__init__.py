"""The stages chained: the pipeline (``rnnpipe run``, ``--dry-run``), the plan for
``slurm/pipeline.sh`` (``rnnpipe plan``) and ``rnnpipe status``. Imports the stages and processes.
"""
