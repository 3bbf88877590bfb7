"""The ``rnnpipe`` command.

    rnnpipe prepare CONFIG [key.sub=value ...] [--executor inline|local|slurm] [--print-config]
    rnnpipe verify DIR [--quick]

Exit status: 0 done, 1 the data or a task failed (the message says which file, shard or task),
2 the command line or config is wrong (the message names the key).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass, field

from launch.executors import ExecutorConfig, make_executor
from pipeline import __version__, fsio
from pipeline.config import load_config, to_yaml
from pipeline.data.config import PrepareConfig
from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("rnnpipe")


@dataclass
class PrepareJob(PrepareConfig):
    """A prepare config plus how to run it; the stage itself never sees ``executor``."""

    executor: ExecutorConfig = field(default_factory=ExecutorConfig)


def _stage_config(job: PrepareJob) -> PrepareConfig:
    return PrepareConfig(**{f.name: getattr(job, f.name) for f in dataclasses.fields(PrepareConfig)})


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.data.prepare import prepare

    overrides = list(args.overrides) + ([f"executor.kind={args.executor}"] if args.executor else [])
    job = load_config(PrepareJob, args.config, overrides)
    text = to_yaml(job)
    if args.print_config:
        print(text, end="")
        return 0
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
