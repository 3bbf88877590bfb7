"""``rnnpipe plan PIPELINE``: the pipeline for ``slurm/pipeline.sh`` (plain sbatch), as bash
assignments: each stage's resolved config file, whether it runs, its sbatch options, and the code
snapshot its jobs run — derived from the same configs and the same plan
(:func:`rnnpipe.launch.workflow.decide`) as ``rnnpipe run --executor slurm``.
"""

from __future__ import annotations

import time

from rnnpipe.launch import record
from rnnpipe.launch.pretrain import clear_run, tasks_per_node, write_config
from rnnpipe.launch.slurm import sbatch_flags, shell_array, shell_var
from rnnpipe.launch.snapshot import take
from rnnpipe.launch.workflow import Pipeline, decide, write_stage_files
from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.errors import ConfigError

FINETUNE_SIGNAL_S = 90  # fine-tune array tasks: USR2 this long before the limit (submitit's default)


def shell_plan(p: Pipeline) -> str:
    """Bash assignments for ``slurm/pipeline.sh``: each stage's config file, whether it runs (its
    ``*_DONE`` is 1 when it is skipped), its sbatch options, and ``CODE``, the snapshot of the code
    the jobs run (its ``bin/rnnpipe`` and ``rnnpipe/slurm/``). Every value is shell-quoted: the script
    evaluates this text. Like ``run``, it checks and plans every stage first and starts a new
    record of the run (refused while the last submission's jobs are going); the script adds its
    job ids."""
    if p.cfg.backward_lm:
        raise ConfigError(
            "backward_lm: slurm/pipeline.sh chains prepare, pretrain and finetune only; "
            "run a pipeline with a backward LM with rnnpipe run --executor slurm"
        )
    decide(p)  # every refusal comes before the run dir is touched
    with record.lock(p.run_dir):
        record.refuse_if_busy(p.run_dir)
        steps = {s.name: s for s in decide(p)}
        write_stage_files(p)
        folder = fsio.join(p.run_dir, "slurm", time.strftime("%Y%m%d-%H%M%S"))
        code = take(folder)
        record.begin(p.run_dir, "slurm", code={"path": code.path, "digest": code.digest})
        for name, step in steps.items():
            if not step.decision.run:
                record.record(p.run_dir, name, {"state": "SKIPPED", "detail": step.decision.reason})
        pre_step = steps["pretrain"]
        if pre_step.decision.run:  # what the job will find: the config, and no run to replace
            if pre_step.decision.clear:
                clear_run(p.jobs["pretrain"].run_dir)
            write_config(p.jobs["pretrain"])
    logs = fsio.join(p.run_dir, "logs")
    fsio.makedirs(logs)
    small = p.cfg.slurm
    pre = p.jobs["pretrain"]
    d, pre_slurm = pre.distributed, pre.executor.slurm
    lines = [
        shell_var("RUN_DIR", p.run_dir),
        shell_var("CODE", code.path),
        shell_var("PREPARE_DONE", int(not steps["prepare"].decision.run)),
        shell_var("PREPARE_CONFIG", p.stage_file("prepare")),
        shell_var("PREPARE_SETUP", "\n".join(small.setup)),
        shell_array(
            "PREPARE_SBATCH",
            ["--job-name=rnnpipe-prepare", *sbatch_flags(small, output=f"{logs}/prepare-%j.out")],
        ),
        shell_var("PRETRAIN_DONE", int(not pre_step.decision.run)),
        shell_var("PRETRAIN_CONFIG", p.stage_file("pretrain")),
        shell_var("PRETRAIN_SETUP", "\n".join(pre_slurm.setup)),
        shell_array(
            "PRETRAIN_SBATCH",
            [
                "--job-name=rnnpipe-pretrain",
                *sbatch_flags(
                    pre_slurm,
                    nodes=d.nodes,
                    ntasks_per_node=tasks_per_node(pre),
                    gpus_per_node=d.gpus_per_node,
                    signal=f"USR2@{d.signal_grace_s}",
                    requeue=True,
                    output=f"{logs}/pretrain-%j.out",
                ),
            ],
        ),
    ]
    if "finetune" in steps:
        ft = p.jobs["finetune"].executor.slurm
        fine = steps["finetune"].decision
        from rnnpipe.launch.finetune import grid
        from rnnpipe.pipeline.finetune.sweep import job_label

        names = [job_label(j) for j in grid(p.jobs["finetune"])]
        lines += [
            shell_var("FINETUNE_INDICES", ",".join(map(str, fine.todo)) if fine.run else ""),
            shell_var("FINETUNE_CONFIG", p.stage_file("finetune")),
            shell_var("FINETUNE_DIR", p.jobs["finetune"].out_dir),
            shell_var("FINETUNE_SETUP", "\n".join(ft.setup)),
            shell_array("FINETUNE_TASKS", names),
            shell_array(
                "FINETUNE_SBATCH",
                [
                    "--job-name=rnnpipe-finetune",
                    *sbatch_flags(
                        ft,
                        signal=f"B:USR2@{FINETUNE_SIGNAL_S}",
                        requeue=True,
                        output=f"{logs}/finetune-%A_%a.out",
                    ),
                ],
            ),
            shell_var("FINETUNE_PARALLELISM", ft.array_parallelism),
            shell_var("COLLECT_DONE", int(not steps["collect"].decision.run)),
            shell_var("COLLECT_SETUP", "\n".join(small.setup)),
            shell_array(
                "COLLECT_SBATCH",
                ["--job-name=rnnpipe-collect", *sbatch_flags(small, output=f"{logs}/collect-%j.out")],
            ),
        ]
    else:
        lines.append(shell_var("FINETUNE_INDICES", ""))
        lines.append(shell_var("FINETUNE_CONFIG", ""))
    return "\n".join(lines) + "\n"
