"""The ``rnnpipe`` command.

    rnnpipe prepare CONFIG [key.sub=value ...] [--executor inline|local|slurm] [--print-config]
    rnnpipe pretrain CONFIG [key.sub=value ...] [--executor inline|local|slurm] [--wait]
    rnnpipe export RUN_OR_CHECKPOINT OUT
    rnnpipe finetune SWEEP [key.sub=value ...] [--executor inline|local|slurm] [--print-config]
    rnnpipe collect DIR
    rnnpipe verify DIR [--quick]

Exit status: 0 done, 1 the data or a task failed (the message says which file, shard or task),
2 the command line or config is wrong (the message names the key), 75 pretrain checkpointed on a
signal (SIGUSR2/SIGTERM) and should be run again (requeued) to continue.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field

from launch.executors import ExecutorConfig, make_executor
from pipeline import __version__, fsio
from pipeline.config import base_config, load_config, to_yaml
from pipeline.data.config import PrepareConfig
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("rnnpipe")


@dataclass
class PrepareJob(PrepareConfig):
    """A prepare config plus how to run it; the stage itself never sees ``executor``."""

    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


def _stage_config(job: PrepareJob) -> PrepareConfig:
    return base_config(job, PrepareConfig)


def _load_job(schema: type, args: argparse.Namespace):
    """The job config from CONFIG, overrides and --executor; None after --print-config printed it."""
    overrides = list(args.overrides) + ([f"executor.kind={args.executor}"] if args.executor else [])
    job = load_config(schema, args.config, overrides)
    if args.print_config:
        print(to_yaml(job), end="")
        return None
    return job


def _write_config(directory: str, job: object) -> None:
    """The resolved job config as ``config.yaml`` in the stage's output directory."""
    fsio.makedirs(directory)
    fsio.write_text_atomic(fsio.join(directory, "config.yaml"), to_yaml(job))


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.data.prepare import prepare

    job = _load_job(PrepareJob, args)
    if job is None:
        return 0
    text = to_yaml(job)
    stage = _stage_config(job)
    root = fsio.absolute(stage.output)
    work = fsio.absolute(stage.work_dir) if stage.work_dir else fsio.join(root, ".work")
    with make_executor(job.executor, fsio.join(work, "slurm")) as executor:
        manifest = prepare(stage, executor, config_yaml=text)
    for split, info in manifest["splits"].items():
        print(
            f"{split}: {info['tokens']:,} tokens, {info['bytes']:,} bytes, {info['documents']:,} documents, "
            f"{info['samples']:,} samples in {len(info['shards'])} shard(s)"
        )
    print(f"dataset: {root}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.data.manifest import read_manifest, verify

    problems = verify(args.dir, deep=not args.quick)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    manifest = read_manifest(args.dir)
    n = sum(len(s["shards"]) for s in manifest["splits"].values())
    print(f"{args.dir}: OK ({n} shards, {', '.join(manifest['splits'])})")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from launch.executors import ExecutorKind
    from launch.pretrain import PretrainJob, launch

    job = _load_job(PretrainJob, args)
    if job is None:
        return 0
    job.run_dir = fsio.absolute(job.run_dir)
    job.data.path = fsio.absolute(job.data.path)
    launcher = job.executor.kind is not ExecutorKind.inline
    if launcher or os.environ.get("RANK", "0") == "0":
        _write_config(job.run_dir, job)
    argv = ["pretrain", args.config, *args.overrides]
    code = launch(job, argv, wait=args.wait)
    if code and launcher:
        print(
            f"rnnpipe: pretrain checkpointed on a signal (exit status {code}); run it again to continue",
            file=sys.stderr,
        )
    return code


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.train.export import export

    out = export(args.source, args.out)
    print(f"exported to {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from launch.executors import ExecutorKind, TasksFailed
    from launch.finetune import FinetuneJob, stage_config
    from pipeline.finetune.collect import collect
    from pipeline.finetune.sweep import run_sweep

    job = _load_job(FinetuneJob, args)
    if job is None:
        return 0
    sweep = stage_config(job)
    sweep.out_dir = fsio.absolute(sweep.out_dir)
    _write_config(sweep.out_dir, job)
    if job.executor.kind is ExecutorKind.local and "OMP_NUM_THREADS" not in os.environ:
        # Each worker process trains one job: share the cores instead of oversubscribing them.
        workers = job.executor.workers or len(os.sched_getaffinity(0))
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))
    failed: TasksFailed | None = None
    with make_executor(job.executor, fsio.join(sweep.out_dir, "slurm"), requeue=True) as executor:
        try:
            results, skipped = run_sweep(sweep, executor)
            print(f"finetune: {len(results) - skipped} job(s) run, {skipped} already complete")
        except TasksFailed as e:
            failed = e
    try:
        md, _ = collect(sweep.out_dir)
        print(md, end="")
        print(f"results: {fsio.join(sweep.out_dir, 'results.md')}")
    except PipelineError:
        if failed is None:
            raise
    if failed is not None:
        raise failed
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from pipeline.finetune.collect import collect

    md, rows = collect(args.dir)
    print(md, end="")
    print(f"{len(rows)} row(s) written to {fsio.join(fsio.absolute(args.dir), 'results.md')} and results.csv")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnpipe", description="Pretraining pipeline for recurrent LMs.")
    parser.add_argument("--version", action="version", version=f"rnnpipe {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prepare",
        help="shard a corpus into webdataset tars",
        description="Tokenize a corpus (enwik8, a Wikipedia dump, text) into shards.",
    )
    p.add_argument("config", help="YAML config (see configs/prepare/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. tokenizer.vocab_size=4096")
    p.add_argument("--executor", choices=["inline", "local", "slurm"], help="overrides executor.kind")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser(
        "pretrain",
        help="train a language model on a prepared dataset",
        description="Pretrain an LM with DeepSpeed (stateful TBPTT or shuffled windows).",
    )
    t.add_argument("config", help="YAML config (see configs/pretrain/)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=2000")
    t.add_argument("--executor", choices=["inline", "local", "slurm"], help="overrides executor.kind")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--wait", action="store_true", help="slurm: wait for the job to end")
    t.set_defaults(func=cmd_pretrain)

    e = sub.add_parser("export", help="a pretrain checkpoint as one fp32 safetensors file")
    e.add_argument(
        "source", help="a pretrain run directory (its latest checkpoint) or a checkpoint directory"
    )
    e.add_argument("out", help="directory to write model.safetensors, config.json and tokenizer/ into")
    e.set_defaults(func=cmd_export)

    f = sub.add_parser(
        "finetune",
        help="run a fine-tuning sweep (tasks × hyper-parameters × seeds × init)",
        description="Expand a sweep's grid into fine-tuning jobs and run them; re-runs skip finished jobs.",
    )
    f.add_argument("config", help="YAML sweep config (see configs/finetune/)")
    f.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. job.max_steps=100")
    f.add_argument("--executor", choices=["inline", "local", "slurm"], help="overrides executor.kind")
    f.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    f.set_defaults(func=cmd_finetune)

    c = sub.add_parser("collect", help="aggregate a sweep's result.json files into a table")
    c.add_argument("dir", help="a sweep's out_dir (result.json files are found at any depth)")
    c.set_defaults(func=cmd_collect)

    v = sub.add_parser("verify", help="check a dataset's shards against its manifest")
    v.add_argument("dir", help="dataset root (holding manifest.json)")
    v.add_argument("--quick", action="store_true", help="sizes and hashes only, do not re-read samples")
    v.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come before or after --flags: take the leftover key=value words as overrides.
    bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"rnnpipe: config error: {e}", file=sys.stderr)
        return 2
    except PipelineError as e:
        print(f"rnnpipe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rnnpipe: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
