"""Writing and loading an exported model (``rnnpipe export``) without DeepSpeed.

An export directory holds ``model.safetensors`` (fp32), ``config.json`` (the model config, the
vocabulary size, the tokenizer's description and the keys ``transformers`` reads; portable: no
absolute path, host name or process id), ``rnnpipe.json`` (rnnpipe's header: where the weights
came from, and the model config as the run had it), ``README.md`` (the model card),
``tokenizer/`` (rnnpipe's tokenizer file, if any), and what ``AutoModelForCausalLM``/
``AutoTokenizer`` need, with or without rnnpipe installed (see :mod:`rnnpipe.pipeline.models.hf`).
Files get the user's umask (0644 under the usual 022), so colleagues on a shared cluster can read
them.

A backward LM's export (``data.direction=backward``) loads the same way; an export written with
``rnnpipe export ... --backward`` holds one in ``backward/`` (:func:`rnnpipe.pipeline.models.exported.
backward_export`): ``load_pretrained(OUT / "backward")``.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path, PureWindowsPath
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import config_from_dict
from rnnpipe.pipeline.data.tokenizers import Tokenizer, tokenizer_from_manifest
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.models.backbone import BACKBONE_CONFIG_KEY, build_model, load_weights
from rnnpipe.pipeline.models.config import ModelConfig, ModelKind
from rnnpipe.pipeline.models.export_shapes import check_weights
from rnnpipe.pipeline.models.exported import (
    CONFIG,
    HEADER,
    HEADER_FORMAT,
    WEIGHTS,
    export_config,
    export_tokenizer,
)
from rnnpipe.pipeline.models.hf.bundle import bundle
from rnnpipe.pipeline.models.hf.card import model_card
from rnnpipe.pipeline.models.hf.files import hf_config_keys, hf_files
from rnnpipe.pipeline.models.lm import LanguageModel


def _config(path: Path) -> dict:
    """The export's config.json, checked (one line naming the file when it is not an export's)."""
    return export_config(path)


def inside(root: Path, rel: str) -> Path:
    """``root / rel`` for a relative path that stays inside ``root`` (a file named by an export's or
    a dataset's metadata); PipelineError for an absolute path or one that climbs out with ``..``."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        raise PipelineError(f"{root}: the tokenizer file {rel!r} is not a relative path inside it")
    return Path(root) / rel


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_pretrained(
    out: str | Path,
    state: dict[str, torch.Tensor],
    model: dict[str, Any],
    tokenizer: dict[str, Any],
    tokenizer_files: dict[str, bytes] | None = None,
    source: dict[str, Any] | None = None,
    backbone_config: dict[str, Any] | None = None,
) -> Path:
    """Write an export directory: ``state`` (a LanguageModel's state dict) as fp32 safetensors,
    ``model`` (the ModelConfig as plain values), the tokenizer's manifest entry and its files
    (path relative to ``out`` -> content), ``source`` (where it came from: the header's record),
    the model card and the Hugging Face files.

    ``config.json`` gets a portable copy of ``model`` (an absolute path reduced to its last name);
    ``rnnpipe.json`` keeps ``model`` as given and ``source`` with the weights' sha256, size and
    mtime. A huggingface-kind model (an :class:`~rnnpipe.pipeline.models.recurrence.AddedRecurrenceLM`'s
    state) also records ``backbone_config``, its backbone's transformers config, so that it is
    rebuilt offline, by rnnpipe and by transformers alike."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = dict(tokenizer_files or {})
    tok = tokenizer_from_manifest({"tokenizer": tokenizer}, lambda rel: files[rel])
    hf_kind = model.get("kind") == ModelKind.huggingface.value
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    if hf_kind:  # a tied output layer under both of transformers' names: stored once
        state = _stored_once(state)
    if model.get("tie_embeddings", True) and not hf_kind:
        state.pop("head.weight", None)
    # One metadata key: safetensors writes its metadata map in a random order, and two keys would
    # give identical weights two sha256s (the step is in the header's source)
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    os.chmod(out / WEIGHTS, 0o666 & ~_umask())  # safetensors creates its file 0600
    # The weights' own identity, recorded once: what fine-tune results name as their backbone.
    sha, size = fsio.sha256_of(str(out / WEIGHTS))
    # (size and mtime let a reader trust the recorded sha256 without re-hashing an unchanged file)
    mtime = (out / WEIGHTS).stat().st_mtime_ns
    source = {**(source or {}), "weights_sha256": sha, "weights_size": size, "weights_mtime_ns": mtime}
    portable = _portable(model)
    backbone = None
    if hf_kind and backbone_config is not None:
        backbone = _portable({k: v for k, v in backbone_config.items() if k != "_name_or_path"})
    card = model_card(portable, tokenizer, source, _count(state), bundle().requirements, backbone)
    for rel, data in {**files, **hf_files(tok), "README.md": card.encode()}.items():
        target = inside(out, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    meta = {
        **hf_config_keys(portable, tok, backbone if hf_kind else None),
        "model": portable,
        "vocab_size": tokenizer["vocab_size"],
        "tokenizer": _portable(tokenizer),
        **({BACKBONE_CONFIG_KEY: backbone} if hf_kind else {}),
    }
    (out / CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
    header = {"format": HEADER_FORMAT, "version": 1, "model": model, "source": source}
    (out / HEADER).write_text(json.dumps(header, indent=1) + "\n")
    return out


def _is_absolute(value: str) -> bool:
    """Whether a string is an absolute (or home-relative) local path or a file URL."""
    return os.path.isabs(value) or PureWindowsPath(value).is_absolute() or value.startswith(("~", "file:"))


def _portable(value: Any) -> Any:
    """``value`` (plain JSON values) with every absolute path reduced to its last name: what it
    was called, not where it lived (config.json travels; rnnpipe.json keeps the paths)."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if isinstance(value, str) and _is_absolute(value):
        return posixpath.basename(value.replace("\\", "/").rstrip("/")) or "local"
    return value


def _count(state: dict[str, torch.Tensor]) -> int:
    """Distinct parameters among ``state``'s tensors (a tensor stored under two names counts once)."""
    seen = set()
    total = 0
    for v in state.values():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), v.numel()) if v.numel() else (id(v), 0, 0)
        if key not in seen:
            seen.add(key)
            total += v.numel()
    return total


def _stored_once(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the later names of a tensor stored under two (a tied output layer):
    safetensors keeps no shared tensors, and the loader ties them again."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def model_from_state(
    model: dict[str, Any],
    vocab_size: int,
    state: dict[str, torch.Tensor],
    where: str,
    backbone_config: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The model built from its config (plain values) and loaded with ``state``, which must match
    it (a tied output layer may be absent); PipelineError naming ``where`` otherwise. A
    huggingface-kind model needs ``backbone_config`` (what the export or checkpoint recorded)."""
    cfg = config_from_dict(ModelConfig, model, f"in {where}")
    if cfg.kind is ModelKind.huggingface:
        if backbone_config is None:
            raise PipelineError(f"{where}: a huggingface-kind model without its backbone's config")
        lm = build_model(cfg, int(vocab_size), backbone_config)
        load_weights(lm, dict(state), where)
        return lm.requires_grad_(True)  # model.freeze is how it was trained, not what it is
    lm = LanguageModel(cfg, int(vocab_size))
    # (a tied output layer is stored once, as the embedding: safetensors keeps no shared tensors)
    load_weights(lm, dict(state), where)
    return lm


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The exported model, in eval mode, with fp32 weights on ``device``."""
    path = Path(path)
    meta = _config(path)
    check_weights(path, meta)  # the config's sizes against the file's shapes, before any allocation
    state = load_file(str(path / WEIGHTS), device="cpu")
    if state and all(k.startswith("model.") for k in state):  # re-saved by transformers' save_pretrained
        state = {k[len("model.") :]: v for k, v in state.items()}
    lm = model_from_state(
        meta["model"], meta["vocab_size"], state, str(path / WEIGHTS), meta.get(BACKBONE_CONFIG_KEY)
    )
    return lm.to(device).eval()


def load_pretrained_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer the exported model was trained with."""
    return export_tokenizer(Path(path))
