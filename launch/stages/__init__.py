"""One module per pipeline stage, all with the protocol of :mod:`rnnpipe.launch.stages.stage`
(prepare, pretrain and its ranks, the backward LM, finetune, collect). Imports
:mod:`rnnpipe.launch.processes` only.
"""
