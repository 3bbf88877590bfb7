"""What an export directory needs for ``transformers`` beside rnnpipe's own files.

``hf_config_keys`` are merged into ``config.json``; ``hf_files`` are written beside it: the two
``*_rnnpipe.py`` files that ``trust_remote_code=True`` imports, the bundled copy of rnnpipe's
model code they fall back on (:mod:`rnnpipe.pipeline.models.hf.bundle`),
``generation_config.json`` and the tokenizer's files. Needs no ``transformers``.

The shims take the installed rnnpipe's classes when ``rnnpipe`` imports (the same code as
``import rnnpipe`` registers with the Auto classes), else the bundled copy's; the config and the
model class always come from the same one. When neither imports, the ImportError names what
failed in each.
"""

from __future__ import annotations

import contextlib
import json
import logging
from importlib import metadata
from typing import Any

from rnnpipe.pipeline.data.tokenizers import Tokenizer
from rnnpipe.pipeline.models.hf.bundle import bundle, flat_name
from rnnpipe.pipeline.models.hf.tokenizer_files import UnsupportedTokenizer, tokenizer_files

log = logging.getLogger("rnnpipe")

CONFIG_CODE = "configuration_rnnpipe.py"
MODEL_CODE = "modeling_rnnpipe.py"
_CONFIGURATION = "rnnpipe.pipeline.models.hf.configuration"
_MODELING = "rnnpipe.pipeline.models.hf.modeling"

# The shims are thin subclasses defined in the files themselves: transformers' save_pretrained then
# copies these files (and, through their relative imports, the bundle) and keeps auto_map on them.
# An import of rnnpipe sits inside a try block, which transformers' import check skips: a Python
# without rnnpipe passes it. The bundled modules follow from their relative imports (bundle.py).
CONFIG_SHIM = '''"""The config class of an rnnpipe export, for transformers' trust_remote_code=True.

With rnnpipe installed (pip install 'rnnpipe[hf]'), its own classes; without it, the copy of its
model code bundled in this directory (the rnnpipe_*.py files, written by rnnpipe export).
"""


def _failure(e: ImportError) -> str:
    """What an import failed on: the module and the error."""
    return f"{{e.name or 'a module'}} ({{type(e).__name__}}: {{e}})"


try:  # the installed rnnpipe
    from rnnpipe.pipeline.models.hf.configuration import RnnpipeConfig as _Config

    BUNDLED = False
    INSTALLED_FAILURE = ""
except ImportError as installed:
    INSTALLED_FAILURE = _failure(installed)
    try:  # the copy bundled in this directory
        from .{configuration} import RnnpipeConfig as _Config
    except ImportError as bundled:
        raise ImportError(
            "this rnnpipe export's model code does not import. The installed rnnpipe: "
            f"{{INSTALLED_FAILURE}}; the copy bundled in the export: {{_failure(bundled)}}. "
            "The bundled copy needs {requirements}"
        ) from bundled
    BUNDLED = True


class RnnpipeConfig(_Config):
    """rnnpipe's model config (rnnpipe/pipeline/models/hf/configuration.py)."""

    def __init__(self, **kwargs):  # its own __init__: transformers 5 keeps it (no generated one)
        super().__init__(**kwargs)
'''

MODEL_SHIM = '''"""The model class of an rnnpipe export, for transformers' trust_remote_code=True.

From the same code as the config class: the installed rnnpipe's, or the copy bundled in this
directory (configuration_rnnpipe.py says which).
"""

from .configuration_rnnpipe import BUNDLED, INSTALLED_FAILURE, RnnpipeConfig, _failure

if BUNDLED:
    try:  # the copy bundled in this directory
        from .{modeling} import RnnpipeCache, RnnpipeForCausalLM as _Model
    except ImportError as bundled:
        raise ImportError(
            "this rnnpipe export's model code does not import. The installed rnnpipe: "
            f"{{INSTALLED_FAILURE}}; the copy bundled in the export: {{_failure(bundled)}}. "
            "The bundled copy needs {requirements}"
        ) from bundled
else:
    try:  # the installed rnnpipe (in a try block, which transformers' import check skips)
        from rnnpipe.pipeline.models.hf.modeling import RnnpipeCache, RnnpipeForCausalLM as _Model
    except ImportError:
        raise

__all__ = ["RnnpipeCache", "RnnpipeConfig", "RnnpipeForCausalLM"]


class RnnpipeForCausalLM(_Model):
    """rnnpipe's model as a causal LM (rnnpipe/pipeline/models/hf/modeling.py)."""

    config_class = RnnpipeConfig
'''


def code_files() -> dict[str, bytes]:
    """The two shims ``auto_map`` names and the bundled model code (file name -> content)."""
    b = bundle()
    requirements = ", ".join(b.requirements)
    files = {
        CONFIG_CODE: CONFIG_SHIM.format(
            configuration=flat_name(_CONFIGURATION), requirements=requirements
        ).encode(),
        MODEL_CODE: MODEL_SHIM.format(modeling=flat_name(_MODELING), requirements=requirements).encode(),
    }
    return {**files, **b.files}


def _backbone_sizes(backbone: dict[str, Any]) -> tuple[Any, Any, bool]:
    """(hidden size, layers, tied output layer) from a transformers config dict's usual keys."""
    width = next((backbone[k] for k in ("hidden_size", "n_embd", "d_model") if k in backbone), None)
    layers = next(
        (backbone[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in backbone), None
    )
    return width, layers, bool(backbone.get("tie_word_embeddings", True))


def hf_config_keys(
    model: dict[str, Any], tokenizer: Tokenizer, backbone: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The keys ``transformers`` reads from ``config.json`` (rnnpipe's own keys stay as they are);
    ``backbone``: a huggingface-kind model's backbone config, whose sizes these are."""
    eod = tokenizer.eod_id
    if backbone is not None:
        width, layers, tied = _backbone_sizes(backbone)
    else:
        width, layers, tied = model["d_model"], model["n_layers"], bool(model.get("tie_embeddings", True))
    keys: dict[str, Any] = {
        "model_type": "rnnpipe",
        "architectures": ["RnnpipeForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{CONFIG_CODE[:-3]}.RnnpipeConfig",
            "AutoModel": f"{MODEL_CODE[:-3]}.RnnpipeForCausalLM",
            "AutoModelForCausalLM": f"{MODEL_CODE[:-3]}.RnnpipeForCausalLM",
        },
        "hidden_size": width,
        "num_hidden_layers": layers,
        "tie_word_embeddings": tied,
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
    """The code (:func:`code_files`), ``generation_config.json`` and the tokenizer's files
    (name -> content)."""
    generation = {"eos_token_id": tokenizer.eod_id, "pad_token_id": tokenizer.eod_id, "do_sample": True}
    files = {
        **code_files(),
        "generation_config.json": (json.dumps(generation, indent=1) + "\n").encode(),
    }
    try:
        files.update(tokenizer_files(tokenizer))
    except UnsupportedTokenizer as e:  # the model still loads; its tokenizer stays rnnpipe's own
        log.warning("export: no Hugging Face tokenizer files for this %s tokenizer: %s", tokenizer.kind, e)
    return files
