"""The learning rate as a pure function of the step (nanoGPT's ``get_lr``, lingua's ``lr_wsd``).

:class:`Schedule` gives the multiplier of the peak rate at each step, ``factor(step)``, and the rate
itself, ``at(step)``; nothing else is state. Pretrain hands DeepSpeed a :class:`StepScheduler` as
its *client* scheduler (``deepspeed.initialize(lr_scheduler=step_scheduler(schedule))``), whose
only state is its position: a checkpoint keeps the step, and a run resumed with another schedule
(``train.steps``, ``optim.lr``, ``optim.schedule``...) simply follows the new one from there.
Fine-tune wraps a factor in torch's ``LambdaLR`` (:func:`lambda_lr`).

The kinds (``optim.schedule``), each after a linear warm-up from 0 over ``warmup_steps``:

- ``cosine`` (the default): down to ``lr × min_ratio`` at the last step, along half a cosine;
- ``linear``: down to ``lr × min_ratio`` along a straight line;
- ``constant``: ``lr`` to the end;
- ``wsd`` (warm-up, stable, decay): ``lr`` until the last ``decay_fraction`` of the steps, then
  linearly down to ``lr × min_ratio`` (Hägele et al. 2024; MiniCPM's).

The step counting is DeepSpeed's ``WarmupCosineLR`` (as ``deepspeed_config`` configured it before
this module), kept so that every run's numbers are unchanged: ``step`` is the scheduler's position,
``last_batch_iteration`` (−1 before the first optimizer step, then one more after each step that
was not skipped), the rate of the next update is ``at(step)``, and the very first update runs at
rate 0 (the scheduler has not started: it only moves Adam's moments). A warm-up spans
``max(2, warmup_steps)`` positions and the decay starts one position before it ends; no warm-up
(``warmup_steps=0``) is a 2-position warm-up held at the peak.

A new kind: a name in :data:`SCHEDULES` and its branch in :meth:`Schedule.decay` (the factor after
the warm-up as a function of the progress through the decay); ``optim.schedule`` then accepts it
(``pipeline/train/config.py`` validates the name against :data:`SCHEDULES`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported where a scheduler is made, not here: the configs import this module (to
# validate optim.schedule), and a command that only reads configs (--dry-run, rnnpipe plan) must
# not pay a second for torch.

SCHEDULES = ("cosine", "linear", "constant", "wsd")


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule: ``at(step)`` is the rate at scheduler position ``step``.

    ``lr``: the peak rate (per unit of gradient, the optimizer's); ``total_steps``: optimizer steps
    in the run; ``warmup_steps``: steps of the linear warm-up (0 = none); ``min_ratio``: the end
    rate as a fraction of ``lr`` (cosine, linear, wsd); ``decay_fraction``: wsd's decay, as a
    fraction of ``total_steps``."""

    kind: str = "cosine"
    lr: float = 3e-4
    total_steps: int = 1000
    warmup_steps: int = 0
    min_ratio: float = 0.0
    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule kind must be {' or '.join(SCHEDULES)}, got {self.kind!r}")

    @property
    def warmup(self) -> int:
        """Positions of the warm-up: at least 2 (DeepSpeed's ``WarmupCosineLR`` rule)."""
        return max(2, self.warmup_steps)

    @property
    def decay_steps(self) -> int:
        """wsd: positions of the final decay (at least 1), ``round(decay_fraction × total_steps)``."""
        return max(1, round(self.decay_fraction * self.total_steps))

    def factor(self, step: int) -> float:
        """The rate at position ``step`` (≥ 0) as a fraction of ``lr`` (dimensionless, in [0, 1]).
        Computed as DeepSpeed's ``WarmupCosineLR.get_lr_ratio`` does, operation for operation."""
        w = self.warmup
        if step < w:
            start = 0.0 if self.warmup_steps else 1.0  # (no warm-up: held at the peak)
            ratio = step / w
            return start + ratio * (1.0 - start)
        if self.kind == "constant":
            return 1.0
        begin = w
        if self.kind == "wsd":
            begin = max(w, self.total_steps - self.decay_steps)
            if step < begin:
                return 1.0
        # (step - begin + 1): the decay's first position is already one step into it
        progress = min(1.0, (step - begin + 1) / max(1, self.total_steps - begin))
        return self.decay(progress)

    def decay(self, progress: float) -> float:
        """The factor after the warm-up (dimensionless) at ``progress`` ∈ [0, 1] through the decay."""
        m = self.min_ratio
        if self.kind == "cosine":
            ratio = (1 + math.cos(math.pi * progress)) / 2
            return max(0.0, m + (1.0 - m) * ratio)
        if self.kind in ("linear", "wsd"):
            return max(0.0, m + (1.0 - m) * (1.0 - progress))
        return 1.0  # constant

    def at(self, step: int) -> float:
        """The learning rate at position ``step`` (the optimizer's unit): ``lr × factor(step)``;
        0 at position −1 (before the first optimizer step)."""
        return self.lr * self.factor(step) if step >= 0 else 0.0

    def describe(self) -> str:
        """One line for the log: kind, peak, warm-up, length and end."""
        text = f"{self.kind}, lr {self.lr:.6g} over {self.total_steps} steps (warm-up {self.warmup_steps})"
        if self.kind == "wsd":
            text += f", decay over the last {self.decay_steps}"
        if self.kind != "constant":
            text += f" to {self.lr * self.min_ratio:.6g}"
        return text


class StepScheduler:
    """A :class:`Schedule` as DeepSpeed's client scheduler: DeepSpeed calls ``step()`` after each
    optimizer step it did not skip, and saves and loads ``state_dict()``.

    Each param group's rate is its own rate at construction (its base, e.g. ``optim.lr``) times
    ``schedule.factor(position)``. The state is the position alone, ``{"last_batch_iteration": n}``:
    the same dict as ``WarmupCosineLR``'s, so checkpoints of either load into the other."""

    def __init__(self, optimizer: Any, schedule: Schedule, last_batch_iteration: int = -1):
        self.optimizer = _torch_optimizer(optimizer)
        self.schedule = schedule
        self.base_lrs = [_clone(group["lr"]) for group in self.optimizer.param_groups]
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = self.apply()

    def get_lr(self) -> list[float]:
        """Each group's rate at the current position (0 before the first step)."""
        if self.last_batch_iteration < 0:
            return [0.0 for _ in self.base_lrs]
        factor = self.schedule.factor(self.last_batch_iteration)
        return [base * factor for base in self.base_lrs]

    def apply(self) -> list[float]:
        """Set every group's rate to the schedule's at the current position (after a checkpoint's
        optimizer state brought back the rate it was saved with); returns the rates."""
        import torch

        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr.squeeze() if torch.is_tensor(lr) else lr)
            else:
                group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return self._last_lr

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance one position (or go to ``last_batch_iteration``) and set the rates."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self.apply()

    def get_last_lr(self) -> list[float]:
        """The rates last set."""
        return self._last_lr

    def state_dict(self) -> dict[str, int]:
        """The position: all a checkpoint needs (the schedule comes from the config)."""
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Go to a saved position (this class's or ``WarmupCosineLR``'s state dict). The rates are
        set by :meth:`apply` once the optimizer state is loaded too (it carries the saved rates)."""
        self.last_batch_iteration = int(sd["last_batch_iteration"])


def step_scheduler(schedule: Schedule) -> Callable[[Any], StepScheduler]:
    """What ``deepspeed.initialize(lr_scheduler=...)`` takes: DeepSpeed calls it with its optimizer
    once that exists."""
    return functools.partial(StepScheduler, schedule=schedule)


def warmup_linear_decay(step: int, warmup: int, total: int) -> float:
    """Fine-tune's factor (dimensionless) after ``step`` optimizer steps (the first update is step
    0): linear warm-up over ``warmup`` steps (reaching 1 at step ``warmup − 1``), then linear decay
    to 0 at step ``total``: min((s + 1) / warmup, (total − s) / (total − warmup)), at least 0."""
    return min((step + 1) / max(1, warmup), max(0.0, (total - step) / max(1, total - warmup)))


def lambda_lr(
    optimizer: torch.optim.Optimizer, factor: Callable[[int], float]
) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's ``LambdaLR`` over ``factor`` (step → multiplier of each group's initial rate; the
    first update uses ``factor(0)``), e.g. ``lambda_lr(opt, functools.partial(warmup_linear_decay,
    warmup=50, total=1000))`` or ``lambda_lr(opt, schedule.factor)``."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _torch_optimizer(optimizer: Any) -> Any:
    """torch's optimizer inside DeepSpeed's wrappers (DeepSpeed's own schedulers unwrap the same way)."""
    import torch

    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    raise TypeError(f"{type(optimizer).__name__} is not a torch optimizer")


def _clone(lr: Any) -> Any:
    """A tensor rate copied (a float as it is)."""
    return lr.clone() if hasattr(lr, "clone") else lr
