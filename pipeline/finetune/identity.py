"""What a fine-tune job's result is made from, and whether a job directory holds it (no torch).

A job's identity is its config without where it lives (``out_dir``), where its backbone was read
from (``pretrained``, ``pretrained_backward``) and its grid labels (``hparams``); in their place,
the backbone's own identity (the exported weights' sha256 and step, its model and tokenizer), an
elmo job's backward LM's (``backward.*``), the sha256 of each task file and of a vectors file
(``embeddings.sha256``). ``result.json`` records the identity and its fingerprint: a job is
complete only when the recorded fingerprint equals the one it would have now. A result made from
other weights, other task files or another config is stale, and the job runs again.

Keys added later stay out of the identity at the value that means "as before" (:data:`ADDED_KEYS`),
and ``head.features`` is written as the ``head.bidirectional`` it replaced where it has one
(``last``: false, ``reversed_input``: true; so are task ``job_overrides`` that set it): every result
recorded before either change is still complete.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import config_diff, describe_diff, fingerprint, flatten, to_dict
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.finetune.config import JobConfig
from rnnpipe.pipeline.models.exported import backbone_identity

RESULT, CHECKPOINT = "result.json", "checkpoint.pt"
# wandb: where metrics go, not what; pretrained(_backward): paths, their content is backbone.*/backward.*
NOT_CONTENT = ("out_dir", "pretrained", "pretrained_backward", "hparams", "wandb")
TASK_FILES = ("train", "dev", "test")
# Keys added after results were recorded without them, with the default that means "as before":
# at that value a key is left out of the identity, so adding it made no existing result stale.
ADDED_KEYS: dict[str, Any] = {
    "task_config.text_pair_column": "",
    "task_config.glue": "",
    "embeddings.init": "",  # none: replaced by embeddings.sha256 where set
    "embeddings.freeze": "none",
}
# head.features's values that head.bidirectional had, written as it was in the identity
AS_BIDIRECTIONAL = {"last": False, "reversed_input": True}

_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(url: str) -> str:
    """The sha256 of a task file, computed once per process for each (path, size, mtime)."""
    if fsio.is_local(url):
        if not os.path.exists(url):
            raise PipelineError(f"{url}: no such file")
        st = os.stat(url)
        key = (url, st.st_size, st.st_mtime_ns)
    else:
        if not fsio.exists(url):
            raise PipelineError(f"{url}: no such file")
        key = (url, fsio.size(url), 0)
    if key not in _hashes:
        _hashes[key] = fsio.sha256_of(url)[0]
    return _hashes[key]


def job_identity(cfg: JobConfig, backbone: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dotted keys a job's result depends on (see the module docstring). ``backbone``: the
    export's :func:`backbone_identity`, when the caller already has it."""
    values = flatten(to_dict(cfg))
    features = values.pop("head.features")
    values.pop("head.bidirectional", None)  # removed (always None: a set one is refused)
    if features in AS_BIDIRECTIONAL:
        values["head.bidirectional"] = AS_BIDIRECTIONAL[features]
    else:
        values["head.features"] = features
    values["task_config.job_overrides"] = [_as_before(o) for o in cfg.task_config.job_overrides]
    if cfg.embeddings.init:  # the vectors' content, not where the file is
        values["embeddings.sha256"] = file_sha256(cfg.embeddings.init)
    out = {
        k: v
        for k, v in values.items()
        if k.split(".")[0] not in NOT_CONTENT
        and k != "embeddings.init"
        and not (k in ADDED_KEYS and v == ADDED_KEYS[k])
    }
    for split in TASK_FILES:
        path = getattr(cfg.task_config, split)
        out[f"task_config.{split}"] = file_sha256(path) if path else ""
    backbone = backbone if backbone is not None else backbone_identity(cfg.pretrained)
    out.update(flatten({"backbone": backbone}))
    if features == "elmo":  # the backward LM's weights (only elmo jobs read one)
        if not cfg.pretrained_backward:
            raise ConfigError(
                "head.features=elmo needs a backward LM: set pretrained_backward (its export or its "
                f"pretrain run dir), or export one into {fsio.join(cfg.pretrained, 'backward')}"
            )
        out.update(flatten({"backward": backbone_identity(cfg.pretrained_backward)}))
    return out


def _as_before(item: str) -> str:
    """A task's job override as the identity records it: ``head.features=last|reversed_input`` as
    the ``head.bidirectional=false|true`` it replaced, every other one as it is."""
    key, sep, value = item.partition("=")
    if sep and key.strip() == "head.features" and value.strip() in AS_BIDIRECTIONAL:
        return f"head.bidirectional={str(AS_BIDIRECTIONAL[value.strip()]).lower()}"
    return item


def read_result(out_dir: str) -> dict[str, Any] | None:
    """A job directory's ``result.json``, or None."""
    path = fsio.join(out_dir, RESULT)
    if not fsio.exists(path):
        return None
    try:
        return json.loads(fsio.read_text(path))
    except ValueError as e:
        raise PipelineError(f"{path}: not valid JSON ({e}); delete it to run the job again") from e


def status(cfg: JobConfig, backbone: dict[str, Any] | None = None) -> tuple[dict[str, Any] | None, str]:
    """(the job's result when complete with its current identity, else None; why not)."""
    identity = job_identity(cfg, backbone)
    result = read_result(cfg.out_dir)
    if result is not None and result.get("fingerprint") == fingerprint(identity):
        return result, "complete"
    partial = " (a checkpoint of it remains)" if fsio.exists(fsio.join(cfg.out_dir, CHECKPOINT)) else ""
    if result is None:
        return None, "not run yet" + partial
    return None, stale_reason(result, identity)


def stale_reason(result: dict[str, Any], identity: dict[str, Any]) -> str:
    """Why ``result`` is not the result of a job with ``identity``: what changed, key by key."""
    if "identity" not in result:
        return "its result was made by an older rnnpipe, without a recorded identity"
    diff = config_diff(result["identity"], identity)
    parts = []
    if any(k.startswith("backbone.") for k in diff):
        was, now = result["identity"], identity
        sha = f"{str(was.get('backbone.sha256'))[:12]} → {str(now.get('backbone.sha256'))[:12]}"
        step = f"{was.get('backbone.step')} → {now.get('backbone.step')}"
        parts.append(f"the backbone changed (sha256 {sha}, step {step})")
    if any(k.startswith("backward.") for k in diff):
        was, now = result["identity"], identity
        sha = f"{str(was.get('backward.sha256'))[:12]} → {str(now.get('backward.sha256'))[:12]}"
        parts.append(f"the backward LM changed (sha256 {sha})")
    files = {k: v for k, v in diff.items() if k.startswith("task_config.") and k.split(".")[1] in TASK_FILES}
    if files:
        parts.append(f"task file(s) changed: {', '.join(k.split('.')[1] for k in files)}")
    rest = {k: v for k, v in diff.items() if not k.startswith(("backbone.", "backward.")) and k not in files}
    if rest:
        parts.append(describe_diff(rest, limit=4))
    return "stale: " + "; ".join(parts)
