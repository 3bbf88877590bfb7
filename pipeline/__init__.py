"""rnnpipe's stages: data (prepare), models, train (pretrain) and finetune.

Nothing in this package knows about Slurm or how it is launched: stages take a config
and, where they fan out, an executor from :mod:`rnnpipe.launch` that maps a function over tasks.
"""
