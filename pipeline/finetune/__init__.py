"""The fine-tune stage: SST-2, CoNLL-2003 NER and PTB from a pretrained recurrent LM.

:mod:`~pipeline.finetune.job` runs one job, :mod:`~pipeline.finetune.identity` says what its result
is made from, :mod:`~pipeline.finetune.sweep` expands a grid into jobs and
:mod:`~pipeline.finetune.collect` makes the table.
"""
