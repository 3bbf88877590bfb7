"""The fine-tune stage: GLUE (CoLA, SST-2, MRPC, RTE, STS-B), CoNLL-2003 NER and PTB from a pretrained
recurrent LM.

:mod:`~rnnpipe.pipeline.finetune.job` runs one job, :mod:`~rnnpipe.pipeline.finetune.identity` says
what its result is made from, :mod:`~rnnpipe.pipeline.finetune.sweep` expands a grid into jobs and
:mod:`~rnnpipe.pipeline.finetune.collect` makes the table. A task's kind is one class in
:mod:`~rnnpipe.pipeline.finetune.kinds` (its files, head, loss, metrics and which way is better);
:mod:`~rnnpipe.pipeline.finetune.feeds` runs its batches and evaluations through the model
(:mod:`~rnnpipe.pipeline.finetune.model`, built by :mod:`~rnnpipe.pipeline.finetune.build`);
:mod:`~rnnpipe.pipeline.finetune.glue` reads sentence (pair) tasks and
:mod:`~rnnpipe.pipeline.finetune.metrics` scores them.
"""
