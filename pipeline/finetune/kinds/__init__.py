"""Fine-tune task kinds: one class each, in a registry (:mod:`.base` says what a kind declares).

rnnpipe's own: ``classification`` and ``regression`` (:mod:`.sentence`: GLUE and GLUE-style TSV,
sentence pairs), ``tagging`` (:mod:`.tagging`: CoNLL-2003) and ``lm`` (:mod:`.lm`: PTB). Importing
this package registers them; ``RNNPIPE_PLUGINS`` adds kinds defined elsewhere.
"""

from __future__ import annotations

from rnnpipe.pipeline.finetune.kinds import lm, sentence, tagging
from rnnpipe.pipeline.finetune.kinds.base import (
    IGNORE,
    ExampleKind,
    Head,
    Kind,
    TaskData,
    check_task,
    described,
    get,
    of,
    register,
    registered,
)

__all__ = [
    "IGNORE",
    "ExampleKind",
    "Head",
    "Kind",
    "TaskData",
    "check_task",
    "described",
    "get",
    "lm",
    "of",
    "register",
    "registered",
    "sentence",
    "tagging",
]
