"""``RnnpipeConfig``: an export's ``config.json`` as a ``transformers`` config.

The file holds rnnpipe's own keys (``model``: the ModelConfig as plain values, ``vocab_size``,
``tokenizer``, ``source``) beside the ones ``transformers`` reads (``model_type``, ``auto_map``,
``hidden_size``, ...); both sets survive a ``save_pretrained``.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from pipeline.config import config_from_dict
from pipeline.models.config import ModelConfig

MODEL_TYPE = "rnnpipe"


class RnnpipeConfig(PretrainedConfig):
    """The model config of an rnnpipe export (``model``: :class:`ModelConfig` as a dict)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        vocab_size: int = 256,
        tokenizer: dict[str, Any] | None = None,
        source: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        self.model = dict(model or {})
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.source = source
        cfg = self.model_config()
        self.hidden_size = cfg.d_model
        self.num_hidden_layers = cfg.n_layers
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs.setdefault("tie_word_embeddings", cfg.tie_embeddings)
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        """The :class:`ModelConfig` this config describes (checked as rnnpipe checks its config files)."""
        return config_from_dict(ModelConfig, self.model, "in the export's config.json")
