"""The ``rnnpipe`` command.

    rnnpipe prepare CONFIG [key.sub=value ...] [--executor inline|local|slurm] [--print-config]
    rnnpipe pretrain CONFIG [key.sub=value ...] [--executor inline|local|slurm] [--wait] [--export]
    rnnpipe export RUN_OR_CHECKPOINT OUT [--backward BACKWARD_RUN_OR_EXPORT]   (or --out OUT)
    rnnpipe evaluate EXPORT [eval.key=value ...] [--data D] [--split S] [--json F]
    rnnpipe sample EXPORT_OR_RUN_DIR [--prompt TEXT | --prompt-file FILE | < stdin] [-n N] [--seed S]
    rnnpipe plot RUN_DIR... --out FILE.png [--title T]
    rnnpipe finetune SWEEP [key.sub=value ...] [--executor inline|local|slurm] [--only INDEX]
    rnnpipe collect DIR | SWEEP.yaml
    rnnpipe verify DIR [--quick]
    rnnpipe run PIPELINE [key=value | stage.key=value ...] [--executor local|slurm] [--wait] [--dry-run]
    rnnpipe status RUN_DIR [--wait]
    rnnpipe plan PIPELINE [overrides]      (for slurm/pipeline.sh)
    rnnpipe configs [NAME] [--copy DIR] [--slurm-dir]

CONFIG, SWEEP and PIPELINE name a YAML file, or a config shipped with rnnpipe by its name
(``rnnpipe pretrain tiny-lrn``, ``rnnpipe run quickstart``; ``rnnpipe configs`` lists them).

Exit status: 0 done, 1 the data or a task failed (the message says which file, shard or task),
2 the command line or config is wrong, or a check before any work refused it (the message names
the key or path: a missing dataset, a run dir holding another model), 75 pretrain checkpointed on
a signal (SIGUSR2/SIGTERM) and should be run again (requeued) to continue.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from rnnpipe import __version__
from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import load_config, to_yaml
from rnnpipe.pipeline.engine.signals import early, wants_early_flag
from rnnpipe.pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("rnnpipe")


def _load_job(schema: type, args: argparse.Namespace):
    """The job config from CONFIG, overrides and --executor; None after --print-config printed it."""
    overrides = list(args.overrides) + ([f"executor.kind={args.executor}"] if args.executor else [])
    job = load_config(schema, args.config, overrides)
    if args.print_config:
        print(to_yaml(job), end="")
        return None
    return job


def cmd_prepare(args: argparse.Namespace) -> int:
    from rnnpipe.launch.stages import prepare

    job = _load_job(prepare.PrepareJob, args)
    if job is None:
        return 0
    prepare.check(job)
    prepare.run(job)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from rnnpipe.pipeline.data.manifest import read_manifest, verify

    problems = verify(args.dir, deep=not args.quick)
    if len(problems) == 1:
        print(f"rnnpipe: error: {args.dir}: {problems[0]}", file=sys.stderr)
        return 1
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
    from rnnpipe.launch.stages import pretrain

    job = _load_job(pretrain.PretrainJob, args)
    if job is None:
        return 0
    return pretrain.command(job, wait=args.wait, export=args.export)


def cmd_export(args: argparse.Namespace) -> int:
    from rnnpipe.pipeline.train.export import export

    if args.out and args.out_flag and args.out != args.out_flag:
        raise ConfigError(f"two output directories: {args.out} and --out {args.out_flag}; give one")
    out_dir = args.out or args.out_flag
    if not out_dir:
        raise ConfigError("rnnpipe export: name the output directory (OUT or --out OUT)")
    out = export(args.source, out_dir, args.backward)
    print(f"exported to {out}" + (f" (the backward LM in {out}/backward)" if args.backward else ""))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from rnnpipe.launch.commands import sample

    return sample.run(args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rnnpipe.launch.commands import evaluate

    return evaluate.run(args)


def cmd_plot(args: argparse.Namespace) -> int:
    from rnnpipe.launch.commands import plot

    return plot.run(args)


def cmd_finetune(args: argparse.Namespace) -> int:
    from rnnpipe.launch.stages import finetune

    job = _load_job(finetune.FinetuneJob, args)
    if job is None:
        return 0
    if args.only is not None:
        finetune.run_only(job, args.only)
        return 0
    from rnnpipe.launch.stages.stage import Decision

    exported = fsio.exists(fsio.join(fsio.absolute(job.pretrained), "config.json"))
    finetune.check(job, None if exported else {"pretrain": Decision(True, "a run dir: exported first")})
    finetune.run_sweep(job)
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    from rnnpipe.pipeline.finetune.collect import collect

    target = args.dir
    if target.endswith((".yaml", ".yml", ".json")) and fsio.exists(target):  # a sweep: its grid's table
        from rnnpipe.launch.stages import collect as collect_stage
        from rnnpipe.launch.stages.finetune import FinetuneJob

        collect_stage.run(collect_stage.CollectJob(load_config(FinetuneJob, target)))
        return 0
    md, rows = collect(target)
    print(md, end="")
    print(f"{len(rows)} row(s) written to {fsio.join(fsio.absolute(target), 'results.md')} and results.csv")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from rnnpipe.launch.chain import workflow

    p = workflow.load(args.config, list(args.overrides), args.executor)
    if args.print_config:
        print(to_yaml(p.cfg), end="")
        for name in workflow.RESOLVED:
            job = p.jobs.get(name)
            if job is not None:
                print(f"# ---- {name} ----\n{to_yaml(job)}", end="")
        return 0
    if args.dry_run:
        return workflow.dry_run(p)
    if p.cfg.executor.value == "slurm":
        return workflow.submit_slurm(p, wait=args.wait)
    return workflow.run_local(p)


def cmd_plan(args: argparse.Namespace) -> int:
    from rnnpipe.launch.chain import sbatch, workflow

    print(sbatch.shell_plan(workflow.load(args.config, list(args.overrides), "slurm")), end="")
    return 0


def cmd_configs(args: argparse.Namespace) -> int:
    from rnnpipe.launch.processes import shipped

    if args.slurm_dir:
        print(shipped.shipped_dir("slurm"))
        return 0
    if args.copy:
        written = shipped.copy_shipped(args.copy)
        print(f"copied {len(written)} files (configs/ and slurm/) into {args.copy}")
        return 0
    if args.name:
        path = shipped.find_shipped(args.name)
        if path is None:
            raise ConfigError(f"no shipped config named {args.name!r}: `rnnpipe configs` lists them")
        print(f"# {path}\n{path.read_text(encoding='utf-8')}", end="")
        return 0
    configs = shipped.shipped_configs()
    width = max(len(c.name) for c in configs)
    for c in configs:
        print(f"{c.name:<{width}}  {c.summary}")
    print(
        f"({len(configs)} configs in {shipped.shipped_dir('configs')}; name one without a path, e.g. "
        "`rnnpipe pretrain tiny-lrn`)"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rnnpipe.launch.chain import status
    from rnnpipe.launch.processes import record

    run_dir = fsio.absolute(args.run_dir)
    if args.record:
        stage, job_id, logs = args.record
        entry = {
            "job_id": job_id,
            "logs": [logs],
            "after": args.after or "",
            "tasks": args.tasks or [],
            "submitted_at": time.time(),
        }
        record.record(run_dir, stage, entry)
        return 0
    if args.wait:
        from rnnpipe.launch.chain.workflow import wait_for

        return wait_for(run_dir, args.poll)
    return status.show(run_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnpipe", description="Pretraining pipeline for recurrent LMs.")
    parser.add_argument("--version", action="version", version=f"rnnpipe {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging, including DeepSpeed's own messages and the checkpoint conversion's prints",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prepare",
        help="shard a corpus into webdataset tars",
        description="Tokenize a corpus (enwik8, a Wikipedia dump, text) into shards.",
    )
    p.add_argument("config", help="YAML config, or a shipped one's name (rnnpipe configs)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. tokenizer.vocab_size=4096")
    p.add_argument("--executor", choices=["inline", "local", "slurm"], help="overrides executor.kind")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_prepare)

    t = sub.add_parser(
        "pretrain",
        help="train a language model on a prepared dataset",
        description="Pretrain an LM with DeepSpeed (stateful TBPTT or shuffled windows).",
    )
    t.add_argument("config", help="YAML config, or a shipped one's name (rnnpipe configs)")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=2000")
    t.add_argument("--executor", choices=["inline", "local", "slurm"], help="overrides executor.kind")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--wait", action="store_true", help="slurm: wait for the job to end")
    t.add_argument(
        "--export", action="store_true", help="when training is done, export the model to RUN_DIR/export"
    )
    t.set_defaults(func=cmd_pretrain)

    e = sub.add_parser("export", help="a pretrain checkpoint as one fp32 safetensors file")
    e.add_argument(
        "source", help="a pretrain run directory (its latest checkpoint) or a checkpoint directory"
    )
    e.add_argument(
        "out",
        nargs="?",
        help="the export directory: model.safetensors, config.json, rnnpipe.json (provenance), a "
        "model card (README.md) and the files transformers loads",
    )
    e.add_argument("--out", dest="out_flag", metavar="OUT", help="the same as OUT")
    e.add_argument(
        "--backward",
        metavar="BWD",
        help="a data.direction=backward run (its latest checkpoint), checkpoint or export: its export "
        "goes into OUT/backward/ (the ELMo pair; the first source must then be a forward run)",
    )
    e.set_defaults(func=cmd_export)

    sm = sub.add_parser(
        "sample",
        help="generate text from an export or a run dir's latest checkpoint, streamed as it comes",
        description="Read the prompt (--prompt, --prompt-file, or stdin), then print its continuation "
        "token by token.",
    )
    sm.add_argument("source", help="an export directory or a pretrain run directory")
    sm.add_argument("--prompt", help="the text to continue")
    sm.add_argument("--prompt-file", help="read the prompt from this file ('-': stdin)")
    sm.add_argument("-n", "--tokens", type=int, default=200, help="how many tokens to generate (200)")
    sm.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0 takes the likeliest (0.8)"
    )
    sm.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
    sm.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    sm.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a GPU when there is one)")
    sm.set_defaults(func=cmd_sample)

    from rnnpipe.launch.commands.evaluate import add_arguments as add_evaluate_arguments

    ev = sub.add_parser("evaluate", help="an export's static and dynamic evaluation on a dataset split")
    add_evaluate_arguments(ev)
    ev.set_defaults(func=cmd_evaluate)

    pt = sub.add_parser(
        "plot",
        help="loss curves of pretrain runs (bits per byte against tokens seen) as a PNG",
        description="Overlay the train and valid bits per byte of one or more pretrain runs.",
    )
    pt.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="pretrain run directories")
    pt.add_argument("--out", required=True, help="the PNG to write")
    pt.add_argument("--title", help="the figure's title")
    pt.set_defaults(func=cmd_plot)

    f = sub.add_parser(
        "finetune",
        help="run a fine-tuning sweep (tasks × hyper-parameters × seeds × init)",
        description="Expand a sweep's grid into fine-tuning jobs and run them; re-runs skip finished jobs.",
    )
    f.add_argument("config", help="YAML sweep config, or a shipped one's name (rnnpipe configs)")
    f.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. job.max_steps=100")
    f.add_argument("--executor", choices=["inline", "local", "slurm"], help="overrides executor.kind")
    f.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    f.add_argument(
        "--only",
        type=int,
        metavar="INDEX",
        help="run only job INDEX of the grid (0-based, grid order) in this process: a task of an "
        "sbatch array (slurm/finetune.sbatch)",
    )
    f.set_defaults(func=cmd_finetune)

    r = sub.add_parser(
        "run",
        help="run the whole pipeline: prepare → pretrain → finetune → collect",
        description="Chain the stages: on this machine (local), or as Slurm jobs with dependencies "
        "(slurm: submits and returns; --wait to wait). Re-running skips complete stages.",
    )
    r.add_argument("config", help="pipeline YAML, or a shipped one's name (rnnpipe configs)")
    r.add_argument(
        "overrides",
        nargs="*",
        help="key=value for the pipeline, stage.key=value for a stage (pretrain.train.steps=50)",
    )
    r.add_argument("--executor", choices=["local", "slurm"], help="overrides executor")
    r.add_argument("--wait", action="store_true", help="slurm: wait for every job; exit 1 if one failed")
    r.add_argument("--print-config", action="store_true", help="print the resolved configs and exit")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="print every stage with run/skip and why (fingerprints, differing keys); run and submit nothing",
    )
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="the stages of a pipeline run: jobs, states, failures with log tails")
    s.add_argument("run_dir", help="the pipeline's run_dir")
    s.add_argument(
        "--record",
        nargs=3,
        metavar=("STAGE", "JOB_ID", "LOG"),
        help="record a submitted job (slurm/pipeline.sh)",
    )
    s.add_argument("--wait", action="store_true", help="wait until every job has ended; exit 1 if one failed")
    s.add_argument("--poll", type=float, default=10.0, help="with --wait: seconds between looks")
    s.add_argument("--after", help="with --record: the job's dependency")
    s.add_argument("--tasks", nargs="*", help="with --record: the names of an array's tasks, in index order")
    s.set_defaults(func=cmd_status)

    pl = sub.add_parser(
        "plan", help="the pipeline as bash variables for slurm/pipeline.sh (configs, sbatch options)"
    )
    pl.add_argument("config", help="pipeline YAML")
    pl.add_argument("overrides", nargs="*", help="as for run")
    pl.set_defaults(func=cmd_plan)

    c = sub.add_parser("collect", help="aggregate a sweep's result.json files into a table")
    c.add_argument(
        "dir",
        help="a sweep's out_dir (every result.json at any depth), or its YAML (exactly its grid's results)",
    )
    c.set_defaults(func=cmd_collect)

    cf = sub.add_parser(
        "configs",
        help="the configs shipped with rnnpipe: list them, print one, or copy them (and slurm/) to edit",
        description="Every command that takes a config file also takes a shipped config's name.",
    )
    cf.add_argument("name", nargs="?", help="print this config (pretrain/tiny-lrn, or tiny-lrn when unique)")
    cf.add_argument("--copy", metavar="DIR", help="copy configs/ and slurm/ into DIR (an empty directory)")
    cf.add_argument("--slurm-dir", action="store_true", help="print the folder of the shipped sbatch scripts")
    cf.set_defaults(func=cmd_configs)

    v = sub.add_parser("verify", help="check a dataset's shards against its manifest")
    v.add_argument("dir", help="dataset root (holding manifest.json)")
    v.add_argument("--quick", action="store_true", help="sizes and hashes only, do not re-read samples")
    v.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    if wants_early_flag(sys.argv[1:] if argv is None else argv):
        early()  # before anything heavy loads: a signal during start-up is kept (exit 75/130)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come before or after --flags: take the leftover key=value words as overrides.
    bad = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.verbose:  # ranks and Slurm jobs started from here log at the same level
        os.environ["RNNPIPE_LOG_LEVEL"] = "DEBUG"
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.verbose:  # fsspec logs every file it opens at DEBUG: one line per shard read
        logging.getLogger("fsspec").setLevel(logging.INFO)
    from rnnpipe.launch.processes.distributed import quiet_deepspeed

    quiet_deepspeed()  # before DeepSpeed loads (export, fine-tune): its warnings go below our level
    try:
        if args.command in ("prepare", "pretrain", "finetune", "run", "plan"):
            from rnnpipe.launch.processes.shipped import resolve_config

            args.config = resolve_config(args.config, "run" if args.command == "plan" else args.command)
        return args.func(args)
    except ConfigError as e:
        print(f"rnnpipe: config error: {e}", file=sys.stderr)
        return 2
    except PipelineError as e:
        print(f"rnnpipe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Prepare keeps its finished pieces and a pipeline its finished stages: both resume.
        # (Training does not get here: it checkpoints on Ctrl-C and says so itself.)
        print("rnnpipe: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
