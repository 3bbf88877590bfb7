"""Elastic resume: continue a checkpoint on another number of ranks.

Two halves, both used only when the checkpoint's world size differs from this run's:

- **The weights and the optimizer.** ZeRO-1/2/3 partition the fp32 master weights and Adam's
  moments across ranks, so DeepSpeed refuses a ZeRO checkpoint of another data-parallel size. The
  checkpoint is converted once into DeepSpeed's *universal* layout (``ds_to_universal``: one
  directory per parameter holding its full fp32 value, ``exp_avg``, ``exp_avg_sq`` and step), which
  any world size loads with ``checkpoint.load_universal: true`` in the DeepSpeed config. ZeRO-0
  needs no conversion: its ``mp_rank_00_model_states.pt`` holds the whole optimizer state (torch's
  AdamW in fp32, the fp32 master groups of ``FP16_UnfusedOptimizer`` in bf16), and a plain
  ``engine.load_checkpoint`` loads it on any world size. It must *not* be loaded with
  ``load_universal`` (DeepSpeed skips the module's weights on that path, then fails with
  "'AdamW' object has no attribute 'update_lp_params'").
- **The data position and the per-rank train state** (:mod:`rnnpipe.pipeline.train.remap`): the streams and
  hidden states move to their new ranks exactly when world × batch is unchanged (stream mode);
  otherwise the streams are re-cut at the same fraction of the epoch and the hidden state reset.

The sequence, on every rank (``check_resume`` first: nothing is read before it passes)::

    plan = elastic.plan(ckpt, saved_world, world, zero_stage, rank)   # rank 0 converts, all wait
    ds_cfg = merge(deepspeed_config(cfg), plan.overrides)             # before deepspeed.initialize
    engine = deepspeed.initialize(..., config=ds_cfg)
    client = elastic.load_engine(engine, plan)                        # load + repair DeepSpeed's state
    mine, message = elastic.resume_state(ckpt, saved_world, saved_batch, rank, loader, kinds)

Verified against DeepSpeed 0.19.8 on CPU (gloo, ``torch_adam``, two param groups, WarmupCosineLR,
whose state dict rnnpipe's client scheduler, :class:`rnnpipe.pipeline.engine.schedule.StepScheduler`, keeps):
after 2 → 1 rank (ZeRO-0/1/2/3, fp32 and bf16) and 1 → 2 (ZeRO-0/2/3, fp32), the fp32 weights,
both Adam moments, the step counts and the scheduler position are bit-identical to the saved ones
(ZeRO-3 after :func:`repair_after_universal_load`). The steps after that are not bit-identical to
an uninterrupted run: the gradient of one rank's mean over 2B streams and the average of two
ranks' means over B are summed in another order (fp32: ~6e-8 in the weights after two steps).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnpipe.pipeline.errors import PipelineError

# The train-state half (pipeline.train.remap), re-exported: the loop imports one module.
from rnnpipe.pipeline.train.remap import (
    epoch_steps,
    remap_states,
    resume_state,
    stream_steps_per_epoch,
)

log = logging.getLogger("rnnpipe.train")

UNIVERSAL = "universal"  # the converted checkpoint: <checkpoint>/universal/
DONE = "CONVERTED"  # written inside it, last, before the rename that makes it visible
_PARTIAL = ".universal.partial"  # the conversion's working name: <checkpoint>/.universal.partial-<pid>

# ------------------------------------------------------------------------------ weights, optimizer


def deepspeed_overrides() -> dict[str, Any]:
    """The DeepSpeed config fragment that makes ``engine.load_checkpoint`` read a universal
    checkpoint. It only changes how checkpoints are *loaded* (DeepSpeed reads the flag nowhere
    else), and what the run saves afterwards is an ordinary ZeRO checkpoint of the new world size."""
    return {"checkpoint": {"load_universal": True}}


def needs_conversion(ckpt: Path, zero_stage: int) -> bool:
    """Whether resuming ``ckpt`` on another world size needs the universal conversion: ZeRO-1/2/3
    (the optimizer state is partitioned into ``*_optim_states.pt``, one per saved rank), not ZeRO-0
    (one ``mp_rank_00_model_states.pt`` holds it all)."""
    has_partitions = any(Path(ckpt).glob("*_optim_states.pt"))
    if zero_stage == 0 and has_partitions:  # the header's config and the files disagree
        raise PipelineError(f"{ckpt}: the config says ZeRO-0 but the checkpoint holds ZeRO partitions")
    if zero_stage > 0 and not has_partitions:
        raise PipelineError(
            f"{ckpt}: no *_optim_states.pt files for ZeRO-{zero_stage}: not a complete checkpoint"
        )
    return zero_stage > 0


def is_converted(ckpt: Path) -> bool:
    """Whether ``ckpt/universal/`` holds a finished conversion, every file it wrote still there
    at the size it had (a conversion from before this record counts as unfinished: it is redone)."""
    return (Path(ckpt) / UNIVERSAL / DONE).exists() and universal_problem(ckpt) is None


def universal_problem(ckpt: Path) -> str | None:
    """What is wrong with ``ckpt/universal/``'s files against the list its ``CONVERTED`` marker
    records (relative path → bytes), or None when every one is there at its size. One ``stat``
    per file: a deleted or truncated file is caught before DeepSpeed reads it."""
    out = Path(ckpt) / UNIVERSAL
    try:
        files = json.loads((out / DONE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{out / DONE}: missing, unreadable or without the list of files"
    for rel, size in sorted(files.items()):
        try:
            got = (out / rel).stat().st_size
        except OSError:
            return f"{out / rel}: missing"
        if got != size:
            return f"{out / rel}: {got} bytes, the conversion wrote {size}"
    return None


def to_universal(ckpt: Path, workers: int = 1) -> tuple[str, str]:
    """Convert the ZeRO checkpoint ``ckpt`` (a ``step*/`` directory) into ``ckpt/universal/`` once;
    returns ``(load_dir, tag)`` for ``engine.load_checkpoint(load_dir, tag=tag)``.

    One process only (rank 0; see :func:`plan`). The conversion writes under a temporary name and
    renames it when complete, so a kill leaves at worst a ``.universal.partial-*`` directory, which
    the next call removes; a ``universal/`` directory always holds a finished conversion. Takes
    about 0.1–0.7 s for a tiny model on CPU, plus ~1.3 s to import the converter the first time.
    ``workers`` > 1 lets the converter use a process pool (large models); 1 keeps it in-process.
    """
    ckpt = Path(ckpt)
    out = ckpt / UNIVERSAL
    if is_converted(ckpt):
        return str(ckpt), UNIVERSAL
    for stale in ckpt.glob(_PARTIAL + "-*"):  # a conversion killed earlier
        shutil.rmtree(stale, ignore_errors=True)
    if out.exists():  # unfinished (we rename only after writing DONE) or damaged since: converted again
        if (out / DONE).exists():
            log.warning("%s; converting %s again", universal_problem(ckpt), ckpt)
        shutil.rmtree(out)
    work = ckpt / f"{_PARTIAL}-{os.getpid()}"
    from deepspeed import __version__ as ds_version
    from deepspeed.checkpoint import ds_to_universal

    args = _converter_args(ckpt, work, workers)
    t0 = time.time()
    captured = io.StringIO()
    try:
        # The converter prints its progress (and tqdm bars) on stdout/stderr: kept out of the log.
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            ds_to_universal.main(args)
    except BaseException as e:
        shutil.rmtree(work, ignore_errors=True)
        tail = "\n".join(captured.getvalue().strip().splitlines()[-5:])
        raise PipelineError(
            f"{ckpt}: converting to DeepSpeed's universal checkpoint failed ({type(e).__name__}: {e})"
            + (f"; the converter said:\n{tail}" if tail else "")
        ) from e
    files = {str(f.relative_to(work)): f.stat().st_size for f in sorted(work.rglob("*")) if f.is_file()}
    record = {
        "from": ckpt.name,
        "deepspeed": ds_version,
        "seconds": round(time.time() - t0, 3),
        "files": files,
    }
    (work / DONE).write_text(json.dumps(record) + "\n")
    os.replace(work, out)
    # ds_to_universal also wrote <ckpt>/latest_universal naming its output folder (the partial
    # name): point it at the final one, in case anything loads without an explicit tag.
    _write_atomic(ckpt / "latest_universal", UNIVERSAL)
    log.info("converted %s to DeepSpeed's universal checkpoint in %.1f s", ckpt, time.time() - t0)
    return str(ckpt), UNIVERSAL


def _converter_args(ckpt: Path, out: Path, workers: int) -> Any:
    import argparse

    return argparse.Namespace(
        input_folder=str(ckpt),
        output_folder=str(out),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        # A plain (non-Megatron) model records no universal_checkpoint_info; without this the
        # converter stops with "Required universal_checkpoint_info state is missing".
        inject_missing_state=True,
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Plan:
    """How to load a checkpoint on this run's world size: ``engine.load_checkpoint(load_dir,
    tag=tag)`` with ``overrides`` merged into the DeepSpeed config before ``deepspeed.initialize``."""

    load_dir: str
    tag: str
    universal: bool  # load through DeepSpeed's universal checkpoint (then repair, see load_engine)
    saved_world: int
    world: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def elastic(self) -> bool:
        return self.saved_world != self.world


def plan(ckpt: Path, saved_world: int, world: int, zero_stage: int, rank: int) -> Plan:
    """Every rank, after :func:`rnnpipe.pipeline.train.checkpoint.check_resume` and before
    ``deepspeed.initialize`` (the process group already exists): decide how to load ``ckpt``; when
    the world size changed under ZeRO-1/2/3, rank 0 converts it (once; later resumes reuse the
    conversion) while the others wait at a barrier. A failed conversion raises on rank 0; the
    others then fail in the barrier's broadcast of the outcome, so nothing hangs."""
    ckpt = Path(ckpt)
    same = Plan(str(ckpt.parent), ckpt.name, False, saved_world, world)
    if saved_world == world or not needs_conversion(ckpt, zero_stage):
        return same
    error = ""
    if rank == 0:
        # In this process (no pool: nothing of it may outlive a killed rank). The other ranks wait
        # meanwhile, within the process group's timeout (distributed.timeout_min, 30 by default).
        try:
            to_universal(ckpt)
        except Exception as e:  # told to the other ranks, which would otherwise wait forever
            error = str(e) if isinstance(e, PipelineError) else f"{type(e).__name__}: {e}"
    error = _broadcast_text(error)
    if error:
        raise PipelineError(error if rank == 0 else f"rank 0 could not convert {ckpt}: {error}")
    return Plan(str(ckpt), UNIVERSAL, True, saved_world, world, deepspeed_overrides())


def _broadcast_text(text: str) -> str:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return text
    box = [text]
    dist.broadcast_object_list(box, src=0)  # also the barrier: every rank waits for rank 0's result
    return box[0]


def optimizer_hparams(engine: Any) -> list[dict[str, Any]]:
    """Each param group's hyper-parameters (all but ``params``), to give back after a universal
    load (see :func:`repair_after_universal_load`)."""
    base = _base_optimizer(engine)
    return [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]


def repair_after_universal_load(engine: Any, before: list[dict[str, Any]]) -> list[str]:
    """Undo two things DeepSpeed 0.19.8's ZeRO-3 universal loader gets wrong; returns what it fixed.

    - It copies param group 0's hyper-parameters onto every group: the no-decay group (biases,
      norms, embeddings) gets weight decay. Each group gets back its own values from before the
      load, except ``lr`` (the scheduler's; equal in every group). The rest cannot legitimately
      differ from the checkpoint's: a resume refuses any change of betas, eps or weight decay.
    - It stores one ``step`` tensor object in every group's state, and torch's AdamW increments it
      in place once per group: the step count (so the bias correction) runs ahead after the first
      step. Each state gets its own copy.

    Harmless for ZeRO-1/2 (the values are already right). Without it a ZeRO-3 run diverged by
    3e-3 in the weights after two steps; with it, it continues bit for bit at the same world size.
    """
    base = _base_optimizer(engine)
    fixed = []
    for i, (group, was) in enumerate(zip(base.param_groups, before, strict=True)):
        for key, value in was.items():
            if key != "lr" and group.get(key) != value:
                fixed.append(f"param group {i}: {key} {group.get(key)!r} → {value!r}")
                group[key] = value
    seen: set[int] = set()
    for st in base.state.values():
        step = st.get("step")
        if step is not None and hasattr(step, "clone"):
            if id(step) in seen:
                st["step"] = step.clone()
                fixed.append("a shared step tensor")
            seen.add(id(st["step"]))
    return fixed


def load_engine(engine: Any, p: Plan) -> dict[str, Any]:
    """Load the weights, optimizer and scheduler as ``p`` says (every rank, a collective); returns
    DeepSpeed's client state (``{"step": ...}`` as rnnpipe saved it). The scheduler keeps only its
    position; the rate is then set from the schedule at that position (the optimizer state brought
    back the rate it was saved with, which differs when the resume changed the schedule)."""
    before = optimizer_hparams(engine) if p.universal else []
    where = Path(p.load_dir) / p.tag
    if p.universal:
        todo = f"remove {where} and run the same command again: it is converted again from {p.load_dir}"
    else:
        todo = "resume from an earlier checkpoint (train.resume=PATH), or remove this one"
    try:
        _, client = engine.load_checkpoint(p.load_dir, tag=p.tag)
    except Exception as e:  # DeepSpeed's own errors name no file: say which checkpoint, and the way out
        raise PipelineError(f"{where}: DeepSpeed could not load it ({type(e).__name__}: {e}); {todo}") from e
    if client is None:
        raise PipelineError(f"DeepSpeed could not load {where}: {todo}")
    if p.universal:
        fixed = repair_after_universal_load(engine, before)
        if fixed:
            log.debug("after the universal load: %s", "; ".join(dict.fromkeys(fixed)))
    if hasattr(engine.lr_scheduler, "apply"):  # (pipeline.engine.schedule.StepScheduler)
        engine.lr_scheduler.apply()
    return client


def _base_optimizer(engine: Any) -> Any:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)  # ZeRO, bf16 and fp16 wrappers keep torch's inside


__all__ = [
    "Plan",
    "deepspeed_overrides",
    "epoch_steps",
    "is_converted",
    "load_engine",
    "needs_conversion",
    "plan",
    "remap_states",
    "resume_state",
    "stream_steps_per_epoch",
    "to_universal",
]
