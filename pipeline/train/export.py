"""``rnnpipe export RUN_OR_CHECKPOINT OUT [--backward BWD]``: one fp32 safetensors file from any
ZeRO checkpoint; with ``--backward``, a backward LM's export (a ``data.direction=backward`` run, or
its export) beside it in ``OUT/backward/``: the two LMs of an ELMo pair in one directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.data.manifest import read_manifest
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.models.exported import BACKWARD, export_direction, export_meta, is_export
from rnnpipe.pipeline.models.pretrained import save_pretrained
from rnnpipe.pipeline.provenance import provenance
from rnnpipe.pipeline.train import checkpoint

log = logging.getLogger("rnnpipe")


@dataclass
class Consolidated:
    """A checkpoint's model in one piece: fp32 weights, the run's config, the tokenizer."""

    checkpoint: Path
    state: dict[str, torch.Tensor]  # a LanguageModel's state dict, fp32, on the CPU
    config: dict[str, Any]  # the run's PretrainConfig as plain values (from the checkpoint's marker)
    header: dict[str, Any]  # the checkpoint's COMPLETE marker
    tokenizer: dict[str, Any]  # the dataset manifest's tokenizer entry
    tokenizer_files: dict[str, bytes]  # relative path -> content
    corpus: dict[str, Any] | None = None  # the dataset's source: its kind and its input files' names


def consolidate(source: str | Path) -> Consolidated:
    """The weights of a complete checkpoint (a run dir means its latest), gathered from any ZeRO stage."""
    source = Path(source)
    ckpt = checkpoint.find_latest(source) if (source / "checkpoints").is_dir() else source
    if ckpt is None or not checkpoint.is_complete(ckpt):
        raise PipelineError(f"{source} is neither a run with a complete checkpoint nor a complete checkpoint")
    # ZeRO 0-2 write mp_rank_00_model_states.pt, ZeRO-3 one per rank; rank 0's holds the client state.
    candidates = [ckpt / "mp_rank_00_model_states.pt", ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    states = next((c for c in candidates if c.exists()), None)
    if states is None:
        raise PipelineError(f"{ckpt} has no model-states file: not a DeepSpeed checkpoint")
    header = checkpoint.read_header(ckpt)
    cfg = header.get("config")
    if cfg is None:
        raise PipelineError(f"{ckpt} was not written by this rnnpipe pretrain (no config in its marker)")
    # A checkpoint is code: DeepSpeed's files are pickles. Say where they come from before loading.
    log.info("loading checkpoint %s (pickled files: load only checkpoints you trust)", ckpt)
    if any(ckpt.glob("*zero_pp_rank_*_optim_states.pt")):  # ZeRO 1, 2, 3: gather the fp32 partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 prints its progress (stdout) and a progress bar (stderr): keep them off
        # rnnpipe's console unless asked (-v); a failure still raises, with its message
        with contextlib.ExitStack() as quiet:
            if not log.isEnabledFor(logging.DEBUG):
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # ZeRO 0: the module's weights are whole in the model-states file, read without unpickling code
        try:
            state = torch.load(states, map_location="cpu", weights_only=True)["module"]
        except Exception as e:  # the restricted unpickler refuses anything but tensors and plain values
            raise PipelineError(
                f"{states}: not loadable as plain tensors and values ({type(e).__name__}: {e}); "
                "rnnpipe does not unpickle it"
            ) from e
    manifest = read_manifest(cfg["data"]["path"])
    tokenizer = manifest["tokenizer"]
    files = {}
    if tokenizer.get("model_file"):
        root = fsio.absolute(cfg["data"]["path"])
        files[tokenizer["model_file"]] = fsio.read_bytes(fsio.join(root, tokenizer["model_file"]))
    state = {k: v.float() for k, v in state.items()}
    return Consolidated(ckpt, state, cfg, header, tokenizer, files, _corpus(manifest))


def _corpus(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the dataset was prepared from, by name: its source kind and its input files."""
    src = manifest.get("source") or {}
    names = [posixpath.basename(str(i.get("url", "")).rstrip("/")) for i in src.get("inputs") or []]
    return {"kind": src.get("kind"), "files": [n for n in names if n]}


# The figures of a run the export records (and its model card shows), at their latest step up to
# the exported one.
RUN_METRICS = ("train/tokens_seen", "valid/bpb", "test/bpb", "valid/loss", "test/loss")


def run_metrics(ckpt: Path, step: int) -> dict[str, dict[str, float]]:
    """``{tag: {"step", "value"}}`` from the run's ``metrics.jsonl`` (beside ``checkpoints/``) for
    :data:`RUN_METRICS`, each at its last step up to ``step``; ``{}`` when the run kept none."""
    file = ckpt.parent.parent / "metrics.jsonl"
    out: dict[str, dict[str, float]] = {}
    try:
        lines = file.read_text().splitlines() if ckpt.parent.name == "checkpoints" else []
    except OSError:
        return out
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written as we read
            continue
        at = record.get("step") if isinstance(record, dict) else None
        if not isinstance(at, int) or at > step:
            continue
        for tag in RUN_METRICS:
            if isinstance(record.get(tag), int | float) and at >= out.get(tag, {}).get("step", -1):
                out[tag] = {"step": at, "value": record[tag]}
    return out


def run_direction(cfg: dict[str, Any]) -> str:
    """A run's ``data.direction`` from its config (plain values): forward for a run from before it."""
    return str((cfg.get("data") or {}).get("direction") or "forward")


def _meta(c: Consolidated) -> dict[str, Any]:
    """What the weights were made from: the export's identity for the stages after it."""
    cfg, header = c.config, c.header
    return {
        "checkpoint": str(c.checkpoint),
        "step": header["step"],
        "data": cfg["data"]["path"],
        "direction": run_direction(cfg),  # which way the model reads text
        "dataset": header.get("dataset"),
        "fingerprint": header.get("fingerprint"),
        "train_steps": cfg["train"]["steps"],
        "world_size": header["world"],
        "provenance": header.get("provenance"),
        "exported_by": provenance(),
        "corpus": c.corpus,
        "metrics": run_metrics(c.checkpoint, header["step"]),
    }


def _write(c: Consolidated, out: Path) -> None:
    backbone = (c.header.get("hf_backbone") or {}).get("config")  # a huggingface-kind model's
    save_pretrained(out, c.state, c.config["model"], c.tokenizer, c.tokenizer_files, _meta(c), backbone)


TOKENIZER_KEYS = ("kind", "vocab_size", "model_sha256")  # what makes two tokenizers the same


def _backward_twin(backward: Path, forward: Consolidated, source: Path) -> Consolidated | Path:
    """The backward LM for ``--backward``: its run's consolidated checkpoint, or its export (a
    path); ConfigError naming it when it is not a backward LM, or not tokenized as ``forward``."""
    if is_export(backward):
        direction, tokenizer = export_direction(backward), export_meta(str(backward)).get("tokenizer") or {}
        twin: Consolidated | Path = backward
    else:
        try:
            c = consolidate(backward)
        except PipelineError as e:
            raise PipelineError(f"--backward {backward}: not an export, and {e}") from None
        direction, tokenizer, twin = run_direction(c.config), c.tokenizer, c
    if direction != BACKWARD:
        raise ConfigError(
            f"--backward {backward}: its model reads text {direction} (data.direction={direction}); "
            "it takes a run trained with data.direction=backward, or its export"
        )
    mine = [forward.tokenizer.get(k) for k in TOKENIZER_KEYS]
    theirs = [tokenizer.get(k) for k in TOKENIZER_KEYS]
    if mine != theirs:
        raise ConfigError(
            f"--backward {backward} is tokenized by {theirs[0]} (vocabulary {theirs[1]}, model file "
            f"sha256 {str(theirs[2])[:12]}), {source} by {mine[0]} (vocabulary {mine[1]}, "
            f"{str(mine[2])[:12]}): the two directions of a pair must share their tokenizer"
        )
    return twin


def export(source: str | Path, out: str | Path, backward: str | Path | None = None) -> Path:
    """Consolidate a checkpoint (a run dir means its latest) into ``out``; returns ``out``.

    ``backward``: a ``data.direction=backward`` run (its latest checkpoint) or checkpoint, or an
    export of one, written as a complete export into ``out/backward/`` (the forward export's own
    files are as without it); ``source`` must then be a forward run, and both share a tokenizer
    (ConfigError naming the path otherwise, before anything is written).

    Written beside ``out`` and renamed into place, so a killed export never leaves a directory
    that looks like a finished one; an earlier export in ``out`` is replaced (with its
    ``backward/``)."""
    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()) and not is_export(out):
        # (a Hugging Face model directory has a config.json too: it must be one of ours to be replaced)
        raise PipelineError(f"{out} holds files that are not an rnnpipe export: choose another directory")
    c = consolidate(source)
    twin = None
    if backward is not None:
        direction = run_direction(c.config)
        if direction != "forward":
            raise ConfigError(
                f"{source} is a data.direction={direction} run: with --backward, the first run is the "
                "forward LM (data.direction=forward) and the backward one comes after --backward"
            )
        twin = _backward_twin(Path(backward), c, source)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # per process: two may export at once
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(c, tmp)
        if isinstance(twin, Consolidated):
            _write(twin, tmp / BACKWARD)
        elif twin is not None:  # an export, copied as it is (copy2 keeps the mtime its sha256 is trusted by)
            shutil.copytree(twin, tmp / BACKWARD, ignore=shutil.ignore_patterns(BACKWARD))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("exported step %d of %s to %s (%d tensors)", c.header["step"], c.checkpoint, out, len(c.state))
    if twin is not None:
        log.info("and the backward LM %s to %s", backward, out / BACKWARD)
    return out
