"""The learning-rate schedule as a pure function of the step (pipeline.engine.schedule): its values,
WSD's shape, equality with DeepSpeed's WarmupCosineLR (which pretrain used before it, configured
as below), the client scheduler's state dict, and the config's refusals."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from deepspeed.runtime.lr_schedules import WarmupCosineLR
from harness import REPO

from rnnpipe.launch.stages.pretrain import PretrainJob
from rnnpipe.pipeline.config import load_config, to_dict
from rnnpipe.pipeline.engine.schedule import (
    SCHEDULES,
    Schedule,
    StepScheduler,
    lambda_lr,
    step_scheduler,
    warmup_linear_decay,
)
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.train.config import deepspeed_config, run_fingerprint

PRETRAIN = str(REPO / "configs" / "pretrain" / "tiny-lrn.yaml")


def _optimizer(lr: float = 3e-4) -> torch.optim.Optimizer:
    """Two param groups, as pretrain's (decay, no decay)."""
    return torch.optim.AdamW(
        [{"params": [torch.nn.Parameter(torch.zeros(2))]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}],
        lr=lr,
    )


def _warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int, min_ratio: float) -> WarmupCosineLR:
    """WarmupCosineLR as deepspeed_config's "scheduler" block configured it before the schedule
    module (warm-up 0: a warm-up that starts at the peak)."""
    return WarmupCosineLR(
        opt,
        total_num_steps=steps,
        warmup_num_steps=max(1, warmup),
        warmup_type="linear",
        warmup_min_ratio=0.0 if warmup else 1.0,
        cos_min_ratio=min_ratio,
    )


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 37, 1000])
@pytest.mark.parametrize("warmup", [0, 1, 2, 5, 100])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1, 1.0])
def test_the_cosine_is_deepspeeds_warmup_cosine_value_for_value(steps, warmup, min_ratio):
    ref_opt, new_opt = _optimizer(), _optimizer()
    ref = _warmup_cosine(ref_opt, steps, warmup, min_ratio)
    new = StepScheduler(new_opt, Schedule("cosine", 3e-4, steps, warmup, min_ratio))
    for position in range(-1, steps + 3):  # (a few past the end: a resume with fewer steps)
        if position >= 0:
            ref.step()
            new.step()
        got = [g["lr"] for g in new_opt.param_groups]
        assert got == [g["lr"] for g in ref_opt.param_groups], position  # bit for bit
        assert new.state_dict() == ref.state_dict()
        if position >= 0:
            assert Schedule("cosine", 3e-4, steps, warmup, min_ratio).at(position) == got[0]


def test_the_schedules_values():
    cos = Schedule("cosine", lr=1.0, total_steps=102, warmup_steps=2, min_ratio=0.1)
    assert [cos.factor(s) for s in range(3)] == [0.0, 0.5, (1 + math.cos(math.pi / 100)) / 2 * 0.9 + 0.1]
    assert cos.factor(51) == pytest.approx(0.55)  # half-way down the cosine
    assert cos.factor(101) == pytest.approx(0.1) and cos.factor(500) == pytest.approx(0.1)
    assert cos.at(-1) == 0.0  # before the first step (DeepSpeed's convention: the first update at 0)

    lin = Schedule("linear", lr=2.0, total_steps=12, warmup_steps=2, min_ratio=0.0)
    assert [lin.at(s) for s in range(12)] == pytest.approx([0, 1, *[2 * (1 - k / 10) for k in range(1, 11)]])

    const = Schedule("constant", lr=1e-3, total_steps=50, warmup_steps=4, min_ratio=0.1)
    assert [const.factor(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert const.at(49) == 1e-3 and const.at(1000) == 1e-3

    no_warmup = [Schedule(kind, 1.0, 100, 0, 0.1).factor(s) for kind in SCHEDULES for s in (0, 1)]
    assert no_warmup == [1.0] * 2 * len(SCHEDULES)  # the peak at once


def test_wsd_warms_up_holds_then_decays_over_the_last_fraction():
    s = Schedule("wsd", lr=1e-3, total_steps=100, warmup_steps=10, min_ratio=0.1, decay_fraction=0.2)
    assert s.decay_steps == 20
    f = [s.factor(step) for step in range(100)]
    assert f[:10] == [k / 10 for k in range(10)]  # the warm-up
    assert f[10:80] == [1.0] * 70  # stable
    decay = f[80:]
    assert decay == sorted(decay, reverse=True) and decay[0] < 1.0  # down from the first decay step
    assert decay[-1] == pytest.approx(0.1) and s.at(99) == pytest.approx(1e-4)  # to lr × min_ratio
    assert decay == pytest.approx([0.1 + 0.9 * (1 - k / 20) for k in range(1, 21)])  # linearly
    assert s.factor(150) == pytest.approx(0.1)
    assert "decay over the last 20" in s.describe()


def test_a_warmup_cosine_checkpoint_loads_into_the_client_scheduler_and_back():
    """Checkpoints written with WarmupCosineLR resume: the state is the position alone."""
    old_opt, new_opt = _optimizer(), _optimizer()
    old = _warmup_cosine(old_opt, 40, 5, 0.1)
    for _ in range(17):
        old.step()
    new = StepScheduler(new_opt, Schedule("cosine", 3e-4, 40, 5, 0.1))
    new.load_state_dict(old.state_dict())
    new.apply()  # (pretrain: after the optimizer state, elastic.load_engine)
    assert [g["lr"] for g in new_opt.param_groups] == [g["lr"] for g in old_opt.param_groups]
    for _ in range(30):
        old.step()
        new.step()
        assert [g["lr"] for g in new_opt.param_groups] == [g["lr"] for g in old_opt.param_groups]
    back = _warmup_cosine(_optimizer(), 40, 5, 0.1)
    back.load_state_dict(new.state_dict())
    assert back.last_batch_iteration == new.last_batch_iteration == 46  # (-1, then 47 steps)


def test_a_changed_schedule_is_followed_from_the_saved_position():
    opt = _optimizer(1e-3)
    sched = StepScheduler(opt, Schedule("cosine", 1e-3, 100, 10, 0.1))
    for _ in range(30):
        sched.step()
    opt2 = _optimizer(5e-4)  # resumed with optim.lr=5e-4, optim.schedule=wsd
    wsd = Schedule("wsd", 5e-4, 200, 10, 0.1)
    resumed = StepScheduler(opt2, wsd)
    resumed.load_state_dict(sched.state_dict())
    resumed.apply()
    assert opt2.param_groups[0]["lr"] == wsd.at(29) == 5e-4


def test_each_group_scales_its_own_base_rate():
    opt = torch.optim.SGD(
        [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
            {"params": [torch.nn.Parameter(torch.zeros(1))]},
        ],
        lr=0.5,
    )
    sched = step_scheduler(Schedule("linear", 1.0, 10, 2, 0.0))(opt)
    for _ in range(5):
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.625, 0.3125] == sched.get_last_lr()


def test_finetunes_factor_as_a_lambda_lr():
    """The rule fine-tune's LambdaLR had: linear warm-up over 3 steps, linear decay to 0 at 10."""
    opt = _optimizer(1.0)
    sched = lambda_lr(opt, functools.partial(warmup_linear_decay, warmup=3, total=10))
    rates = []
    for _ in range(11):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.0])
    assert warmup_linear_decay(0, 0, 10) == 1.0  # no warm-up: the peak at once


def _config(*overrides: str):
    return load_config(PretrainJob, PRETRAIN, list(overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.schedule=step"], "optim.schedule must be cosine or linear or constant or wsd, got 'step'"),
        (["optim.decay_fraction=0"], "optim.decay_fraction must be in (0, 1], got 0.0"),
        (["optim.decay_fraction=1.5"], "optim.decay_fraction must be in (0, 1], got 1.5"),
        (
            ["optim.schedule=wsd", "train.steps=100", "optim.warmup_steps=50", "optim.decay_fraction=0.6"],
            "optim.schedule=wsd: optim.decay_fraction=0.6 of train.steps=100 decays over the last 60 "
            "steps, which would start inside the 50-step warm-up",
        ),
        (
            ["deepspeed.scheduler.type=WarmupLR"],
            "deepspeed.scheduler: the learning-rate schedule is optim.schedule's",
        ),
    ],
)
def test_a_bad_schedule_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError) as e:
        _config(*overrides)
    assert message in str(e.value)


def test_the_deepspeed_config_has_no_scheduler_and_the_default_keeps_the_fingerprint():
    cfg = _config("optim.schedule=wsd", "optim.decay_fraction=0.1")
    assert "scheduler" not in deepspeed_config(cfg, on_gpu=False)
    assert cfg.optim.build_schedule(cfg.train.steps) == Schedule(
        "wsd", cfg.optim.lr, cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.min_lr_ratio, 0.1
    )
    # A run recorded before the keys existed has the cosine: its fingerprint is unchanged.
    values = to_dict(_config())
    older = {
        **values,
        "optim": {k: v for k, v in values["optim"].items() if k not in ("schedule", "decay_fraction")},
    }
    assert run_fingerprint(values, "d", 1) == run_fingerprint(older, "d", 1)
    assert run_fingerprint(to_dict(cfg), "d", 1) != run_fingerprint(values, "d", 1)
