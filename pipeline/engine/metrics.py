"""Monitoring: TensorBoard (rank 0), metrics.jsonl, optionally Weights & Biases, and a console line
per interval with ETA.

On resume at step N, TensorBoard purges events past N (``purge_step``) and metrics.jsonl drops its
lines past N, so curves never overlap. A W&B run resumed from a checkpoint continues the same W&B
run (its id is kept in ``<run_dir>/wandb-id``); steps it already has are not sent again.

Every tag is declared (:class:`Tags`): the pretrain loop logs only those of :data:`PRETRAIN_TAGS`,
which docs/pretrain.md lists (a test compares the two), and an undeclared tag is an error on every
rank at its first use.

TensorBoard's hparams view: each run writes one *session* (its hyper-parameters and its result
metrics as scalars, :func:`write_session`) in a directory of its own, and no run writes an
experiment summary, so a logdir holding several runs (the pipeline's run dir: the pretrain run and
every fine-tune job) shows each one's metrics in columns of their own.
"""

from __future__ import annotations

import html
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import check_choice, config_key, flatten
from rnnpipe.pipeline.errors import ConfigError

log = logging.getLogger("rnnpipe.train")

HPARAMS_DIR = "hparams"  # <run_dir>/tensorboard/hparams: the run's session in the hparams view
WANDB_ID = "wandb-id"  # <run_dir>/wandb-id: the W&B run a resumed run continues


WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class WandbConfig:
    """Weights & Biases beside TensorBoard (rank 0): the same scalars and text, the config, the
    final results in the run's summary. Needs ``pip install 'rnnpipe[wandb]'``."""

    project: str = ""  # "" = off
    entity: str = ""  # "" = W&B's default (your user)
    name: str = ""  # "" = the run dir's name
    group: str = ""
    tags: list[str] = field(default_factory=list)
    mode: str = "online"  # online | offline (a local run for `wandb sync`) | disabled; $WANDB_MODE wins
    dir: str = ""  # where W&B writes its files (under wandb/); "" = the run dir

    def effective_mode(self) -> str:
        """The mode W&B runs in: ``$WANDB_MODE`` when set to one of :data:`WANDB_MODES` (so a
        cluster without internet can force offline), else ``mode``."""
        env = os.environ.get("WANDB_MODE", "")
        return env if env in WANDB_MODES else self.mode

    def active(self) -> bool:
        """Whether a W&B run is to be started."""
        return bool(self.project) and self.effective_mode() != "disabled"

    def validate(self) -> None:
        """Check the mode, and that wandb is installed when a project is set (before any work)."""
        check_choice("mode", self.mode, WANDB_MODES)
        if self.active() and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                f"{config_key('project')}={self.project!r} logs to Weights & Biases, but wandb is not "
                "installed: pip install 'rnnpipe[wandb]' (or leave the project empty)"
            )


@dataclass(frozen=True)
class Tags:
    """The tags a run logs: scalars, text, and (``hparams``) which final results go to the hparams
    view's session, under which metric tag."""

    scalars: frozenset[str]
    texts: frozenset[str] = frozenset()
    hparams: Mapping[str, str] = field(default_factory=dict)


# What the pretrain loop logs (docs/pretrain.md, "Monitoring", lists exactly these).
PRETRAIN_SCALARS = (
    "train/loss",
    "train/bpb",
    "train/lr",
    "train/grad_norm",
    "train/tokens_per_s",
    "train/tokens_seen",
    "train/step_time_s",
    "train/mfu",
    "train/memory_gb",
    "train/nonfinite_total",
    *(f"{split}/{k}" for split in ("valid", "test") for k in ("loss", "bpb", "ppl")),
    *(f"{split}/{k}_dynamic" for split in ("valid", "test") for k in ("loss", "bpb", "ppl")),  # eval.dynamic
    *(f"{split}/{k}_window" for split in ("valid", "test") for k in ("loss", "bpb", "ppl")),  # eval.window
)
PRETRAIN_TEXTS = ("provenance", "valid/sample")
# The final results in the hparams view: bits per byte, what the results compare across tokenizers.
PRETRAIN_HPARAMS = {"valid/bpb": "hparam/pretrain/valid_bpb", "test/bpb": "hparam/pretrain/test_bpb"}
PRETRAIN_TAGS = Tags(frozenset(PRETRAIN_SCALARS), frozenset(PRETRAIN_TEXTS), PRETRAIN_HPARAMS)


def duration(seconds: float) -> str:
    """``1h05m`` or ``4m02s``: an ETA or a wall time on the console."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _plain(params: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as values TensorBoard takes (others as text), without the logging
    settings (``metrics.*``): where metrics go is not a hyper-parameter."""
    return {
        k: v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in params.items()
        if not k.startswith("metrics.")
    }


def write_session(logdir: Path, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
    """One session of TensorBoard's hparams view in ``logdir``, replacing what is there: the
    session start (``hparams``) and end, and each metric as a scalar under exactly its tag.

    No experiment summary, on purpose: the plugin takes the view's columns from the first
    experiment summary it finds among all the runs under the logdir, so one per run (what
    ``SummaryWriter.add_hparams`` writes) shows one run's metrics and blank cells for the others.
    Without one it takes the hparams of every session and, as metrics, every scalar tag in the
    session directories, which therefore hold nothing else."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summaries

    shutil.rmtree(logdir, ignore_errors=True)  # derived from the results: rebuilt every time
    _, start, end = hparams_summaries(_plain(hparams), metrics)
    with SummaryWriter(str(logdir)) as w:
        w.file_writer.add_summary(start)
        for tag, value in metrics.items():
            w.add_scalar(tag, value)
        w.file_writer.add_summary(end)


class Metrics:
    """The run's logs. Only ``enabled`` (rank 0) writes; every rank checks the tags it is given.

    ``tags``: what may be logged. ``jsonl``: also write ``metrics.jsonl``. ``wandb``: the W&B
    settings (off without a project); ``config``: the run's config (nested plain values), sent to
    W&B flattened."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        start_step: int,
        total_steps: int,
        *,
        tags: Tags = PRETRAIN_TAGS,
        jsonl: bool = True,
        wandb: WandbConfig | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.run_dir, self.enabled, self.tags = run_dir, enabled, tags
        self.start_step, self.total_steps = start_step, total_steps
        self.t0 = time.time()
        self.writer = None
        self.jsonl = None
        self.wandb: Any = None  # the W&B run
        self._wandb_floor = 0  # the first step the W&B run takes (it has the ones before)
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None
        )
        path = run_dir / "metrics.jsonl"
        if jsonl and path.exists():  # keep what the checkpoint covers, drop what came after it
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= start_step
            ]
            path.write_text("".join(line + "\n" for line in kept))
        self.jsonl = path.open("a") if jsonl else None
        if wandb is not None and wandb.active():
            self._start_wandb(wandb, config or {})

    def _start_wandb(self, cfg: WandbConfig, config: dict[str, Any]) -> None:
        import wandb  # the optional extra: imported only when a project is set (validate checked it)
        from wandb.sdk.lib.runid import generate_id

        # A run that resumes a checkpoint continues its W&B run; one that starts at step 0 (new,
        # overwritten, or killed before its first checkpoint) is a new W&B run.
        id_path = self.run_dir / WANDB_ID
        run_id = id_path.read_text().strip() if self.start_step and id_path.exists() else ""
        if not run_id:
            run_id = generate_id()
            fsio.write_text_atomic(str(id_path), run_id + "\n")
        where = Path(cfg.dir) if cfg.dir else self.run_dir
        where.mkdir(parents=True, exist_ok=True)
        try:
            self.wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity or None,
                name=cfg.name or self.run_dir.name,
                group=cfg.group or None,
                tags=cfg.tags or None,
                mode=cfg.effective_mode(),
                dir=str(where),
                id=run_id,
                resume="allow",
                config=_plain(flatten(config)),
                # console off: the console lines stay in the job's own log, not captured twice
                settings=wandb.Settings(console="off"),
            )
        except Exception as e:  # W&B down or not logged in: not a reason to stop training
            log.warning(
                "W&B: the run could not start (%s); logging to TensorBoard only "
                "(wandb login, or metrics.wandb.mode=offline to log locally for `wandb sync`)",
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
            return
        self._wandb_floor = int(self.wandb.step or 0)
        if self._wandb_floor > self.start_step + 1:
            last = self._wandb_floor - 1
            log.info("W&B run %s already has steps up to %d: those are not sent again", run_id, last)

    def _check(self, tag: str, declared: frozenset[str], what: str) -> None:
        if tag not in declared:
            raise ValueError(
                f"{what} tag {tag!r} is not declared: add it to the run's Tags "
                "(pipeline/engine/metrics.py or pipeline/finetune/job.py) and to the docs' list"
            )

    def _to_wandb(self, step: int, data: dict[str, Any]) -> None:
        if self.wandb is not None and step >= self._wandb_floor:
            self.wandb.log(data, step=step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Log ``{"train/loss": 1.2, ...}`` at ``step`` to TensorBoard, metrics.jsonl and W&B."""
        for tag in values:
            self._check(tag, self.tags.scalars, "scalar")
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
            self.jsonl.flush()
        self._to_wandb(step, dict(values))

    def text(self, step: int, tag: str, text: str) -> None:
        """Log Markdown ``text`` at ``step``: TensorBoard's text, and W&B as preformatted HTML."""
        self._check(tag, self.tags.texts, "text")
        if not self.enabled:
            return
        self.writer.add_text(tag, text, step)
        if self.wandb is not None:
            import wandb

            body = text.removeprefix("```\n").removesuffix("\n```")  # the code fence is Markdown's
            self._to_wandb(step, {tag: wandb.Html("<pre>" + html.escape(body) + "</pre>")})

    def hparams(self, params: dict[str, Any], results: dict[str, float]) -> None:
        """The run's hyper-parameters and final ``results`` (``{"valid/bpb": ...}``): a session of
        the hparams view in ``tensorboard/hparams`` with the results :attr:`Tags.hparams` names;
        for W&B, the parameters the config lacks go to the config and the results to the summary."""
        if not self.enabled:
            return
        session = {tag: results[k] for k, tag in self.tags.hparams.items() if k in results}
        write_session(self.run_dir / "tensorboard" / HPARAMS_DIR, params, session)
        if self.wandb is not None:
            plain = _plain(params)
            self.wandb.config.update(
                {k: v for k, v in plain.items() if k not in self.wandb.config}, allow_val_change=True
            )
            self.wandb.summary.update({**results, **session})

    def console(self, step: int, values: dict[str, float]) -> None:
        """The interval's console line: loss, bits per byte, lr, gradient norm, speed, MFU, ETA."""
        if not self.enabled:
            return
        done = step - self.start_step
        eta = (time.time() - self.t0) / max(done, 1) * (self.total_steps - step)
        log.info(
            "step %d/%d | loss %.4f | bpb %.3f | lr %.2e | grad %.3f | %s tok/s | mfu %.1f%% | eta %s",
            step,
            self.total_steps,
            values.get("train/loss", math.nan),  # (none logged when every step since was skipped)
            values.get("train/bpb", math.nan),
            values["train/lr"],
            values["train/grad_norm"],
            f"{values['train/tokens_per_s']:,.0f}",
            100 * values["train/mfu"],
            duration(eta),
        )

    def close(self) -> None:
        """Flush and close every sink (W&B: finish the run and stop its service process)."""
        if not self.enabled:
            return
        self.writer.flush()
        self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            self.wandb = None
            wandb.teardown()  # no W&B process outlives the run's logs
