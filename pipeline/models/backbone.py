"""Building a model from its config: rnnpipe's own, or a Hugging Face backbone with recurrence.

``build_model(cfg, vocab)`` is what the pretrain loop, the export loader and fine-tuning call. A
``model.kind=huggingface`` backbone comes from ``model.hf.path`` (a hub name, a local transformers
directory, or an rnnpipe export of such a model: its backbone without its recurrence), or from a
config alone (``init=random``); :func:`backbone_source` names what it was made from, by content,
for the run's identity. ``transformers`` is imported only here and only for that kind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.models.config import HFBackboneConfig, ModelConfig, ModelKind
from rnnpipe.pipeline.models.exported import is_export

# An export's config.json key holding the backbone's transformers config (to rebuild it offline).
BACKBONE_CONFIG_KEY = "hf_backbone"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")


def build_model(
    cfg: ModelConfig, vocab_size: int, backbone_config: dict[str, Any] | None = None
) -> nn.Module:
    """The model ``cfg`` describes, with ``vocab_size`` ids. For kind huggingface, ``backbone_config``
    (a transformers config as a dict, what an export records) builds the backbone with fresh weights
    instead of loading ``model.hf``: the weights are loaded afterwards (or it trains from scratch)."""
    if cfg.kind is ModelKind.rnnpipe:
        from rnnpipe.pipeline.models.lm import LanguageModel

        return LanguageModel(cfg, vocab_size)
    from rnnpipe.pipeline.models.recurrence import AddedRecurrenceLM

    backbone = load_backbone(cfg.hf, vocab_size, backbone_config)
    return AddedRecurrenceLM(cfg, vocab_size, backbone)


def _from_config(config_dict: dict[str, Any], overrides: dict[str, Any], vocab_size: int | None) -> nn.Module:
    from rnnpipe.pipeline.models.recurrence import backbone_from_config

    return backbone_from_config(config_dict, overrides, vocab_size)


def local_path(hf: HFBackboneConfig) -> str:
    """``model.hf.path`` as a local directory: itself, or a hub name's snapshot (downloaded when the
    hub is reachable; only the config for init=random). Loading and the identity's digest both
    read this one directory, so the files hashed are the files loaded."""
    if os.path.isdir(hf.path):
        return hf.path
    try:
        from huggingface_hub import snapshot_download

        if hf.init == "random":
            return snapshot_download(hf.path, allow_patterns=["config.json"])
        root = snapshot_download(hf.path, allow_patterns=["*.json", "*.safetensors"])
        if not any(n.endswith(".safetensors") for n in os.listdir(root)):  # an older repo: .bin only
            root = snapshot_download(hf.path, allow_patterns=["*.json", "*.bin"])
        return root
    except Exception as e:  # offline, unknown name, no access: the message says which
        raise ConfigError(f"model.hf.path={hf.path!r}: not a directory, and not on the hub ({e})") from e


def load_backbone(
    hf: HFBackboneConfig, vocab_size: int, backbone_config: dict[str, Any] | None = None
) -> nn.Module:
    """The ``AutoModelForCausalLM`` that ``hf`` names, fp32, in train mode (``from_pretrained``
    returns eval mode: dropout off until the first evaluation would make resumed runs differ)."""
    return _load_backbone(hf, vocab_size, backbone_config).train()


def _load_backbone(
    hf: HFBackboneConfig, vocab_size: int, backbone_config: dict[str, Any] | None
) -> nn.Module:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:  # say what failed: transformers may be installed and still not import
        hint = " (pip install 'rnnpipe[hf]')" if e.name == "transformers" else ""
        raise ConfigError(
            f"model.kind=huggingface needs transformers, which does not import: {e}{hint}"
        ) from e
    if backbone_config is not None:
        return _from_config(backbone_config, {}, None)
    overrides = dict(hf.config)
    if "vocab_size" in overrides:
        raise ConfigError("model.hf.config.vocab_size: the vocabulary is the dataset's, not a setting")
    if hf.path and is_export(hf.path):
        return _backbone_of_export(hf, vocab_size, overrides)
    root = local_path(hf) if hf.path else ""
    if hf.init == "random":
        # A new model of the path's (or the model type's) architecture, sized for the dataset.
        if hf.path:
            try:
                base = AutoConfig.from_pretrained(root).to_dict()
            except (OSError, ValueError) as e:
                raise ConfigError(f"model.hf.path={hf.path!r}: no transformers config there ({e})") from e
        else:
            base = {"model_type": hf.model_type}
        try:
            return _from_config(base, overrides, vocab_size)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"model.hf: cannot build a {base.get('model_type')!r} model ({e})") from e
    try:
        return AutoModelForCausalLM.from_pretrained(root, dtype=torch.float32, **overrides)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.hf.path={hf.path!r}: cannot load a causal LM from it ({e})") from e


def _backbone_of_export(hf: HFBackboneConfig, vocab_size: int, overrides: dict[str, Any]) -> nn.Module:
    """The backbone inside an rnnpipe export of a huggingface-kind model: its recorded config,
    and (init=pretrained) its ``backbone.*`` weights; the export's recurrence stays behind."""
    from safetensors.torch import load_file

    meta = json.loads((Path(hf.path) / "config.json").read_text())
    if meta["model"].get("kind") != ModelKind.huggingface.value or BACKBONE_CONFIG_KEY not in meta:
        raise ConfigError(
            f"model.hf.path={hf.path!r} is an rnnpipe export of an rnnpipe model, not of a Hugging "
            "Face backbone: use train.init_from for it"
        )
    if int(meta["vocab_size"]) != vocab_size:
        raise ConfigError(
            f"model.hf.path={hf.path!r} was trained on {meta['vocab_size']} ids, the dataset has {vocab_size}"
        )
    backbone = _from_config(meta[BACKBONE_CONFIG_KEY], overrides, None)
    if hf.init == "random":
        return backbone
    state = load_file(str(Path(hf.path) / "model.safetensors"))
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    load_weights(backbone, weights, f"{hf.path}/model.safetensors")
    return backbone


def check_backbone(cfg: ModelConfig, vocab_size: int, tokenizer: dict[str, Any], data_path: str) -> None:
    """The preflight of a huggingface-kind model, from configs only (no weights): the dataset's
    tokenizer is the backbone's own (init=pretrained from a transformers model), its ids fit the
    embedding, and the recurrence fits the backbone's positions and layers. ConfigError otherwise."""
    hf = cfg.hf
    if hf.path and is_export(hf.path):
        meta = json.loads((Path(hf.path) / "config.json").read_text())
        config = meta.get(BACKBONE_CONFIG_KEY) or {}
    elif hf.init == "random":
        return  # sized for the dataset, built fresh: the rank's own checks suffice
    else:
        root = local_path(hf)
        config = json.loads((Path(root) / "config.json").read_text())
        _check_tokenizer(hf.path, root, tokenizer, data_path)
    positions = config.get("max_position_embeddings") or config.get("n_positions") or 0
    layers = config.get("num_hidden_layers") or config.get("n_layer") or 0
    cfg.check_backbone_fits(vocab_size, int(config.get("vocab_size") or 0), int(positions), int(layers))


def _check_tokenizer(path: str, root: str, tokenizer: dict[str, Any], data_path: str) -> None:
    """A pretrained backbone reads its own tokenizer's ids: when its directory has a tokenizer, the
    dataset must have been prepared with it (the same vocabulary, where it is a tokenizer.json). A
    directory without one (a model saved alone) is taken at its word: only the sizes are checked."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((Path(root) / n).is_file() for n in names):
        return
    if tokenizer.get("kind") != "huggingface":
        raise ConfigError(
            f"model.hf.path={path!r} is a pretrained model, but data.path={data_path} was prepared with "
            f"the {tokenizer.get('kind')} tokenizer: its ids are not the model's. Prepare it with "
            f"tokenizer.kind=huggingface tokenizer.path={path}, or set model.hf.init=random"
        )
    theirs = Path(root) / "tokenizer.json"
    ours = tokenizer.get("model_file")
    if not theirs.is_file() or not ours:
        return
    from tokenizers import Tokenizer as FastTokenizer

    from rnnpipe.pipeline.data.manifest import inside

    mine = FastTokenizer.from_str(
        fsio.read_text(inside(fsio.absolute(data_path), ours, "tokenizer.model_file"))
    )
    if mine.get_vocab(with_added_tokens=True) != FastTokenizer.from_file(str(theirs)).get_vocab(
        with_added_tokens=True
    ):
        raise ConfigError(
            f"data.path={data_path} was tokenized with another vocabulary than model.hf.path={path!r}'s "
            f"tokenizer.json: prepare it with tokenizer.path={path}"
        )


def load_weights(module: nn.Module, state: dict[str, Any], where: str) -> None:
    """Load ``state`` into ``module``; keys a tied matrix shares may be absent (stored once)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    tied = tied_names(module)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise PipelineError(
            f"{where} does not match its model config: missing {missing}, unexpected {unexpected}"
        )


def tied_names(module: nn.Module) -> set[str]:
    """Names of parameters that are another name's tensor (a tied output layer): stored once."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied


_hashes: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: str) -> str:
    """A backbone file's sha256, once per process for each (path, size, mtime): a launch's plan
    and completeness check both ask for the digest."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        _hashes[key] = fsio.sha256_of(path)[0]
    return _hashes[key]


def _hash_files(root: str, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(f"{name}\0{_file_sha256(os.path.join(root, name))}\0".encode())
    return digest.hexdigest()


def backbone_digest(cfg: ModelConfig) -> str:
    """The content digest a run's identity holds for its backbone: "" for an rnnpipe-kind model."""
    return backbone_source(cfg.hf)["sha256"] if cfg.kind is ModelKind.huggingface else ""


def backbone_source(hf: HFBackboneConfig) -> dict[str, Any]:
    """What a huggingface-kind backbone is made from, by content: ``{"path", "sha256"}``, the sha256
    over its config and weight files (an rnnpipe export: its weights' recorded sha256). A hub name
    resolves to its cached snapshot (downloaded when the hub is reachable)."""
    if not hf.path:
        return {"path": "", "sha256": hashlib.sha256(hf.model_type.encode()).hexdigest()}
    if is_export(hf.path):
        from rnnpipe.pipeline.models.exported import backbone_identity

        return {"path": fsio.absolute(hf.path), "sha256": backbone_identity(hf.path)["sha256"]}
    root = local_path(hf)
    if hf.init == "random":
        names = ["config.json"] if os.path.exists(os.path.join(root, "config.json")) else []
    else:
        names = [
            n
            for n in os.listdir(root)
            if n.endswith(_WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(root, n))
        ]
    if not names:
        raise ConfigError(f"model.hf.path={hf.path!r}: no config or weight files in {root}")
    return {"path": os.path.abspath(root), "sha256": _hash_files(root, names)}
