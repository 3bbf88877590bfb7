"""What an export directory needs for ``transformers`` beside rnnpipe's own files.

``hf_config_keys`` are merged into ``config.json``; ``hf_files`` are written beside it: the two
``*_rnnpipe.py`` files that ``trust_remote_code=True`` imports (they import the classes from the
installed rnnpipe), ``generation_config.json`` and the tokenizer's files. Needs no ``transformers``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from importlib import metadata
from typing import Any

from pipeline.data.tokenizers import Tokenizer
from pipeline.models.hf.tokenizer_files import UnsupportedTokenizer, tokenizer_files

log = logging.getLogger("rnnpipe")

CONFIG_CODE = "configuration_rnnpipe.py"
MODEL_CODE = "modeling_rnnpipe.py"

_IMPORT = """try:
    {imports}
except ImportError as e:  # transformers would suggest `pip install pipeline`, an unrelated package
    raise ImportError(
        "this model is an rnnpipe export: its code comes with rnnpipe (pip install 'rnnpipe[hf]')"
    ) from e
"""

# Thin subclasses defined in the files themselves: transformers' save_pretrained then copies these
# files (not rnnpipe's source) and keeps auto_map pointing at them.
CONFIG_SHIM = (
    '''"""The config class of an rnnpipe export, for transformers' trust_remote_code=True.

The code is the installed rnnpipe's (pip install 'rnnpipe[hf]'): this file only subclasses it.
"""

'''
    + _IMPORT.format(imports="from pipeline.models.hf.configuration import RnnpipeConfig as _Config")
    + '''

class RnnpipeConfig(_Config):
    """rnnpipe's model config (pipeline/models/hf/configuration.py)."""

    def __init__(self, **kwargs):  # its own __init__: transformers 5 keeps it (no generated one)
        super().__init__(**kwargs)
'''
)
MODEL_SHIM = (
    '''"""The model class of an rnnpipe export, for transformers' trust_remote_code=True.

The code is the installed rnnpipe's (pip install 'rnnpipe[hf]'): this file only subclasses it.
"""

from .configuration_rnnpipe import RnnpipeConfig

'''
    + _IMPORT.format(
        imports="from pipeline.models.hf.modeling import RnnpipeCache, RnnpipeForCausalLM as _Model"
    )
    + '''

__all__ = ["RnnpipeCache", "RnnpipeConfig", "RnnpipeForCausalLM"]


class RnnpipeForCausalLM(_Model):
    """rnnpipe's LanguageModel as a causal LM (pipeline/models/hf/modeling.py)."""

    config_class = RnnpipeConfig
'''
)


def hf_config_keys(model: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    """The keys ``transformers`` reads from ``config.json`` (rnnpipe's own keys stay as they are)."""
    eod = tokenizer.eod_id
    keys: dict[str, Any] = {
        "model_type": "rnnpipe",
        "architectures": ["RnnpipeForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{CONFIG_CODE[:-3]}.RnnpipeConfig",
            "AutoModel": f"{MODEL_CODE[:-3]}.RnnpipeForCausalLM",
            "AutoModelForCausalLM": f"{MODEL_CODE[:-3]}.RnnpipeForCausalLM",
        },
        "hidden_size": model["d_model"],
        "num_hidden_layers": model["n_layers"],
        "tie_word_embeddings": bool(model.get("tie_embeddings", True)),
        "eos_token_id": eod,
        "bos_token_id": None,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": "float32",
    }
    with contextlib.suppress(metadata.PackageNotFoundError):
        keys["transformers_version"] = metadata.version("transformers")
    return keys


def hf_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """The code shims, ``generation_config.json`` and tokenizer files (name -> content)."""
    generation = {"eos_token_id": tokenizer.eod_id, "pad_token_id": tokenizer.eod_id, "do_sample": True}
    files = {
        CONFIG_CODE: CONFIG_SHIM.encode(),
        MODEL_CODE: MODEL_SHIM.encode(),
        "generation_config.json": (json.dumps(generation, indent=1) + "\n").encode(),
    }
    try:
        files.update(tokenizer_files(tokenizer))
    except UnsupportedTokenizer as e:  # the model still loads; its tokenizer stays rnnpipe's own
        log.warning("export: no Hugging Face tokenizer files for this %s tokenizer: %s", tokenizer.kind, e)
    return files
