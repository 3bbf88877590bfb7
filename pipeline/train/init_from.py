"""``train.init_from=EXPORT_DIR``: a new run that starts from exported weights.

The export's model config and tokenizer must be this run's (checked in the preflight, before any
rank starts, and again by the loop); the optimizer and the schedule start afresh. The checkpoints
record where the weights came from (path, the weights' sha256 and the step they were exported at).
A run that resumes from a checkpoint of its own ignores ``init_from``. ``model.embeddings`` need
not match: a run from an export takes the export's embedding, not a vectors file's (its freeze
still applies, to the rows the file covers).
"""

from __future__ import annotations

from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import config_diff, describe_diff, to_dict
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.train.config import PretrainConfig

_SAME_TOKENIZER = ("kind", "vocab_size", "model_sha256")


def check(cfg: PretrainConfig, vocab: int, tokenizer: dict[str, Any]) -> dict[str, Any]:
    """The export ``cfg.train.init_from`` names, as its ``config.json``, after checking that its
    model (all but dropout and ``model.embeddings``) and tokenizer are this run's: ``vocab`` ids,
    the dataset's manifest ``tokenizer`` entry. Raises :class:`ConfigError` naming what differs."""
    from rnnpipe.pipeline.models.backbone import check_safetensors
    from rnnpipe.pipeline.models.exported import WEIGHTS, export_meta

    where = f"train.init_from={cfg.train.init_from}"
    try:
        meta = export_meta(fsio.absolute(cfg.train.init_from))
        weights = fsio.join(fsio.absolute(cfg.train.init_from), WEIGHTS)
        if fsio.is_local(weights):  # complete (its header against its size), before any rank starts
            check_safetensors(weights, "export it again (or copy it again from where it was made)")
    except PipelineError as e:
        raise ConfigError(f"{where}: {e}") from e
    ours = {**to_dict(cfg.model), "vocab_size": vocab}
    theirs = {**meta["model"], "vocab_size": meta["vocab_size"]}
    # (not model.embeddings: how the export's run began; its weights replace any vectors file's)
    diff = {
        f"model.{k}": v
        for k, v in config_diff(theirs, ours).items()
        if k != "dropout" and not k.startswith("embeddings.")
    }
    if diff:
        raise ConfigError(f"{where}: the export's model is not this run's: {describe_diff(diff)}")
    have = meta["tokenizer"]
    if [have.get(k) for k in _SAME_TOKENIZER] != [tokenizer.get(k) for k in _SAME_TOKENIZER]:
        raise ConfigError(
            f"{where}: the export's tokenizer ({have.get('kind')}, {have.get('vocab_size')} ids) is "
            f"not the dataset's ({tokenizer.get('kind')}, {tokenizer.get('vocab_size')} ids)"
        )
    return meta


def load(model: Any, cfg: PretrainConfig, vocab: int, tokenizer: dict[str, Any]) -> dict[str, Any]:
    """Check (:func:`check`) and load the export's weights into ``model`` (a LanguageModel, before
    DeepSpeed wraps it); returns the record the checkpoints keep: path, weights' sha256, step."""
    from rnnpipe.pipeline.models.exported import backbone_identity
    from rnnpipe.pipeline.models.pretrained import load_pretrained

    check(cfg, vocab, tokenizer)
    path = fsio.absolute(cfg.train.init_from)
    ident = backbone_identity(path)
    model.load_state_dict(load_pretrained(path).state_dict())  # (ties the head as the export does)
    return {"path": path, "weights_sha256": ident.get("sha256"), "step": ident.get("step")}
