"""The train state: everything besides the weights and the optimizer that a run needs to continue
exactly where it stopped, as one object (lingua's ``TrainState``).

    state = TrainState(loader=batches)
    ...                                   # the loop updates state.step, state.hidden, ...
    blob = state.state_dict()             # saved with the checkpoint (plain values and tensors)
    state.load_state_dict(blob, device)   # on resume: counters, hidden state, data position, RNG

The pretrain loop keeps one per rank; the fine-tune job extends it with its own counters
(:class:`FinetuneState`). :func:`rnnpipe.pipeline.train.checkpoint.save_state` writes a state dict so that
``torch.load(..., weights_only=True)`` reads it back: no pickled objects, only numbers, strings,
lists, dicts and tensors.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every random generator this process draws from, as plain values and tensors: on a GPU, the
    generator of this rank's own device only (not every visible device's: a resume under another
    GPU binding, one GPU per task, sees fewer devices than were saved)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if isinstance(saved, (list, tuple)):  # written before: every visible device's generator
            device = torch.cuda.current_device()
            saved = saved[device] if device < len(saved) else saved[0]
        torch.cuda.set_rng_state(saved, torch.cuda.current_device())


def to_device(value: Any, device: torch.device | str) -> Any:
    """A tensor, or nested lists/tuples of tensors (a model's state), moved to ``device``."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


@dataclass
class TrainState:
    """The counters, loss window, recurrent state, data position and RNG of one rank's run."""

    step: int = 0  # optimizer steps done
    micro_index: int = 0  # micro-batches drawn (grad_accum of them per step)
    tokens_seen: int = 0  # target tokens trained on, summed over ranks
    nonfinite_total: int = 0  # micro-batches skipped for a non-finite loss
    loss_window: list[float] = field(default_factory=lambda: [0.0, 0])  # (sum, count) since the last log
    # Divergence watch: the loss's running mean and variance over steps (and how many steps they
    # cover), and the first step of the current loss spike (None: no spike now).
    loss_stats: list[float] = field(default_factory=lambda: [0.0, 0.0, 0])
    diverging_since: int | None = None
    hidden: Any = None  # this rank's recurrent state, carried between segments (stream mode)
    loader: Any = None  # the data position: an object with state_dict()/load_state_dict()

    def state_dict(self) -> dict[str, Any]:
        """Plain values and CPU tensors, with the RNG states as they are now."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "loader":
                value = value.state_dict() if value is not None else None
            elif f.name == "hidden":
                value = to_device(value, "cpu")
            out[f.name] = value
        out["rng"] = rng_state()
        return out

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        """Continue from ``state``: the loader and the RNGs are restored too."""
        for f in dataclasses.fields(self):
            if f.name not in state:
                continue
            value = state[f.name]
            if f.name == "loader":
                if self.loader is not None and value is not None:
                    self.loader.load_state_dict(value)
                continue
            if f.name == "hidden":
                value = to_device(value, device)
            elif f.name in ("loss_window", "loss_stats"):
                value = list(value)
            setattr(self, f.name, value)
        set_rng_state(state["rng"])


@dataclass
class FinetuneState(TrainState):
    """A fine-tune job's state: the train state plus the epoch position and early stopping."""

    epoch: int = 0
    pos: int = 0  # batches of the epoch's order done
    best: float | None = None  # the best dev metric so far
    best_step: int = 0
    bad: int = 0  # evaluations in a row without a better dev metric
    done: bool = False  # stopped early
    wall: float = 0.0  # seconds trained, over every attempt
