"""The pretrain stage: DeepSpeed ZeRO training with stateful truncated BPTT over the shards.

Not built yet (the pretrain issue). It reads datasets through :mod:`pipeline.data.manifest`.
"""
