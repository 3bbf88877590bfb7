"""The pretrain stage: DeepSpeed ZeRO training with stateful truncated BPTT over the shards.

:mod:`pipeline.train.loop` is the loop; :mod:`~pipeline.train.report` what it reports of its
evaluations (and the final one); :mod:`~pipeline.train.state` its checkpointed TrainState;
:mod:`~pipeline.train.checkpoint` the checkpoints and the resume check; :mod:`~pipeline.train.export`
the export. It reads datasets through :mod:`pipeline.data.manifest` and knows nothing of Slurm.
"""
