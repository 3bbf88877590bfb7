"""Elastic resume, the train-state half: every old rank's TrainState re-mapped onto a new world
size (:mod:`rnnpipe.pipeline.train.elastic` converts and loads the weights and optimizer).

In stream mode with world × batch unchanged, the streams keep their global order: their hidden
states are concatenated over the old ranks along each mixer's batch dimensions (its class's
``state_batch_dims``: ``Mixer.join_states`` and ``split_state``) and split for the new ones, and
the data position is unchanged. Otherwise the split is re-cut at the same fraction
of the epoch and the hidden state reset; in shuffle mode the epoch continues at the same
fraction. Counters come from old rank 0; each new rank takes the RNG of the old rank of its
number, or a fresh seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rnnpipe.pipeline.errors import PipelineError


def stream_steps_per_epoch(pairs: int, streams: int, seq_len: int) -> int:
    """Steps in a stream-mode epoch of ``pairs`` (input, target) pairs cut into ``streams`` streams,
    as :class:`rnnpipe.pipeline.train.data.StreamBatches` counts them: the longest stream over seq_len."""
    from rnnpipe.pipeline.train.data import stream_bounds

    return math.ceil(int(np.diff(stream_bounds(pairs, streams)).max()) / seq_len)


def epoch_steps(loader_state: dict[str, Any], reader: Any, seq_len: int, batch: int) -> int:
    """Steps in the current epoch of the loader that saved ``loader_state`` (its own world size,
    streams, workers and seed); ``batch`` is its data.batch_size (streams or windows per rank)."""
    if loader_state["mode"] == "stream":
        return stream_steps_per_epoch(reader.tokens - 1, loader_state["streams"], seq_len)
    from rnnpipe.pipeline.train.data import ShuffleBatches

    old = ShuffleBatches(
        reader, 0, loader_state["world"], batch, seq_len, loader_state["seed"], loader_state["workers"]
    )
    return old.steps_per_epoch(loader_state["epoch"])


def remap_states(
    old: Sequence[dict[str, Any]],
    old_world: int,
    new_world: int,
    new_batch: int,
    *,
    old_steps_per_epoch: int | None = None,
    new_steps_per_epoch: int | None = None,
    layer_kinds: Sequence[str] | None = None,
    new_workers: int | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Every new rank's train state from every old rank's, and a message for the log.

    ``old[r]`` is old rank r's :meth:`TrainState.state_dict` (``rank{r:05d}.pt``). Counters
    (step, micro_index, tokens_seen, nonfinite_total) and the loss window come from old rank 0
    (they agree on every rank but the loss window, which is rank 0's and what it logs).

    Stream mode, ``old_world × old_batch == new_world × new_batch`` ("the same streams"): the
    streams keep their global index (rank r owns streams [r·batch, (r+1)·batch)) and their bounds,
    so each layer's state is concatenated over the old ranks along its batch dimensions (as the
    class of its mixer lays them out: ``layer_kinds`` names each layer's, e.g. ``"lrn"``; without
    it a state whose first tensor is 3-d is taken as [1, B, D], torch's LSTM and GRU, and anything
    else as batch-first) and split into the new ranks' ``new_batch`` rows. The position (epoch,
    step_in_epoch) is unchanged. Exact.

    Stream mode, another number of streams ("re-cut"): the epoch is kept, and the new epoch starts
    at step ``⌊k · P_new / P_old⌋``, where k is the old step_in_epoch and P the steps per epoch
    (``old_steps_per_epoch``, ``new_steps_per_epoch``, see :func:`epoch_steps`): the last new step
    whose fraction of the new epoch, k' / P_new, does not exceed the fraction of the old epoch
    consumed, k / P_old. The stream boundaries move, so up to one new step's worth of each
    stream is read again and the state of the old streams belongs to other positions: the
    hidden state is reset (None: the zero state).

    Shuffle mode: the epoch and the fraction consumed are kept the same way (``consumed`` →
    ``⌊consumed · P_new / P_old⌋``); the shards are dealt to new_world × workers slots, so the
    window order of the rest of the epoch differs from an uninterrupted run.

    RNG: new rank r takes old rank r's RNG state; a rank the old run did not have draws a fresh
    one seeded from (step, rank) (not old rank 0's: two ranks would draw the same dropout masks).
    Either way the dropout streams differ from an uninterrupted run once the world size changed.
    """
    if len(old) != old_world or old_world < 1 or new_world < 1 or new_batch < 1:
        raise ValueError(
            f"remap_states: {len(old)} old state(s) for old_world={old_world}, new_world={new_world}"
        )
    first = old[0]
    pos = first.get("loader") or {}
    mode = pos.get("mode")
    for r, s in enumerate(old):
        if (s.get("loader") or {}).get("mode") != mode:
            raise PipelineError(f"old rank {r}'s data position is for another data.mode than rank 0's")
        for key in ("step", "micro_index", "tokens_seen", "nonfinite_total"):
            if s.get(key) != first.get(key):
                raise PipelineError(f"old rank {r} is at {key}={s.get(key)}, rank 0 at {first.get(key)}")

    notes: list[str] = []
    hidden: list[Any] = [None] * new_world
    loader: dict[str, Any] | None = None
    if mode == "stream":
        for r, s in enumerate(old):
            if (s["loader"]["epoch"], s["loader"]["step_in_epoch"]) != (pos["epoch"], pos["step_in_epoch"]):
                raise PipelineError(f"old rank {r} is at another data position than rank 0")
        old_streams = int(pos["streams"])
        old_batch = old_streams // old_world
        new_streams = new_world * new_batch
        was = f"{old_world} rank(s) × {old_batch} stream(s) → {new_world} rank(s) × {new_batch} stream(s)"
        if new_streams == old_streams:
            loader = {**pos, "world": new_world, "streams": new_streams}
            hidden = _split_hidden(
                [s.get("hidden") for s in old], old_batch, new_world, new_batch, layer_kinds
            )
            moved = (
                "their hidden states moved to their new ranks"
                if hidden[0] is not None
                else "no hidden state yet"
            )
            notes.append(
                f"elastic resume, {was}: the same {new_streams} streams, {moved}; the data position "
                f"(epoch {pos['epoch']}, step {pos['step_in_epoch']} of the epoch) is unchanged"
            )
        else:
            k, was_total, now_total = _fraction_step(
                pos["step_in_epoch"], old_steps_per_epoch, new_steps_per_epoch
            )
            loader = {**pos, "world": new_world, "streams": new_streams, "step_in_epoch": k}
            notes.append(
                f"elastic resume, {was}: the training split is re-cut into {new_streams} streams at the "
                f"same fraction of epoch {pos['epoch']} (step {pos['step_in_epoch']} of {was_total} → "
                f"step {k} of {now_total}); the hidden state is reset to zero"
            )
    elif mode == "shuffle":
        k, was_total, now_total = _fraction_step(pos["consumed"], old_steps_per_epoch, new_steps_per_epoch)
        workers = pos["workers"] if new_workers is None else max(1, new_workers)
        loader = {**pos, "world": new_world, "workers": workers, "consumed": k}
        notes.append(
            f"elastic resume, {old_world} → {new_world} rank(s) × {workers} worker(s): epoch "
            f"{pos['epoch']} continues at the same fraction (batch {pos['consumed']} of {was_total} → "
            f"{k} of {now_total}); its shards are dealt to the new ranks, so the window order of the "
            "rest of the epoch differs from an uninterrupted run"
        )
    elif mode is not None:
        raise PipelineError(f"elastic resume: unknown data position mode {mode!r}")

    rngs, rng_note = _remap_rng([s.get("rng") for s in old], old_world, new_world, int(first.get("step", 0)))
    if rng_note:
        notes.append(rng_note)
    out = []
    for r in range(new_world):
        state = {k: v for k, v in first.items() if k not in ("hidden", "loader", "rng")}
        state["loss_window"] = list(first.get("loss_window", [0.0, 0]))
        state["hidden"] = hidden[r]
        state["loader"] = None if loader is None else dict(loader)
        state["rng"] = rngs[r]
        out.append(state)
    return out, "; ".join(notes)


def _fraction_step(k: int, old_total: int | None, new_total: int | None) -> tuple[int, int, int]:
    """⌊k · new_total / old_total⌋ (and both totals): the same fraction of an epoch, never beyond."""
    if not old_total or not new_total:
        raise ValueError("re-cutting the data position needs old_steps_per_epoch and new_steps_per_epoch")
    if not 0 <= k < old_total:
        raise PipelineError(f"the checkpoint's data position {k} is outside its epoch of {old_total} steps")
    return k * new_total // old_total, old_total, new_total


def _split_hidden(
    per_rank: list[Any], old_batch: int, new_world: int, new_batch: int, kinds: Sequence[str] | None
) -> list[Any]:
    """Old ranks' hidden states (each a list over layers) → new ranks', streams in global order."""
    if all(h is None for h in per_rank):
        return [None] * new_world
    if any(h is None for h in per_rank):
        # Every rank resets at the same micro-step (epoch starts, non-finite losses): a mix means
        # the files are not one checkpoint's.
        raise PipelineError("some old ranks have a hidden state and others none: inconsistent checkpoint")
    layers = len(per_rank[0])
    if any(len(h) != layers for h in per_rank) or (kinds is not None and len(kinds) != layers):
        raise PipelineError("the old ranks' hidden states have different numbers of layers")
    new: list[list[Any]] = [[] for _ in range(new_world)]
    for layer in range(layers):
        kind = None if kinds is None else str(kinds[layer])
        parts = _split_layer(
            [h[layer] for h in per_rank], old_batch, new_world, new_batch, kind, f"layer {layer}"
        )
        for r in range(new_world):
            new[r].append(parts[r])
    return new


def _split_layer(
    values: list[Any], old_batch: int, new_world: int, new_batch: int, kind: str | None, where: str
) -> list[Any]:
    """One layer's state (a tensor, a tuple of them, or None) over the old ranks → new ranks',
    laid out as the class of mixer ``kind`` declares (``Mixer.state_batch_dims``)."""
    import torch

    from rnnpipe.pipeline.models.mixers import state_layout

    if values[0] is None:
        if any(v is not None for v in values):
            raise PipelineError(f"{where}: some old ranks have a state and others none")
        return [None] * new_world
    for r, v in enumerate(values):
        tensors = [v] if isinstance(v, torch.Tensor) else v
        if not isinstance(tensors, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise PipelineError(
                f"{where}: old rank {r}'s hidden state holds a {type(v).__name__}, not tensors"
            )
    first = values[0] if isinstance(values[0], torch.Tensor) else values[0][0]
    # Without the kinds (a checkpoint's states alone), torch's LSTM/GRU are the 3-d ones.
    layout = state_layout(kind if kind is not None else "gru" if first.dim() == 3 else None)

    def rows(t: torch.Tensor, dim: int, r: int) -> torch.Tensor:
        if t.dim() <= dim or t.shape[dim] != old_batch:
            raise PipelineError(
                f"{where}: old rank {r}'s state has shape {tuple(t.shape)}, expected {old_batch} "
                f"streams in dim {dim}"
            )
        return t

    for r, v in enumerate(values):
        layout.map_state(v, lambda t, dim, r=r: rows(t, dim, r))
    try:  # streams in global order: old rank r's are r·batch ... (r+1)·batch − 1
        return layout.split_state(layout.join_states(values), new_world)  # new_batch rows each
    except (ValueError, RuntimeError) as e:  # (torch.cat's RuntimeError: other sizes than the batch's)
        raise PipelineError(f"{where}: the old ranks' states: {e}") from e


def _remap_rng(old: list[Any], old_world: int, new_world: int, step: int) -> tuple[list[Any], str]:
    """New rank r: old rank r's RNG state, or a fresh one (seeded by step and rank) beyond them."""
    out = [old[r] if r < old_world else _fresh_rng(step, r) for r in range(new_world)]
    if new_world > old_world:
        note = (
            f"new {_ranks(old_world, new_world)} draw fresh random streams (the others keep "
            "theirs): dropout masks differ from an uninterrupted run"
        )
    elif new_world < old_world:
        note = (
            f"the random streams of old {_ranks(new_world, old_world)} are dropped: dropout masks differ "
            "from an uninterrupted run"
        )
    else:
        note = ""
    return out, note


def _ranks(a: int, b: int) -> str:
    """Ranks [a, b) in words: "rank 2", "ranks 2–5"."""
    return f"rank {a}" if b - a == 1 else f"ranks {a}–{b - 1}"


def _fresh_rng(step: int, rank: int) -> dict[str, Any]:
    """An RNG state in :func:`rnnpipe.pipeline.engine.state.rng_state`'s format, without touching this
    process's generators. No ``cuda`` entry: the loop seeds the device generators per rank itself,
    and :func:`~rnnpipe.pipeline.engine.state.set_rng_state` leaves them as they are when it is absent."""
    import torch

    seed = int(np.random.SeedSequence([step, rank, 0x5EED]).generate_state(1)[0])
    kind, keys, pos, has_gauss, cached = np.random.RandomState(seed).get_state()
    return {
        "python": random.Random(seed).getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.Generator().manual_seed(seed).get_state(),
    }


def resume_state(
    ckpt: Path,
    saved_world: int,
    saved_batch: int,
    rank: int,
    loader: Any,
    layer_kinds: Sequence[str] | None = None,
) -> tuple[dict[str, Any], str]:
    """This rank's train state after a world-size change, for ``state.load_state_dict``: reads
    every old rank's ``rank{r:05d}.pt`` (``weights_only``) and :func:`remap_states` them onto
    ``loader`` (this run's :class:`~rnnpipe.pipeline.train.data.StreamBatches` or ``ShuffleBatches``: its
    world, batch, seq_len, reader and workers are the new ones). ``saved_batch`` is the
    checkpoint's data.batch_size (its header's config). Returns (the state dict, the message for
    the log). Each rank reads all the files: they are small (counters, RNG and each layer's state
    for its batch rows)."""
    from rnnpipe.pipeline.engine.statefile import load_state

    old = []
    for r in range(saved_world):
        path = Path(ckpt) / f"rank{r:05d}.pt"
        if not path.exists():
            raise PipelineError(f"{ckpt} was written by {saved_world} rank(s) but has no {path.name}")
        old.append(load_state(path))
    pos = old[0].get("loader") or {}
    shuffle = pos.get("mode") == "shuffle"
    old_steps = new_steps = None
    if shuffle or pos.get("streams") != loader.world * loader.batch:  # a re-cut: both epoch lengths
        old_steps = epoch_steps(pos, loader.reader, loader.seq_len, saved_batch)
        new_steps = loader.steps_per_epoch(pos["epoch"]) if shuffle else loader.steps_per_epoch
    states, message = remap_states(
        old,
        saved_world,
        loader.world,
        loader.batch,
        old_steps_per_epoch=old_steps,
        new_steps_per_epoch=new_steps,
        layer_kinds=layer_kinds,
        new_workers=loader.workers if shuffle else None,
    )
    return states[rank], message
