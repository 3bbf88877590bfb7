"""The pretrain stage's config, and the DeepSpeed config derived from it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING

from rnnpipe.pipeline.config import (
    check_choice,
    check_range,
    config_diff,
    config_key,
    fingerprint,
    flatten,
    to_dict,
)
from rnnpipe.pipeline.data.config import DEFAULT_VERIFY, VERIFY_LEVELS, Direction
from rnnpipe.pipeline.engine.metrics import WandbConfig
from rnnpipe.pipeline.engine.schedule import SCHEDULES, Schedule
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.models.config import ModelConfig


class DataMode(Enum):
    stream = "stream"  # stateful truncated BPTT over contiguous streams (enwik8's convention)
    shuffle = "shuffle"  # independent shuffled windows, state reset per window


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"


# numpy's and torch's generators take seeds in [0, 2**32) (numpy refuses negative ones).
SEED_LIMIT = 2**32


@dataclass
class DataConfig:
    path: str = MISSING  # a prepared dataset (the prepare stage's output)
    mode: DataMode = DataMode.stream
    seq_len: int = 512  # tokens per step per sequence (the truncated-BPTT length)
    batch_size: int = 8  # sequences (streams) per rank per micro-step
    seed: int = 0  # shuffle mode: the order of windows
    workers: int = 0  # shuffle mode: DataLoader worker processes per rank
    verify: str = DEFAULT_VERIFY  # sizes | read (each sha256 at first read) | full (all at open)
    # backward: train, evaluate (and export) on every split's token stream read in reverse
    # (pipeline.data.reader.ReversedReader): the backward LM of an ELMo pair
    direction: Direction = Direction.forward

    def validate(self) -> None:
        """Check every value's range (a ConfigError names the key)."""
        if not self.path:
            raise ConfigError(f"{config_key('path')} is empty: name a prepared dataset")
        check_range("seq_len", self.seq_len, ge=1)
        check_range("batch_size", self.batch_size, ge=1)
        check_range("seed", self.seed, ge=0, lt=SEED_LIMIT)
        check_range("workers", self.workers, ge=0)
        check_choice("verify", self.verify, VERIFY_LEVELS)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    # The learning rate as a function of the step (pipeline.engine.schedule), after a linear
    # warm-up: cosine | linear (each down to lr × min_lr_ratio at train.steps) | constant | wsd
    # (warm-up, stable at lr, then linear down to lr × min_lr_ratio over the last decay_fraction)
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # the decay ends at lr × this (cosine, linear, wsd)
    warmup_steps: int = 100  # 0 = none: the schedule starts at lr
    decay_fraction: float = 0.2  # wsd: the final decay's share of train.steps
    weight_decay: float = 0.1  # not on biases, norms and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 = none

    def validate(self) -> None:
        """Check every value's range (a ConfigError names the key)."""
        check_range("lr", self.lr, gt=0)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_range("min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
        check_range("decay_fraction", self.decay_fraction, gt=0, le=1)
        check_range("warmup_steps", self.warmup_steps, ge=0, note=" (0 = no warm-up)")
        check_range("weight_decay", self.weight_decay, ge=0)
        check_range("beta1", self.beta1, ge=0, lt=1)
        check_range("beta2", self.beta2, ge=0, lt=1)
        check_range("eps", self.eps, gt=0)
        check_range("grad_clip", self.grad_clip, ge=0, note=" (0 = no clipping)")

    def build_schedule(self, total_steps: int) -> Schedule:
        """The learning-rate schedule of a run of ``total_steps`` optimizer steps."""
        return Schedule(
            kind=self.schedule,
            lr=self.lr,
            total_steps=total_steps,
            warmup_steps=self.warmup_steps,
            min_ratio=self.min_lr_ratio,
            decay_fraction=self.decay_fraction,
        )


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-steps per optimizer step
    precision: Precision = Precision.fp32
    zero_stage: int = 0
    activation_checkpointing: bool = False
    compile: bool = False  # run the model under torch.compile (the recurrences' custom ops trace)
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
    # Start a new run from an export's weights (rnnpipe export DIR): same model config, a fresh
    # optimizer and schedule. Ignored when the run resumes from a checkpoint of its own.
    init_from: str = ""
    inject_nan_at: list[int] = field(default_factory=list)  # testing: steps whose loss is made NaN

    def validate(self) -> None:
        """Check every value's range (a ConfigError names the key)."""
        check_range("steps", self.steps, ge=1)
        check_range("grad_accum", self.grad_accum, ge=1)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{config_key('zero_stage')} must be 0, 1, 2 or 3, got {self.zero_stage}")
        check_range("seed", self.seed, ge=0, lt=SEED_LIMIT)
        check_range("log_every", self.log_every, ge=1)
        check_range("eval_every", self.eval_every, ge=0, note=" (0 = only at the end)")
        check_range("eval_batch_size", self.eval_batch_size, ge=1)
        check_range("eval_max_tokens", self.eval_max_tokens, ge=0, note=" (0 = the whole split)")
        check_range("checkpoint_every", self.checkpoint_every, ge=0, note=" (0 = only on stop)")
        check_range("keep_checkpoints", self.keep_checkpoints, ge=1)
        if not self.resume:
            raise ConfigError(f"{config_key('resume')} must be auto, none or a checkpoint path, got ''")
        check_range("time_limit_min", self.time_limit_min, ge=0, note=" (0 = none)")
        check_range("max_nonfinite", self.max_nonfinite, ge=1)
        check_range("sample_tokens", self.sample_tokens, ge=0, note=" (0 = none)")
        check_range("peak_tflops", self.peak_tflops, ge=0, note=" (0 = measured or the datasheet's)")
        for i, micro_step in enumerate(self.inject_nan_at):
            check_range(f"inject_nan_at[{i}]", micro_step, ge=0)


# eval.dynamic_method: how dynamic evaluation adapts the weights (pipeline.train.dynamic_eval).
DYNAMIC_METHODS = ("sgd", "rms")


@dataclass
class EvalConfig:
    """The final evaluation's extras (the periodic evaluation's keys are ``train.eval_*``).

    Dynamic evaluation (Krause et al. 2018, :mod:`rnnpipe.pipeline.train.dynamic_eval`): valid and test are
    read again by a copy of the model that takes a gradient step on each segment after scoring it;
    reported beside the static figures as ``valid/bpb_dynamic``, ``test/bpb_dynamic``, ...

    ``window``: also score valid and test with the state reset every ``window`` tokens (as a
    fixed-context model reads them), reported as ``valid/loss_window``, ``valid/bpb_window``, ...
    None of these keys changes the trained weights: they are not part of the run's identity."""

    dynamic: bool = False
    dynamic_method: str = "rms"  # sgd: θ ← θ − lr·g + decay·(θ₀ − θ) | rms: Krause's RMS-normalised rule
    dynamic_lr: float = 1e-4  # η: the step size (rms: per RMS of the training gradients)
    dynamic_decay: float = 0.001  # λ: the pull back toward the trained weights θ₀ per step, in [0, 1]
    dynamic_eps: float = 1e-5  # rms: ε in g / (RMS + ε)
    dynamic_stat_batches: int = 100  # rms: training batches for the gradients' mean square (0 = one epoch)
    dynamic_seq_len: int = 0  # tokens per stream per adaptation step (0 = data.seq_len)
    window: int = 0  # also evaluate with the state reset every this many tokens (0 = not)
    # The final evaluation reads this many tokens of valid and of test (the first ones of each of
    # the evaluation's streams; 0 = the whole splits, the figures to report). A smoke test or a
    # throughput run need not spend minutes on it.
    max_tokens: int = 0

    def validate(self) -> None:
        """Check every value's range (a ConfigError names the key)."""
        check_choice("dynamic_method", self.dynamic_method, DYNAMIC_METHODS)
        check_range("dynamic_lr", self.dynamic_lr, gt=0)
        check_range("dynamic_decay", self.dynamic_decay, ge=0, le=1, note=" (0 = no decay)")
        check_range("dynamic_eps", self.dynamic_eps, gt=0)
        check_range("dynamic_stat_batches", self.dynamic_stat_batches, ge=0, note=" (0 = one epoch)")
        check_range("dynamic_seq_len", self.dynamic_seq_len, ge=0, note=" (0 = data.seq_len)")
        check_range("window", self.window, ge=0, note=" (0 = no windowed evaluation)")
        check_range("max_tokens", self.max_tokens, ge=0, note=" (0 = the whole splits)")


@dataclass
class MetricsConfig:
    """Where metrics go besides TensorBoard and metrics.jsonl (which are always written)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)


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
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # logging only: not the run's identity
    eval: EvalConfig = field(default_factory=EvalConfig)  # the final evaluation: not the run's identity

    def validate(self) -> None:
        """Check the run dir; resolve the attention memory stream mode needs, and the segment length
        of a huggingface-kind model."""
        from rnnpipe.pipeline.models.config import MixerKind, ModelKind

        if not self.run_dir:
            raise ConfigError(f"{config_key('run_dir')} is empty: name the run's directory")
        self._check_schedule()
        if self.model.kind is ModelKind.huggingface:
            self._resolve_recurrence()
        # Resolved here, not in the loop, so that the config a run records (and its fingerprint)
        # is the one it trains: in stream mode an unbounded KV cache would grow all epoch.
        if (
            self.data.mode is DataMode.stream
            and not self.model.attention_memory
            and MixerKind.attention in self.model.layer_kinds()
        ):
            self.model.attention_memory = self.data.seq_len

    def _check_schedule(self) -> None:
        """The schedule against the run's length, and no second schedule in the DeepSpeed fragment."""
        if "scheduler" in self.deepspeed:
            raise ConfigError(
                "deepspeed.scheduler: the learning-rate schedule is optim.schedule's (cosine, linear, "
                "constant or wsd; pipeline.engine.schedule), passed to DeepSpeed as its client "
                "scheduler: remove the scheduler block"
            )
        o = self.optim
        if o.schedule == "wsd":
            sched = o.build_schedule(self.train.steps)
            if self.train.steps - sched.decay_steps < o.warmup_steps:
                raise ConfigError(
                    f"optim.schedule=wsd: optim.decay_fraction={o.decay_fraction} of train.steps="
                    f"{self.train.steps} decays over the last {sched.decay_steps} steps, which would "
                    f"start inside the {o.warmup_steps}-step warm-up (optim.warmup_steps): lower "
                    "one of them or raise train.steps"
                )

    def _resolve_recurrence(self) -> None:
        """A huggingface-kind model's segment length (recorded resolved: the export and fine-tuning
        need it) and what its training window allows."""
        from rnnpipe.pipeline.models.config import FreezeKind, RecurrenceKind

        r = self.model.recurrence
        if r.learns_carry() and r.bptt_segments < 2:
            raise ConfigError(
                f"model.recurrence.bptt_segments={r.bptt_segments} with model.recurrence.kind="
                f"{r.kind.value}: what crosses segments is trained only through a gradient across at "
                "least 2 of them (with 1 it is cut at every segment's end and never learns)"
            )
        if not r.segment_len:
            r.segment_len = self.data.seq_len // r.bptt_segments if r.learns_carry() else self.data.seq_len
            if not r.segment_len:
                raise ConfigError(
                    f"data.seq_len={self.data.seq_len} is shorter than model.recurrence.bptt_segments="
                    f"{r.bptt_segments} segments of one token"
                )
        segments = -(-self.data.seq_len // r.segment_len)
        if r.learns_carry() and r.bptt_segments > segments:
            raise ConfigError(
                f"model.recurrence.bptt_segments={r.bptt_segments}: a gradient crosses at most the "
                f"{segments} segment(s) of one training window (data.seq_len={self.data.seq_len} / "
                f"model.recurrence.segment_len={r.segment_len}); raise data.seq_len to "
                f"{r.bptt_segments * r.segment_len} for {r.bptt_segments}"
            )
        if (
            self.model.freeze is FreezeKind.backbone
            and r.kind is RecurrenceKind.memory_tokens
            and self.data.mode is DataMode.stream
        ):
            # RMT's one parameter is the first memory, read only where a stream starts (once an
            # epoch in stream mode): every other step's loss would have no gradient at all.
            raise ConfigError(
                "model.freeze=backbone with model.recurrence.kind=memory_tokens trains only the "
                "initial memory, which stream mode reads once an epoch (the carried memory is "
                "cut from the graph between steps): use data.mode=shuffle (every window starts "
                "from it), or model.freeze=none or embeddings"
            )
        if self.train.activation_checkpointing:
            raise ConfigError(
                "train.activation_checkpointing is not available for model.kind=huggingface (the "
                "recurrence's hooks would see recomputed passes): set it to false"
            )


def deepspeed_config(cfg: PretrainConfig, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for ``cfg``, with ``cfg.deepspeed`` merged over it. It has no
    ``scheduler``: the schedule (``optim.schedule``) is DeepSpeed's client scheduler,
    ``pipeline.engine.schedule.step_scheduler(cfg.optim.build_schedule(cfg.train.steps))``.

    The optimizer is torch's AdamW on every device (``torch_adam``): on a GPU its fused kernel
    (``fused``: one launch per step for every parameter), which ships with torch, where DeepSpeed's
    own FusedAdam would compile a CUDA extension at the first launch; on CPU its default one."""
    o, t = cfg.optim, cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if on_gpu and t.zero_stage in (1, 2):
        # Reduce (and ZeRO-2's gradient partitions) on a side stream while the backward pass goes
        # on, from one contiguous buffer: across nodes the all-reduce otherwise waits for the last
        # layer's gradients and then holds the GPUs idle (DeepSpeed's default is off for 1 and 2).
        zero.update(overlap_comm=True, contiguous_gradients=True)
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": o.grad_clip,  # always explicit: DeepSpeed's default is 1.0, not off
        "bf16": {"enabled": t.precision is Precision.bf16},
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,  # (DeepSpeed's FusedAdam would compile an extension)
                **({"fused": True} if on_gpu else {}),
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


# ------------------------------------------------------------------------------ identity, resume

# The logging settings (metrics.wandb.project, ...) with their defaults, as dotted keys.
METRICS_DEFAULTS: dict[str, Any] = flatten({"metrics": to_dict(MetricsConfig())})
# The final evaluation's extras (eval.dynamic, ...): they read the trained weights, never write them.
EVAL_DEFAULTS: dict[str, Any] = flatten({"eval": to_dict(EvalConfig())})

# Keys that cannot change the trained weights: where the run lives, how it is watched and paced.
# Everything else, with the dataset's content and the world size, is the run's identity.
NOT_CONTENT = (
    "run_dir",
    "data.path",  # the dataset's content digest stands for it
    "model.hf.path",  # a huggingface-kind backbone's content digest stands for it (a hub name or a copy)
    "data.verify",  # how much the reader checks the shards, not what it reads
    "train.log_every",
    "train.eval_every",
    "train.eval_batch_size",
    "train.eval_max_tokens",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.resume",
    "train.time_limit_min",
    "train.sample_tokens",
    "train.peak_tflops",
    "train.max_nonfinite",
    "train.activation_checkpointing",  # recomputes the same activations
    "train.compile",  # the same computation, fused (rounding may differ in the last bits)
    *METRICS_DEFAULTS,  # where metrics are sent
    *EVAL_DEFAULTS,  # what the final evaluation also reports
)
# The data order in shuffle mode depends on these; stream mode reads every stream in order.
SHUFFLE_ONLY = ("data.seed", "data.workers")
# Keys a resumed run may change: the rate is a pure function of the step and of these (the
# checkpoint keeps only the scheduler's position), and the clip norm is read from the config each step.
RESUME_SCHEDULE = (
    "train.steps",
    "optim.lr",
    "optim.schedule",
    "optim.min_lr_ratio",
    "optim.warmup_steps",
    "optim.decay_fraction",
)
# A checkpoint resumes on another number of ranks (and data.batch_size): the optimizer state is
# converted to DeepSpeed's universal checkpoint and the data position re-mapped (pipeline.train.elastic).
RESUME_ELASTIC = ("world_size", "data.batch_size")
RESUME_SAFE = (*NOT_CONTENT, *RESUME_SCHEDULE, *RESUME_ELASTIC, "optim.grad_clip", "train.inject_nan_at")


def _neutral(cfg: dict[str, Any]) -> set[str]:
    keys = set(NOT_CONTENT)
    if cfg.get("data", {}).get("mode") != DataMode.shuffle.value:
        keys |= set(SHUFFLE_ONLY)
    return keys


# Keys added after runs were recorded without them, with the default that means "as before": an
# older checkpoint's header without one has that value, and at that value the key is left out of
# the identity, so adding it changed no run's fingerprint.
ADDED_KEYS: dict[str, Any] = {
    "train.init_from": "",
    "data.verify": "sizes",
    "data.direction": Direction.forward.value,  # before it, every run read its text forward
    "train.compile": False,
    "optim.schedule": OptimConfig.schedule,  # cosine: before the key, every run's schedule
    "optim.decay_fraction": OptimConfig.decay_fraction,  # (wsd's only)
    **METRICS_DEFAULTS,
    **EVAL_DEFAULTS,
    # model.kind=huggingface and its keys (an rnnpipe-kind model has them at these values), and
    # model.embeddings (pretrained word vectors: none by default)
    **{
        f"model.{k}": v
        for k, v in flatten(
            {k: to_dict(ModelConfig())[k] for k in ("kind", "hf", "recurrence", "freeze", "embeddings")}
        ).items()
    },
}


def backbone_key(backbone: str) -> dict[str, Any]:
    """The identity's entry for a huggingface-kind backbone's content digest (none for rnnpipe's)."""
    return {"backbone": backbone} if backbone else {}


def run_view(cfg: dict[str, Any], dataset: str, world_size: int, backbone: str = "") -> dict[str, Any]:
    """A pretrain config (plain values) as dotted keys, with the dataset's content digest and the
    world size (the global batch and, in stream mode, how the streams are split across ranks), and a
    huggingface-kind backbone's content digest (:func:`rnnpipe.pipeline.models.backbone.backbone_source`)."""
    view = {**ADDED_KEYS, **flatten(cfg), "dataset": dataset, "world_size": world_size}
    return {**view, **backbone_key(backbone)}


def run_identity(cfg: dict[str, Any], dataset: str, world_size: int, backbone: str = "") -> dict[str, Any]:
    """What a pretrain run's weights are made from: :func:`run_view` without the keys that cannot
    change them (:data:`NOT_CONTENT`)."""
    neutral = _neutral(cfg)
    view = run_view(cfg, dataset, world_size, backbone)
    return {
        k: v for k, v in view.items() if k not in neutral and not (k in ADDED_KEYS and v == ADDED_KEYS[k])
    }


def run_fingerprint(cfg: dict[str, Any], dataset: str, world_size: int, backbone: str = "") -> str:
    """sha256 of :func:`run_identity`: equal fingerprints, runs of the same config. A run resumed
    with a changed schedule (``train.steps``, ``optim.lr``, ...) records the config it finished
    under; what a fine-tune result names is the exported weights' sha256 itself."""
    return fingerprint(run_identity(cfg, dataset, world_size, backbone))


def resume_changes(
    saved: dict[str, Any], new: dict[str, Any]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """(the changes that forbid resuming, the changes a resume may make) between a checkpoint's
    :func:`run_identity` plus config and a new one, as ``{dotted key: (old, new)}``. Everything not
    in :data:`RESUME_SAFE` that differs forbids it: the model and its shapes, the optimizer state's
    hyper-parameters (the checkpoint's would silently win), the precision and ZeRO stage, the seed
    (the RNG state comes from the checkpoint), the data stream and the dataset. A resume may change
    the schedule (:data:`RESUME_SCHEDULE`: the rate is a function of the step and the config) and,
    elastically, the world size and the micro-batch (:data:`RESUME_ELASTIC`: the streams are
    remapped). Both sides are :func:`run_view` s."""
    safe = set(RESUME_SAFE)
    if new.get("data.mode") != DataMode.shuffle.value:
        safe |= set(SHUFFLE_ONLY)
    diff = config_diff(saved, new)
    refused = {k: v for k, v in diff.items() if k not in safe}
    allowed = {k: v for k, v in diff.items() if k in safe and k not in ("run_dir", "data.path")}
    return refused, allowed
