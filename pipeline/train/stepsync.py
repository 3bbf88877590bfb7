"""One optimizer step's bookkeeping with one host synchronisation (the pretrain loop's helpers).

A GPU runs ahead of the Python that feeds it until something reads a result back: every
``.item()``, ``bool(tensor)``, blocking copy or collective whose result the host waits for drains
the queue, and with a small model the host then waits on every kernel. So what the loop must know
about a step (its loss, whether it was finite, the tokens it trained on, whether a signal or the
time limit asks every rank to stop) is gathered on the device during its micro-steps and read once,
at the step's end, in one all-reduce of one small vector:

    tally = StepTally(device)
    for each micro-step:  tally.add(loss.detach(), batch.targets)     # device ops, no sync
    at the boundary:      facts = tally.read(norm_D, bool(stop), late)  # the step's one sync

Where the loop takes the gradient norm itself (ZeRO-0) it is computed on the device
(:func:`grad_norm`) and its finiteness travels in the same vector; the loop also clips with it
(:func:`clip_`), so DeepSpeed does not take it a second time (its ``clip_grad_norm_`` makes two
blocking host-to-device copies). At ZeRO >= 1 DeepSpeed's own optimizer checks the gradients for
overflow, which synchronises inside DeepSpeed: docs/pretrain.md, "Host synchronisations".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# The slots of the step's vector (float64: token counts stay exact up to 2**53).
_LOSS, _FINITE, _NONFINITE, _BAD_NORM, _TOKENS, _STOP, _LATE = range(7)


@dataclass(frozen=True)
class StepFacts:
    """What every rank knows of a step after :meth:`StepTally.read` (sums over ranks)."""

    loss_sum: float  # nats: the finite micro-batch losses (each a mean per target), summed
    finite: int  # micro-batch losses that were finite (summed over ranks)
    nonfinite: int  # micro-batch losses that were not
    bad_norm: bool  # the loop's own gradient norm (ZeRO-0) is not finite
    tokens: int  # target tokens of the step's micro-batches, summed over ranks
    stop: bool  # a rank has a stop signal
    late: bool  # a rank is past train.time_limit_min

    @property
    def mean_loss(self) -> float:
        """The mean finite micro-batch loss (nats per token); NaN when none was finite."""
        return self.loss_sum / self.finite if self.finite else math.nan


class StepTally:
    """A step's losses and token count on the device; one all-reduce and one read per step."""

    def __init__(self, device: torch.device):
        self.v_D = torch.zeros(7, dtype=torch.float64, device=device)
        self.tokens = 0  # host: the loader counts them

    def add(self, loss: torch.Tensor, targets: int) -> None:
        """Fold one micro-batch's ``loss`` (a 0-dim tensor, detached) and its ``targets`` in."""
        finite = torch.isfinite(loss)
        self.v_D[_LOSS : _NONFINITE + 1] += torch.stack(
            [torch.where(finite, loss.double(), 0.0), finite.double(), (~finite).double()]
        )
        self.tokens += targets

    def read(self, norm_D: torch.Tensor | None, stop: bool, late: bool) -> StepFacts:
        """The step's facts, the same on every rank, and the tally emptied for the next step.
        ``norm_D``: the loop's own gradient norm (0-dim, on the device) or None."""
        v = self.v_D
        if norm_D is not None:
            v[_BAD_NORM] = (~torch.isfinite(norm_D)).double()
        # fill_ with a Python number launches a kernel; torch.tensor(..., device=) would copy and wait
        v[_TOKENS].fill_(float(self.tokens))
        v[_STOP].fill_(float(stop))
        v[_LATE].fill_(float(late))
        dist.all_reduce(v)
        values = v.tolist()  # the host synchronisation
        v.zero_()
        self.tokens = 0
        return StepFacts(
            loss_sum=values[_LOSS],
            finite=round(values[_FINITE]),
            nonfinite=round(values[_NONFINITE]),
            bad_norm=values[_BAD_NORM] > 0,
            tokens=round(values[_TOKENS]),
            stop=values[_STOP] > 0,
            late=values[_LATE] > 0,
        )


def grads(module: torch.nn.Module) -> list[torch.Tensor]:
    """The gradients of ``module``'s parameters that have one."""
    return [p.grad for p in module.parameters() if p.grad is not None]


def grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The global L2 norm of the gradients as a 0-dim float32 tensor on their device (at ZeRO-0
    they are already all-reduced: every rank gets the same norm). No host synchronisation."""
    gs = grads(module)
    if not gs:
        return torch.zeros((), device=next(module.parameters()).device)
    return torch.linalg.vector_norm(torch.stack([g.detach().float().norm() for g in gs]))


def clip_(module: torch.nn.Module, norm_D: torch.Tensor, max_norm: float) -> None:
    """Scale the gradients so their global norm ``norm_D`` is at most ``max_norm`` (DeepSpeed's
    and torch's rule: by max_norm / (norm + 1e-6) when that is below 1), on the device."""
    gs = grads(module)
    if gs and max_norm > 0:
        coef = (max_norm / (norm_D + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(gs, coef.to(gs[0].dtype))


def hold(engine: Any, zero_grads: bool) -> list[float]:
    """Make this step's update a no-op: a learning rate of 0 for it (the scheduler sets the next
    step's rate as usual; Adam's moments decay once) and, with ``zero_grads`` (ZeRO-0, where the
    gradients are the module's), zero gradients, since 0 x NaN is NaN. Returns the rates, for
    :func:`release` when DeepSpeed skipped the step (its scheduler then does not run)."""
    if zero_grads:
        for g in grads(engine.module):
            g.zero_()
    groups = engine.optimizer.param_groups
    rates = [group["lr"] for group in groups]
    for group in groups:
        group["lr"] = 0.0
    return rates


def release(engine: Any, rates: list[float]) -> None:
    """Give the optimizer back the rates :func:`hold` took."""
    for group, lr in zip(engine.optimizer.param_groups, rates, strict=True):
        group["lr"] = lr


def to_device(x_CPU: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (a batch) on ``device``: on a GPU through pinned memory without waiting (a
    blocking copy from pageable memory would wait for the queue to drain)."""
    if device.type != "cuda":
        return x_CPU.to(device)
    return x_CPU.pin_memory().to(device, non_blocking=True)
