"""``rnnpipe export RUN_OR_CHECKPOINT OUT``: one fp32 safetensors file from any ZeRO checkpoint."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import fsio
from pipeline.data.manifest import read_manifest
from pipeline.errors import PipelineError
from pipeline.models.exported import is_export
from pipeline.models.pretrained import save_pretrained
from pipeline.provenance import provenance
from pipeline.train import checkpoint

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
    return Consolidated(ckpt, state, cfg, header, tokenizer, files)


def export(source: str | Path, out: str | Path) -> Path:
    """Consolidate a checkpoint (a run dir means its latest) into ``out``; returns ``out``.

    Written beside ``out`` and renamed into place, so a killed export never leaves a directory
    that looks like a finished one; an earlier export in ``out`` is replaced."""
    source, out = Path(source), Path(out)
    if out.exists() and any(out.iterdir()) and not is_export(out):
        # (a Hugging Face model directory has a config.json too: it must be one of ours to be replaced)
        raise PipelineError(f"{out} holds files that are not an rnnpipe export: choose another directory")
    c = consolidate(source)
    cfg, header = c.config, c.header
    # What the weights were made from: the export's identity for the stages after it.
    meta = {
        "checkpoint": str(c.checkpoint),
        "step": header["step"],
        "data": cfg["data"]["path"],
        "dataset": header.get("dataset"),
        "fingerprint": header.get("fingerprint"),
        "train_steps": cfg["train"]["steps"],
        "world_size": header["world"],
        "provenance": header.get("provenance"),
        "exported_by": provenance(),
    }
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")  # per process: two may export at once
    shutil.rmtree(tmp, ignore_errors=True)
    backbone = (header.get("hf_backbone") or {}).get("config")  # a huggingface-kind model's
    save_pretrained(tmp, c.state, cfg["model"], c.tokenizer, c.tokenizer_files, meta, backbone)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("exported step %d of %s to %s (%d tensors)", header["step"], c.checkpoint, out, len(c.state))
    return out
