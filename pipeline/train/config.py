"""The pretrain stage's config, and the DeepSpeed config derived from it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING

from pipeline.errors import ConfigError
from pipeline.models.config import ModelConfig


class DataMode(Enum):
    stream = "stream"  # stateful truncated BPTT over contiguous streams (enwik8's convention)
    shuffle = "shuffle"  # independent shuffled windows, state reset per window


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class DataConfig:
    path: str = MISSING  # a prepared dataset (the prepare stage's output)
    mode: DataMode = DataMode.stream
    seq_len: int = 512  # tokens per step per sequence (the truncated-BPTT length)
    batch_size: int = 8  # sequences (streams) per rank per micro-step
    seed: int = 0  # shuffle mode: the order of windows
    workers: int = 0  # shuffle mode: DataLoader worker processes per rank

    def validate(self) -> None:
        if self.seq_len < 1 or self.batch_size < 1 or self.workers < 0:
            raise ConfigError("data.seq_len and data.batch_size must be positive, data.workers >= 0")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine decays to lr × this
    warmup_steps: int = 100
    weight_decay: float = 0.1  # not on biases, norms and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 = none

    def validate(self) -> None:
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ConfigError("optim: lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0, grad_clip >= 0")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-steps per optimizer step
    precision: Precision = Precision.fp32
    zero_stage: int = 0
    activation_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500  # 0 = only at the end
    eval_batch_size: int = 1  # streams per rank when evaluating (state carried through each)
    eval_max_tokens: int = 0  # cap on tokens per evaluation of valid (0 = the whole split)
    checkpoint_every: int = 500  # 0 = only on stop
    keep_checkpoints: int = 3
    resume: str = "auto"  # auto (latest in run_dir, if any) | none | a checkpoint path
    time_limit_min: float = 0.0  # stop (checkpoint, final evaluation) after this much training; 0 = none
    max_nonfinite: int = 5  # this many non-finite losses in a row stop the run
    sample_tokens: int = 200  # generated at each evaluation (0 = none)
    peak_tflops: float = 0.0  # for MFU; 0 = the GPU's datasheet figure, or a measured CPU matmul rate
    inject_nan_at: list[int] = field(default_factory=list)  # testing: steps whose loss is made NaN

    def validate(self) -> None:
        if self.steps < 1 or self.grad_accum < 1:
            raise ConfigError("train.steps and train.grad_accum must be positive")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.resume not in ("auto", "none") and not self.resume:
            raise ConfigError("train.resume must be auto, none or a checkpoint path")
        if self.keep_checkpoints < 1 or self.max_nonfinite < 1 or self.eval_batch_size < 1:
            raise ConfigError("train.keep_checkpoints, max_nonfinite and eval_batch_size must be positive")


@dataclass
class PretrainConfig:
    run_dir: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # A raw DeepSpeed config fragment merged over the derived one (it wins), e.g.
    # {zero_optimization: {offload_optimizer: {device: cpu}}}.
    deepspeed: dict[str, Any] = field(default_factory=dict)


def deepspeed_config(cfg: PretrainConfig, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg``, with ``cfg.deepspeed`` merged over it."""
    o, t = cfg.optim, cfg.train
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": o.grad_clip,  # always explicit: DeepSpeed's default is 1.0, not off
        "bf16": {"enabled": t.precision is Precision.bf16},
        "zero_optimization": {"stage": t.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch's AdamW on CPU: DeepSpeed's fused Adam would compile an extension
                **({} if on_gpu else {"torch_adam": True}),
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.steps,
                "warmup_num_steps": o.warmup_steps,
                "warmup_type": "linear",
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": o.min_lr_ratio,
            },
        },
        "steps_per_print": 1 << 30,  # rnnpipe logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }
    return _merge(derived, cfg.deepspeed)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
