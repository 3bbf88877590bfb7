"""Building a model from its config: rnnpipe's own, or a Hugging Face backbone with recurrence.

``build_model(cfg, vocab)`` is what the pretrain loop, the export loader and fine-tuning call. A
``model.kind=huggingface`` backbone comes from ``model.hf.path`` (a hub name, a local transformers
directory, or an rnnpipe export of such a model: its backbone without its recurrence), or from a
config alone (``init=random``); :func:`backbone_source` names what it was made from, by content,
for the run's identity. ``transformers`` is imported only here and only for that kind.

A model directory is data, never code: every ``from_pretrained`` here passes
``trust_remote_code=False`` (so no answer to transformers' prompt runs the directory's ``.py``
files), a config whose ``auto_map`` asks for its own code is refused unless its ``model_type`` is
one transformers knows (then its own classes load it), and weights are read as weights only: every
``*.safetensors`` is checked complete (:func:`check_weight_files`, in the preflight and again before
loading), and a ``.bin`` that unpickles anything but tensors is refused, never retried with
``weights_only=False``. Each refusal is one :class:`ConfigError` naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
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
    if root:
        check_no_code(hf.path, root)
    if hf.init == "random":
        # A new model of the path's (or the model type's) architecture, sized for the dataset.
        if hf.path:
            try:
                base = AutoConfig.from_pretrained(root, trust_remote_code=False).to_dict()
            except (OSError, ValueError) as e:
                raise ConfigError(f"model.hf.path={hf.path!r}: no transformers config there ({e})") from e
        else:
            base = {"model_type": hf.model_type}
        try:
            return _from_config(base, overrides, vocab_size)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"model.hf: cannot build a {base.get('model_type')!r} model ({e})") from e
    check_weight_files(hf.path, root)
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(
            root, dtype=torch.float32, trust_remote_code=False, **overrides
        )
    except pickle.UnpicklingError as e:  # (checked above: a file changed since, or a legacy .bin)
        raise ConfigError(_pickle_message(hf.path, root, e)) from None
    except SafetensorError as e:
        raise ConfigError(f"model.hf.path={hf.path!r}: {_truncated(root, e)}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.hf.path={hf.path!r}: cannot load a causal LM from it ({e})") from e


def check_no_code(path: str, root: str) -> None:
    """rnnpipe never runs a model directory's own code: a ``config.json`` whose ``auto_map``
    names classes in the directory loads only when its ``model_type`` is one transformers knows
    (its own classes then load it, the directory's ``.py`` files unread); else a ConfigError."""
    try:
        config = json.loads((Path(root) / "config.json").read_text())
    except (OSError, ValueError):
        return  # transformers says what is wrong with it
    if not isinstance(config, dict) or not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    raise ConfigError(
        f"model.hf.path={path!r}: {Path(root) / 'config.json'} asks for the directory's own model "
        f"code (auto_map) for model_type {model_type!r}, which this transformers does not know; "
        "rnnpipe never runs a model directory's own code (trust_remote_code=False): use a model "
        "of a type transformers supports"
    )


def check_weight_files(path: str, root: str) -> None:
    """The weight files of the local transformers directory ``root`` (``model.hf.path=path``),
    before any is loaded: every ``*.safetensors`` complete (its header read and checked against
    the file's size: cheap), and where there is none, every ``*.bin`` a pickle of tensors only
    (read with ``weights_only=True``, memory-mapped). ConfigError naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    names = sorted(n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n)))
    safetensors = [n for n in names if n.endswith(".safetensors")]
    for name in safetensors:
        try:
            with safe_open(os.path.join(root, name), "pt"):
                pass
        except SafetensorError as e:
            raise ConfigError(f"model.hf.path={path!r}: {_truncated(os.path.join(root, name), e)}") from None
    if safetensors:
        return  # what transformers loads where both are present
    for name in (n for n in names if n.endswith(".bin")):
        try:
            torch.load(os.path.join(root, name), map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as e:
            raise ConfigError(_pickle_message(path, os.path.join(root, name), e)) from None
        except RuntimeError as e:
            if "mmap" in str(e):
                continue  # a legacy (not zip) file cannot be memory-mapped: checked as it loads
            raise ConfigError(
                f"model.hf.path={path!r}: {os.path.join(root, name)} is not a complete PyTorch file "
                f"({str(e).split('. ')[0]}): it is truncated or damaged; download or copy it again"
            ) from None


def _truncated(file: str, e: Exception) -> str:
    """What to say of a safetensors file that does not open (``e``: safetensors' error)."""
    if os.path.isdir(file):  # transformers' error names no file: the directory's safetensors
        file = os.path.join(file, "model.safetensors")
    reason = str(e).removeprefix("Error while deserializing header: ")
    return (
        f"{file} is not a complete safetensors file ({reason}): it is truncated or damaged (an "
        "interrupted download or copy?); download or copy it again"
    )


def _pickle_message(path: str, file: str, e: Exception) -> str:
    """What to say of a ``.bin`` that ``torch.load(weights_only=True)`` refused (``e``): the
    globals it names, and not torch's advice to retry with weights_only=False."""
    if os.path.isdir(file):
        file = os.path.join(file, "pytorch_model.bin")
    names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
    holds = f" (it names {', '.join(names)})" if names else ""
    return (
        f"model.hf.path={path!r}: {file} is a pickle holding more than tensors{holds}: rnnpipe "
        "loads weights only (safetensors, or a .bin of plain tensors) and never runs a pickle's "
        "code; use the model's model.safetensors, or convert this file to safetensors only where "
        "running its code is safe"
    )


def _backbone_of_export(hf: HFBackboneConfig, vocab_size: int, overrides: dict[str, Any]) -> nn.Module:
    """The backbone inside an rnnpipe export of a huggingface-kind model: its recorded config,
    and (init=pretrained) its ``backbone.*`` weights; the export's recurrence stays behind."""
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
    state = read_safetensors(str(Path(hf.path) / "model.safetensors"))
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
        if hf.init != "random":
            try:
                check_safetensors(str(Path(hf.path) / "model.safetensors"), "export it again")
            except PipelineError as e:
                raise ConfigError(f"model.hf.path={hf.path!r}: {e}") from None
    elif hf.init == "random":
        if hf.path:
            check_no_code(hf.path, local_path(hf))
        return  # sized for the dataset, built fresh: the rank's own checks suffice
    else:
        root = local_path(hf)
        check_no_code(hf.path, root)
        check_weight_files(hf.path, root)
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


def check_safetensors(file: str, todo: str) -> None:
    """PipelineError naming ``file`` and what to do (``todo``: "export it again") unless it is a
    complete safetensors file: its header read and checked against its size, no tensor loaded."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, "pt"):
            pass
    except FileNotFoundError:
        raise PipelineError(f"{file}: no such file: {todo}") from None
    except (SafetensorError, OSError) as e:
        reason = str(e).removeprefix("Error while deserializing header: ")
        raise PipelineError(
            f"{file} is not a complete safetensors file ({reason}): it is truncated or damaged; {todo}"
        ) from None


def read_safetensors(file: str, todo: str = "export it again") -> dict[str, torch.Tensor]:
    """The tensors of the safetensors ``file`` (on the CPU); a file that is missing, truncated or
    damaged is a PipelineError naming it and what to do (``todo``), not safetensors' own error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(file, todo)
    try:
        return load_file(file, device="cpu")
    except (SafetensorError, OSError) as e:  # changed since the check
        raise PipelineError(f"{file} cannot be read ({e}): {todo}") from None


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
