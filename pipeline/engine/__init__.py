"""The engine: what both training stages (pretrain and fine-tune) share, below both.

- :mod:`~rnnpipe.pipeline.engine.schedule`: the learning rate as a pure function of the step;
- :mod:`~rnnpipe.pipeline.engine.state`: the checkpointed training state (``TrainState``,
  ``FinetuneState``: counters, data position, RNG states);
- :mod:`~rnnpipe.pipeline.engine.statefile`: state files, written atomically and read without
  running code;
- :mod:`~rnnpipe.pipeline.engine.signals`: the stop flag (USR2, TERM, Ctrl-C) and exit statuses;
- :mod:`~rnnpipe.pipeline.engine.rank`: where a process sits (``RankContext``: rank, world, device,
  run dir);
- :mod:`~rnnpipe.pipeline.engine.metrics`: TensorBoard, ``metrics.jsonl`` and W&B (``WandbConfig``).

It imports nothing of ``pipeline/train`` or ``pipeline/finetune``.
"""
