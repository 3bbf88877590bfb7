"""The pretrain stage: in this process, as N local processes, or as a Slurm job; then the export.

Stage protocol (:mod:`rnnpipe.launch.stages.stage`). The fingerprint is the run's identity
(:func:`rnnpipe.pipeline.train.config.run_identity`: the config without its pacing and logging keys, the
dataset's content digest, the world size); the export records it. Complete: ``<run_dir>/export``
holds the model of step ``train.steps`` made with this fingerprint. A run dir with checkpoints is
resumed only when :func:`rnnpipe.pipeline.train.checkpoint.check_resume` allows it (before any rank starts);
``overwrite=true`` replaces a run that cannot be resumed.

- inline: this process is one rank (or the only one): the process group comes from the
  environment (torchrun, Slurm's srun) or is a single process.
- local: ``distributed.nproc`` processes on this machine (default: one per GPU, or 1 on CPU), each
  running :mod:`rnnpipe.launch.stages.rank` on the run's ``config.yaml`` with RANK/WORLD_SIZE/MASTER_* set.
  Signals are forwarded; if one fails the others are stopped.
- slurm: one submitit job of nodes × tasks_per_node tasks through srun, with --signal=USR2 ahead of
  the time limit; the command prints the job id and returns (``--wait`` to wait).

``rnnpipe pretrain`` ends with a summary of the run read from its run dir
(:mod:`rnnpipe.launch.stages.summary`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rnnpipe.launch.processes import record
from rnnpipe.launch.processes.executors import ExecutorKind
from rnnpipe.launch.stages import summary
from rnnpipe.launch.stages.pretrain_job import (
    PretrainJob,
    _is_rank0,
    export_dir,
    export_final,
    stage_config,
)
from rnnpipe.launch.stages.stage import (
    Decision,
    SlurmContext,
    SlurmShape,
    Submitted,
    Upstream,
    Wiring,
    any_runs,
    short,
)
from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import to_dict, to_yaml
from rnnpipe.pipeline.engine.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED, early
from rnnpipe.pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("rnnpipe")
NAME = "pretrain"
Job = PretrainJob  # the stage protocol's config class (launch.stages.stage)
# What overwrite=true removes: everything a pretrain run writes into its run dir.
RUN_OUTPUTS = (
    *("checkpoints", "export", "tensorboard", "metrics.jsonl", "provenance.json"),
    *("wandb-id", "wandb"),  # with metrics.wandb.project: the W&B run's id and W&B's own files
)


def wire(ctx: Wiring) -> PretrainJob:
    """The pipeline's pretrain job: the run in ``<run_dir>/pretrain``, on the prepare stage's dataset."""
    job: PretrainJob = ctx.load(PretrainJob, NAME)
    job.run_dir = ctx.path("pretrain")
    job.data.path = ctx.jobs["prepare"].output
    job.executor.kind = ctx.executor
    return job


def slurm_shape(job: PretrainJob, small: Any = None) -> SlurmShape:
    """``distributed.nodes`` × :func:`tasks_per_node` tasks through srun, with ``executor.slurm``'s
    resources, USR2 ``distributed.signal_grace_s`` ahead of the time limit, requeued after it."""
    d = job.distributed
    return SlurmShape(
        "pretrain.sbatch",
        job.executor.slurm,
        nodes=d.nodes,
        ntasks_per_node=tasks_per_node(job),
        gpus_per_node=d.gpus_per_node,
        signal=f"USR2@{d.signal_grace_s}",
        requeue=True,
    )


def tasks_per_node(job: PretrainJob) -> int:
    """Ranks per node: one per GPU, else ``distributed.nproc`` (at least 1)."""
    d = job.distributed
    return d.gpus_per_node or max(1, d.nproc)


def world_size(job: PretrainJob) -> int:
    """How many ranks the job will have with its executor."""
    kind = job.executor.kind
    if kind is ExecutorKind.slurm:
        return job.distributed.nodes * tasks_per_node(job)
    if kind is ExecutorKind.local:
        if job.distributed.nproc:
            return job.distributed.nproc
        import torch

        return torch.cuda.device_count() or 1
    env = os.environ
    return int(env.get("WORLD_SIZE") or env.get("SLURM_NTASKS") or 1)


# ------------------------------------------------------------------------------------ identity


def _dataset(job: PretrainJob) -> dict[str, Any]:
    from rnnpipe.pipeline.data.manifest import read_manifest

    return read_manifest(job.data.path)


def fingerprint(job: PretrainJob) -> str:
    """The run's fingerprint, as the export would record it (needs the dataset)."""
    from rnnpipe.pipeline.data.manifest import dataset_digest
    from rnnpipe.pipeline.models.backbone import backbone_digest
    from rnnpipe.pipeline.train.config import run_fingerprint

    cfg = stage_config(job)
    return run_fingerprint(
        to_dict(cfg), dataset_digest(_dataset(job)), world_size(job), backbone_digest(cfg.model)
    )


def is_complete(job: PretrainJob) -> bool:
    """The export holds step ``train.steps`` of a run with this fingerprint."""
    from rnnpipe.pipeline.models.exported import export_source

    try:
        source = export_source(export_dir(job))
    except PipelineError:  # no export yet
        return False
    if source.get("step") != job.train.steps:
        return False
    try:
        return source.get("fingerprint") == fingerprint(job)
    except PipelineError:  # no dataset
        return False


def check(job: PretrainJob, upstream: Upstream | None = None) -> None:
    """Preflight, before any rank starts or any job is submitted: the dataset exists and its
    manifest checks out (sizes and counts, not hashes) unless prepare runs first, the vocabulary
    fits the model, and the Slurm partition exists. Raises ConfigError (exit 2)."""
    from rnnpipe.pipeline.locking import holder
    from rnnpipe.pipeline.train.checkpoint import RUN_LOCK

    if any(c in job.run_dir for c in "\n\r\0"):
        raise ConfigError(f"run_dir={job.run_dir!r} holds a control character")
    who = holder(job.run_dir, RUN_LOCK) if _is_rank0() else None  # (rank 0 may hold it already)
    if who:  # a second writer would interleave checkpoints and log every step twice
        raise PipelineError(
            f"{job.run_dir} is in use by {who}: wait for it to finish, or use another run_dir"
        )
    if _is_rank0() and "SLURM_JOB_ID" not in os.environ:  # (a job's own tasks are that submission)
        record.refuse_if_busy(os.path.join(job.run_dir, "slurm"))  # submitted, not started yet
    if not any_runs(upstream):
        from rnnpipe.pipeline.data.manifest import check_sizes

        problems = check_sizes(job.data.path)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ConfigError(
                f"data.path={job.data.path}: not a usable dataset: {problems[0]}{more}. "
                "Run rnnpipe prepare first, or point data.path at a prepared dataset"
            )
        vocab = int(_dataset(job)["tokenizer"]["vocab_size"])
        if job.model.vocab_size and job.model.vocab_size != vocab:
            raise ConfigError(
                f"model.vocab_size={job.model.vocab_size}, but the dataset's tokenizer has {vocab} ids "
                "(0 takes it from the dataset)"
            )
        _check_eval_streams(job, _dataset(job))
        if job.train.init_from:  # its model and tokenizer must be this run's
            from rnnpipe.pipeline.train import init_from

            init_from.check(stage_config(job), vocab, _dataset(job)["tokenizer"])
        if job.model.kind.value == "huggingface":  # what the ranks would refuse, before any waits
            from rnnpipe.pipeline.models.backbone import check_backbone

            check_backbone(job.model, vocab, _dataset(job)["tokenizer"], job.data.path)
    if job.executor.kind is ExecutorKind.slurm:
        from rnnpipe.launch.processes.slurm import check_partition

        check_partition(job.executor.slurm.partition, "pretrain.executor.slurm.partition")
        _check_node_memory(job)


# Host memory one GPU rank takes at least: torch with CUDA, DeepSpeed, the CUDA context's pinned
# buffers, the reader's cache and the checkpoint it writes (about 4-6 GB measured per rank).
MIN_GB_PER_GPU_RANK = 6


def _check_node_memory(job: PretrainJob) -> None:
    """executor.slurm.mem_gb is each node's memory (sbatch --mem): refuse, before submitting, a GPU
    job that would give each rank less than :data:`MIN_GB_PER_GPU_RANK` (the default 16 GB for 8
    ranks would end in out-of-memory kills once the job starts)."""
    ranks, mem = tasks_per_node(job), job.executor.slurm.mem_gb
    if job.distributed.gpus_per_node and mem < MIN_GB_PER_GPU_RANK * ranks:
        raise ConfigError(
            f"pretrain.executor.slurm.mem_gb={mem:g} is each node's memory: {mem / ranks:.1f} GB for each "
            f"of its {ranks} GPU ranks, under the {MIN_GB_PER_GPU_RANK} GB a rank needs; set it to "
            f"{MIN_GB_PER_GPU_RANK * ranks} or more (GPU nodes often have 256 or more)"
        )


def _check_eval_streams(job: PretrainJob, manifest: dict[str, Any]) -> None:
    """Evaluation cuts each split into world × train.eval_batch_size streams: refuse a batch the
    splits cannot fill now, not after training (the final evaluation reads whole splits, the
    ones during training the first train.eval_max_tokens of valid)."""
    t, world = job.train, world_size(job)
    streams = world * t.eval_batch_size
    for split in ("valid", "test"):
        info = manifest["splits"].get(split)
        if info is None:
            continue
        tokens = int(info["tokens"])
        if split == "valid" and t.eval_max_tokens and t.eval_every:
            tokens = min(tokens, t.eval_max_tokens)
        if tokens - 1 < streams:
            raise ConfigError(
                f"train.eval_batch_size={t.eval_batch_size} × {world} rank(s) = {streams} streams, "
                f"but the {split} split gives {tokens} tokens: lower train.eval_batch_size"
                + (" or raise train.eval_max_tokens" if split == "valid" and t.eval_max_tokens else "")
            )


def plan(job: PretrainJob, upstream: Upstream | None = None) -> Decision:
    """Run or skip; resume, start, or refuse (ConfigError listing the keys) before any work."""
    from rnnpipe.pipeline.data.manifest import dataset_digest
    from rnnpipe.pipeline.train import checkpoint
    from rnnpipe.pipeline.train.config import run_fingerprint

    run_dir = Path(job.run_dir)
    if not any_runs(upstream) and is_complete(job):
        fp = short(fingerprint(job))
        return Decision(
            False, f"complete: the export is step {job.train.steps} of this config (fingerprint {fp})"
        )
    try:
        target = checkpoint.resolve(run_dir, job.train.resume)
    except PipelineError as e:
        raise ConfigError(str(e)) from e
    replace = "overwrite=true: starts afresh, replacing the run in " + str(run_dir)
    if target is None:
        latest = checkpoint.find_latest(run_dir)
        if latest is None:
            return Decision(True, "no checkpoint yet: trains from step 0")
        if job.overwrite:  # resume=none on a run dir with a run in it
            return Decision(True, replace, clear=True)
        raise ConfigError(
            f"train.resume=none, but {run_dir} holds a run (latest checkpoint: step "
            f"{checkpoint.read_header(latest)['step']}); starting over would mix two runs. Ways out: "
            "a new run_dir, or overwrite=true (pretrain.overwrite=true in a pipeline) to replace it"
        )
    from rnnpipe.pipeline.models.backbone import backbone_digest

    header = checkpoint.read_header(target)
    prep = (upstream or {}).get("prepare")
    values, world = to_dict(stage_config(job)), world_size(job)
    backbone = backbone_digest(stage_config(job).model)
    try:
        if prep is not None and prep.run:  # the dataset is made first: known by its config's fingerprint
            if prep.output and header.get("dataset_config") not in (None, prep.output):
                raise ConfigError(
                    f"{target} was trained on a dataset of another prepare config than the one prepare "
                    "is about to make. Ways out: a new run_dir, or pretrain.overwrite=true to replace the run"
                )
            dataset = header.get("dataset", "?")  # rebuilt from the same config: the same content
        else:
            dataset = dataset_digest(_dataset(job))
        found = checkpoint.check_resume(target, values, dataset, world, backbone)
        if found.step >= job.train.steps and header.get("fingerprint") != run_fingerprint(
            values, dataset, world, backbone
        ):
            raise ConfigError(
                f"{target} finished training at step {found.step}: {found.describe()} would change a run "
                "that has no step left to take. Raise train.steps to continue under the new values; or a "
                "new run_dir, or overwrite=true (pretrain.overwrite=true in a pipeline) to replace the run"
            )
    except ConfigError:
        if not job.overwrite:
            raise
        return Decision(True, replace, clear=True)
    if found.step >= job.train.steps:
        return Decision(True, f"trained to step {found.step}: evaluates and exports")
    changes = f": {found.describe()}" if found.allowed else ""
    later = " once prepare has run" if prep is not None and prep.run else ""
    return Decision(True, f"resumes from step {found.step}{later}{changes}")


# ------------------------------------------------------------------------------------ running


def clear_run(run_dir: str) -> None:
    """overwrite=true: remove what a pretrain run wrote (:data:`RUN_OUTPUTS`), nothing else."""
    for name in RUN_OUTPUTS:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    log.warning("overwrite=true: removed the earlier run in %s", run_dir)


def stage_in(job: PretrainJob, decision: Decision) -> None:
    """Before plain sbatch submits the job: what it must find when it starts, its config and, with
    ``overwrite=true``, no run to replace."""
    if decision.clear:
        clear_run(job.run_dir)
    write_config(job)


def write_config(job: PretrainJob) -> str:
    """``<run_dir>/config.yaml``, the config the ranks run; an earlier, different one is kept as
    ``configs/<n>.yaml`` (oldest first). Returns its path."""
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    text = to_yaml(job)
    if path.exists() and path.read_text() != text:
        history = run_dir / "configs"
        history.mkdir(exist_ok=True)
        n = len(list(history.glob("*.yaml")))
        shutil.copy2(path, history / f"{n:03d}.yaml")
    fsio.write_text_atomic(str(path), text)
    return str(path)


def prepared(job: PretrainJob) -> PretrainJob:
    """``job`` with absolute paths (its jobs run from elsewhere)."""
    job.run_dir = fsio.absolute(job.run_dir)
    job.data.path = fsio.absolute(job.data.path)
    hf = job.model.hf
    if hf.path and os.path.exists(hf.path):  # a local backbone (a hub name stays a name)
        hf.path = fsio.absolute(hf.path)
    return job


def slurm_executor(job: PretrainJob, folder: str, dependency: str = "", code: Any = None) -> Any:
    """The submitit executor for the pretrain job: nodes × tasks through srun, USR2 ahead of the
    time limit, --requeue; ``dependency`` (``afterok:123``) also cancels it if never met; ``code``:
    the snapshot the job runs (default: one taken now)."""
    import submitit

    from rnnpipe.launch.processes.distributed import LOG_LEVEL_ENV
    from rnnpipe.launch.processes.executors import SlurmExecutor
    from rnnpipe.launch.processes.slurm import with_dependency

    shape = slurm_shape(job)
    # The resources every rnnpipe Slurm job takes from executor.slurm, then what makes this one a
    # multi-node, requeueable job rather than an array (the shape plain sbatch gets too).
    base = SlurmExecutor(shape.resources, folder, code=code)
    params = base.slurm_parameters(NAME)
    params.pop("array_parallelism")
    params.update(
        nodes=shape.nodes,
        ntasks_per_node=shape.ntasks_per_node,
        signal_delay_s=job.distributed.signal_grace_s,
        additional_parameters={"requeue": shape.requeue, **params.get("additional_parameters", {})},
    )
    if shape.gpus_per_node:
        params["gpus_per_node"] = shape.gpus_per_node
    # A rank that exits with an error ends the step at once: the others would otherwise wait in
    # their next collective until the process group's timeout, holding every GPU of the job.
    params["srun_args"] = [*params.get("srun_args", []), "--kill-on-bad-exit=1"]
    # The job's bootstrap installs the stop flag before submitit and torch load (launch.processes.snapshot);
    # Its tasks log at INFO into the job's log file, or as the submitter asked with -v or
    # RNNPIPE_LOG_LEVEL (-q quiets the submitting console, not the log a user reads afterwards).
    exports = ["export RNNPIPE_EARLY_STOP=1"]
    level = os.environ.get(LOG_LEVEL_ENV, "")
    if level.isalnum():  # (a level name or number: nothing for the shell to expand)
        exports.append(f"export RNNPIPE_LOG_LEVEL={level}")
    params["setup"] = [*params.get("setup", []), *exports]
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=0, python=base.code.python_command())
    ex.update_parameters(**params)
    return with_dependency(ex, dependency)


def _submit_job(job: PretrainJob, folder: str, after: str, code: Any, export: bool) -> Any:
    import submitit

    from rnnpipe.launch.stages.rank import slurm_task

    ex = slurm_executor(job, os.path.join(folder, "%j"), after, code)
    with submitit.helpers.clean_env():
        return ex.submit(slurm_task, stage_config(job), export, job.distributed.timeout_min)


def submit(job: PretrainJob, decision: Decision, ctx: SlurmContext) -> Submitted:
    """The pipeline's pretrain job: train, then export (rank 0)."""
    with _run_lock(job):  # (the job's rank 0 takes it when it starts)
        if decision.clear:
            clear_run(job.run_dir)
        write_config(job)
        sjob = _submit_job(job, os.path.join(ctx.folder, NAME), ctx.after, ctx.code, export=True)
    d = job.distributed
    return Submitted(
        sjob.job_id, [str(sjob.paths.stderr)], f"{d.nodes} node(s) x {tasks_per_node(job)} task(s)"
    )


def _launch(job: PretrainJob, config_file: str, export: bool) -> int:
    """Run the stage on this machine with ``job.executor`` (inline or local)."""
    if job.executor.kind is ExecutorKind.inline:  # one rank: of torchrun, srun (pretrain.sbatch) or alone
        from rnnpipe.launch.stages.rank import run_rank, start_rank

        code = run_rank(stage_config(job), start_rank(), job.distributed.timeout_min)
        rank0 = _is_rank0()
    else:
        from rnnpipe.launch.processes.local import launch_local

        code = launch_local(config_file, job.distributed.nproc)
        rank0 = True
    if code == 0 and export and rank0:
        export_final(stage_config(job))
    return code


def run(job: PretrainJob, decision: Decision) -> None:
    """The pipeline's pretrain stage on this machine: train, then export."""
    from rnnpipe.launch.processes.distributed import quiet_deepspeed

    quiet_deepspeed()  # (the export loads DeepSpeed in this process; inline, so does the training)
    with _run_lock(job):
        if not plan(job).run:  # finished meanwhile (by another launch): nothing to redo
            return
        if decision.clear:
            clear_run(job.run_dir)
        code = _launch(job, write_config(job), export=True)
    if code == EXIT_INTERRUPTED:  # Ctrl-C: the pipeline stops as it does on Ctrl-C anywhere (130)
        log.warning("%s", summary.stopped_message(job.run_dir, code))
        raise KeyboardInterrupt
    if code:
        raise PipelineError(summary.stopped_message(job.run_dir, code).replace("same command", "pipeline"))


def _run_lock(job: PretrainJob) -> contextlib.AbstractContextManager[None]:
    """The run dir's lock for this launch, held from the plan to the end of the local launch (or
    the Slurm submission), so that a second launch fails before it writes anything; the ranks
    started here inherit it. A rank other than 0 of an inline launch holds nothing."""
    from rnnpipe.pipeline.locking import exclusive
    from rnnpipe.pipeline.train.checkpoint import RUN_LOCK

    if job.executor.kind is ExecutorKind.inline and not _is_rank0():
        return contextlib.nullcontext()
    return exclusive(job.run_dir, RUN_LOCK, "pretrain")


def command(job: PretrainJob, wait: bool = False, export: bool = False) -> int:
    """``rnnpipe pretrain``: preflight and the resume check (exit 2 before any rank starts), then
    ``config.yaml`` and the launch, and a summary of the run. Returns the exit status (0; 75 or 130
    after a signal)."""
    from rnnpipe.launch.processes.distributed import quiet_deepspeed

    quiet_deepspeed()  # (the export loads DeepSpeed in this process; inline, so does the training)
    prepared(job)
    check(job)
    multi_inline = job.executor.kind is ExecutorKind.inline and world_size(job) > 1
    plan(job)  # a refusal (exit 2) leaves the run dir untouched: before the lock file is written
    with _run_lock(job):
        decision = plan(job)  # again, holding the run dir: what it holds now
        if not decision.run:
            print(f"pretrain: {decision.reason}; nothing to do")
            if _is_rank0():
                print(_summary(job, 0, export=True, nothing_to_do=True))
            return 0
        if decision.clear and multi_inline:
            raise ConfigError(
                "overwrite=true with an inline launch of several ranks: every rank would clear the run "
                "dir at once. Remove it by hand, or launch with --executor local or slurm"
            )
        if multi_inline and not _is_rank0():
            config_file = os.path.join(job.run_dir, "config.yaml")
        else:
            if decision.clear:
                clear_run(job.run_dir)
            log.info("pretrain: %s", decision.reason)
            config_file = write_config(job)
        if job.executor.kind is not ExecutorKind.slurm:
            started, start_step = time.time(), summary.checkpoint_step(job.run_dir)
            code = _launch(job, config_file, export)
            if job.executor.kind is not ExecutorKind.inline or _is_rank0():
                if code:
                    print(f"rnnpipe: {summary.stopped_message(job.run_dir, code)}", file=sys.stderr)
                print(_summary(job, code, export, wall_s=time.time() - started, start_step=start_step))
            return code
        from rnnpipe.launch.processes.snapshot import take

        stop = early()
        stop.restore()  # nothing trains here: Ctrl-C stops the submission (or --wait) as usual
        if stop:  # came during the preflight: submit nothing
            return stop.exit_status()
        folder = os.path.join(job.run_dir, "slurm")
        started, start_step = time.time(), summary.checkpoint_step(job.run_dir)
        sjob = _submit_job(job, folder, "", take(folder), export)
        # Until the job's rank 0 holds the run dir, this record keeps a second launch out.
        record.record(folder, NAME, {"job_id": str(sjob.job_id), "submitted_at": time.time()})
    # (the lock is the job's now: its rank 0 takes it when it starts)
    print(
        f"submitted Slurm job {sjob.job_id}: {job.distributed.nodes} node(s) × {tasks_per_node(job)} "
        f"task(s); logs in {job.run_dir}/slurm" + ("; Ctrl-C stops the waiting, not the job" if wait else "")
    )
    if not wait:
        return 0
    codes = sjob.results()
    code = EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0
    # (rank 0 wrote the run dir on the cluster's shared file system; the time includes the queue)
    wall = {"wall_s": time.time() - started, "wall_what": "since submission"}
    print(_summary(job, code, export, start_step=start_step, **wall))
    return code


def _summary(job: PretrainJob, code: int, export: bool, **kw: Any) -> str:
    """The launch's closing summary (:func:`rnnpipe.launch.stages.summary.summary`)."""
    out = export_dir(stage_config(job)) if export and code == 0 else None
    return summary.summary(job.run_dir, code, job.train.steps, export=out, **kw)
