"""``RnnpipeConfig``: an export's ``config.json`` as a ``transformers`` config.

The file holds rnnpipe's own keys (``model``: the ModelConfig as plain values, ``vocab_size``,
``tokenizer``; for ``model.kind=huggingface`` also ``hf_backbone``, the backbone's transformers
config) beside the ones ``transformers`` reads (``model_type``, ``auto_map``, ``hidden_size``, ...);
both sets survive a ``save_pretrained``. (Exports written before rnnpipe.json held ``source``
here too: it is kept as it is.)
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from rnnpipe.pipeline.config import config_from_dict

# The built-in mixers, registered before a config is checked (its mixer and cell name registered
# classes). Imported by name here so that an export's bundled code, which transformers copies by
# following import statements from this file, holds their modules (pipeline/models/hf/bundle.py).
from rnnpipe.pipeline.models import attention as attention
from rnnpipe.pipeline.models import mixers as mixers
from rnnpipe.pipeline.models.config import ModelConfig, ModelKind

MODEL_TYPE = "rnnpipe"


def _backbone_sizes(backbone: dict[str, Any]) -> tuple[int, int, bool]:
    """(hidden size, layers, tied output layer) of a backbone's transformers config (as a dict)."""
    from transformers import AutoConfig

    values = {k: v for k, v in backbone.items() if k not in ("model_type", "_name_or_path")}
    config = AutoConfig.for_model(backbone["model_type"], **values)
    return int(config.hidden_size), int(config.num_hidden_layers), bool(config.tie_word_embeddings)


class RnnpipeConfig(PretrainedConfig):
    """The model config of an rnnpipe export (``model``: :class:`ModelConfig` as a dict)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        vocab_size: int = 256,
        tokenizer: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        hf_backbone: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.model = dict(model or {})
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        if source is not None:  # an export from before rnnpipe.json
            self.source = source
        self.hf_backbone = hf_backbone
        cfg = self.model_config()
        if cfg.kind is ModelKind.huggingface and hf_backbone and "model_type" in hf_backbone:
            self.hidden_size, self.num_hidden_layers, tied = _backbone_sizes(hf_backbone)
        else:
            self.hidden_size, self.num_hidden_layers, tied = cfg.d_model, cfg.n_layers, cfg.tie_embeddings
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs.setdefault("tie_word_embeddings", tied)
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The :class:`ModelConfig` this config describes (checked as rnnpipe checks its config files)."""
        return config_from_dict(ModelConfig, self.model, "in the export's config.json")
