"""The fine-tune stage: GLUE (CoLA, SST-2, MRPC, RTE, STS-B), CoNLL-2003 NER and PTB from a pretrained
recurrent LM.

:mod:`~pipeline.finetune.job` runs one job, :mod:`~pipeline.finetune.identity` says what its result
is made from, :mod:`~pipeline.finetune.sweep` expands a grid into jobs and
:mod:`~pipeline.finetune.collect` makes the table; :mod:`~pipeline.finetune.glue` reads sentence (pair)
tasks and :mod:`~pipeline.finetune.metrics` scores them.
"""
