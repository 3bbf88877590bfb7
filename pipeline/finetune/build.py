"""The model of a fine-tuning job: the backbone (pretrained, or the same architecture afresh),
for ``head.features=elmo`` the backward LM, the head, and ``embeddings.init``'s vectors."""

from __future__ import annotations

from typing import Any

import torch

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.finetune import kinds
from rnnpipe.pipeline.finetune.config import Features, Init, JobConfig
from rnnpipe.pipeline.finetune.kinds import Head, TaskData
from rnnpipe.pipeline.finetune.model import FinetuneModel, set_dropout
from rnnpipe.pipeline.models import backbone as models
from rnnpipe.pipeline.models import embeddings
from rnnpipe.pipeline.models.config import EmbeddingFreeze
from rnnpipe.pipeline.models.lm import LanguageModel
from rnnpipe.pipeline.models.pretrained import load_pretrained


def _fresh(lm: torch.nn.Module) -> torch.nn.Module:
    """The same architecture as ``lm`` (same config, same vocabulary), fresh weights from the
    current RNG (a huggingface-kind backbone: from its transformers config)."""
    config = getattr(getattr(lm, "backbone", None), "config", None)
    return models.build_model(lm.cfg, lm.vocab_size, config and config.to_dict())


def _backward_lm(cfg: JobConfig, forward: torch.nn.Module) -> torch.nn.Module:
    """The backward LM of an elmo job: loaded from ``pretrained_backward`` (already checked to hold
    the forward LM's tokenizer), an rnnpipe LanguageModel of the forward LM's depth and width."""
    if not cfg.pretrained_backward:
        raise ConfigError(
            "head.features=elmo needs a backward LM: set pretrained_backward (its export or its "
            f"pretrain run dir), or export one into {fsio.join(cfg.pretrained, 'backward')}"
        )
    backward = load_pretrained(cfg.pretrained_backward)
    for name, lm in (("pretrained", forward), ("pretrained_backward", backward)):
        if not isinstance(lm, LanguageModel):
            raise ConfigError(
                f"head.features=elmo reads every layer of an rnnpipe LM (model.kind=rnnpipe); "
                f"{name} is a transformers model with added recurrence: use head.features=last or "
                "reversed_input"
            )
    n, d = len(forward.block_of_layer), forward.hidden_size
    if (len(backward.block_of_layer), backward.hidden_size) != (n, d):
        raise ConfigError(
            f"pretrained_backward={cfg.pretrained_backward} has {len(backward.block_of_layer)} layers "
            f"of {backward.hidden_size}, the forward LM {n} of {d}: ELMo mixes them layer by layer"
        )
    return backward


def build_model(
    cfg: JobConfig, data: TaskData, tok: Any = None
) -> tuple[FinetuneModel, dict[str, Any] | None]:
    """The pretrained backbone (or the same architecture from scratch, seeded) plus the head of the
    data's kind, and for elmo the backward LM (pretrained, or from scratch too); then
    ``embeddings.init``'s vectors in every backbone's embedding (``tok``: the backbone's tokenizer).
    Returns the model and what the vectors file gave
    (:func:`rnnpipe.pipeline.models.embeddings.initialize`'s record, or None)."""
    kind = kinds.get(data.kind)
    torch.manual_seed(cfg.seed)
    pretrained = load_pretrained(cfg.pretrained)
    # scratch: the same architecture, fresh weights (a huggingface-kind backbone: from its config)
    backbone = _fresh(pretrained) if cfg.init is Init.scratch else pretrained
    backward = None
    if cfg.head.features is Features.elmo:
        if kind.head is Head.lm:  # no head to read the mix
            raise ConfigError(
                f"head.features=elmo is for {kinds.described(lambda k: k.head is not Head.lm)} tasks"
            )
        backward = _backward_lm(cfg, pretrained)
        if cfg.init is Init.scratch:  # the control: both LMs from scratch
            backward = _fresh(backward)
    for lm in (backbone, backward):
        if lm is not None and cfg.dropout >= 0:
            set_dropout(lm, cfg.dropout)
    model = FinetuneModel(backbone, data.kind, max(1, len(data.labels)), cfg.head, backward)
    bias = kind.initial_bias(data)
    if bias is not None and model.head is not None:
        with torch.no_grad():
            model.head.bias.fill_(bias)
    vectors = None
    if cfg.embeddings.init:
        for lm in model.backbones():
            vectors = embeddings.initialize(lm, lm.cfg, tok, True, False, cfg.embeddings, "embeddings")
            weight = lm.embed.weight
            if cfg.embeddings.freeze is EmbeddingFreeze.all:
                model.always_frozen.append(weight)
            elif cfg.embeddings.freeze is EmbeddingFreeze.found:
                model.no_weight_decay.add(id(weight))  # zero gradient, no decay: AdamW keeps the rows
    return model, vectors


def scalar_mix(model: FinetuneModel) -> dict[str, Any]:
    """The learned ELMo mix of the best weights: the layers' softmax weights (bottom first) and gamma."""
    assert model.mix is not None
    with torch.no_grad():
        return {"weights": model.mix.weights().tolist(), "gamma": float(model.mix.gamma)}
