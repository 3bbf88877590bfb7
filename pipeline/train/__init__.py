"""The pretrain stage: DeepSpeed ZeRO training with stateful truncated BPTT over the shards.

:mod:`rnnpipe.pipeline.train.loop` is the loop; :mod:`~rnnpipe.pipeline.train.report` what it
reports of its evaluations (and the final one); :mod:`~rnnpipe.pipeline.engine.state` its checkpointed
TrainState; :mod:`~rnnpipe.pipeline.train.checkpoint` the checkpoints and the resume check;
:mod:`~rnnpipe.pipeline.train.export` the export. It reads datasets through
:mod:`rnnpipe.pipeline.data.manifest` and knows nothing of Slurm.
"""
