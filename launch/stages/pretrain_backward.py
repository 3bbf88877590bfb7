"""The backward pretrain stage: ELMo's second language model, chained after the forward one.

With ``backward_lm: true`` in a pipeline file, the pipeline trains the pretrain stage's config a
second time with ``data.direction=backward`` (the training stream read in reverse: each model
predicts the previous token) in ``<run_dir>/pretrain-backward``, and the finetune stage gets its
export as ``pretrained_backward`` (``head.features=elmo`` reads both directions). The two runs share
their config and dataset, not their weights: ELMo's shared embedding and softmax are not tied here.

The stage protocol (:mod:`rnnpipe.launch.stages.stage`) is the pretrain stage's, with its own name, so
the record, the Slurm folder and ``--dry-run`` show it apart. Its plan looks only at the prepare stage's
decision: a forward run that resumes for more steps does not make the backward one start again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from rnnpipe.launch.stages import pretrain
from rnnpipe.launch.stages.pretrain_job import PretrainJob
from rnnpipe.launch.stages.stage import Decision, SlurmContext, SlurmShape, Submitted, Upstream, Wiring

NAME = "pretrain-backward"
Job = PretrainJob  # the stage protocol's config class (launch.stages.stage)
RUN_DIR = "pretrain-backward"  # under the pipeline's run dir


def wire(ctx: Wiring) -> PretrainJob | None:
    """With ``backward_lm: true``: the pretrain stage's config read backwards
    (``data.direction=backward``) in ``<run_dir>/pretrain-backward``, on the same dataset."""
    if not ctx.backward_lm:
        return None
    job: PretrainJob = ctx.load(PretrainJob, pretrain.NAME, ("data.direction=backward",))
    job.run_dir = ctx.path(RUN_DIR)
    job.data.path = ctx.jobs["prepare"].output
    job.executor.kind = ctx.executor
    return job


def slurm_shape(job: PretrainJob, small: Any = None) -> SlurmShape:
    """The pretrain stage's shape: the same script, nodes, tasks and signal."""
    return pretrain.slurm_shape(job, small)


def stage_in(job: PretrainJob, decision: Decision) -> None:
    """The pretrain stage's: the backward run's config, and no run to replace."""
    pretrain.stage_in(job, decision)


def _inputs(upstream: Upstream | None) -> Upstream | None:
    """The decisions this stage's inputs depend on: the dataset's, not the forward run's."""
    return None if upstream is None else {k: v for k, v in upstream.items() if k == "prepare"}


def check(job: PretrainJob, upstream: Upstream | None = None) -> None:
    """The pretrain stage's preflight, for the backward run."""
    pretrain.check(job, _inputs(upstream))


def fingerprint(job: PretrainJob) -> str:
    """The backward run's identity (``data.direction=backward`` is part of it)."""
    return pretrain.fingerprint(job)


def is_complete(job: PretrainJob) -> bool:
    """The export holds step ``train.steps`` of a backward run with this fingerprint."""
    return pretrain.is_complete(job)


def plan(job: PretrainJob, upstream: Upstream | None = None) -> Decision:
    """Run or skip, as the pretrain stage decides, on the dataset's decision alone."""
    return pretrain.plan(job, _inputs(upstream))


def run(job: PretrainJob, decision: Decision) -> None:
    """Train the backward LM on this machine, then export it."""
    pretrain.run(job, decision)


def submit(job: PretrainJob, decision: Decision, ctx: SlurmContext) -> Submitted:
    """The backward LM's Slurm job, in its own folder of the submission."""
    return pretrain.submit(job, decision, dataclasses.replace(ctx, folder=os.path.join(ctx.folder, NAME)))
