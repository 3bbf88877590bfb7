"""``rnnpipe plan PIPELINE``: the pipeline for ``slurm/pipeline.sh`` (plain sbatch), as bash
assignments: each stage's resolved config file, whether it is complete, and its sbatch options —
derived from the same configs, with the same code, as ``rnnpipe run --executor slurm``.
"""

from __future__ import annotations

from launch.finetune import grid_jobs
from launch.pipeline import Pipeline, begin_submission, record
from launch.pretrain import tasks_per_node
from launch.slurm import sbatch_flags, shell_array, shell_var
from pipeline import fsio

FINETUNE_SIGNAL_S = 90  # fine-tune array tasks: USR2 this long before the limit (submitit's default)


def shell_plan(p: Pipeline) -> str:
    """Bash assignments for ``slurm/pipeline.sh``: each stage's config file, whether it is complete,
    and its sbatch options derived from the same configs as :func:`submit_slurm`. Every value is
    shell-quoted: the script evaluates this text. Like ``run``, it starts a new record of the
    run (refused while the last submission's jobs are going); the script adds its job ids."""
    done = begin_submission(p)
    for stage, complete in (("prepare", done["prepare"]), ("pretrain", done["pretrain"])):
        if complete:
            record(p.run_dir, stage, {"state": "SKIPPED", "detail": "complete"})
    if p.finetune is not None and not done["finetune"]:
        record(p.run_dir, "finetune", {"state": "SKIPPED", "detail": "every job complete"})
    logs = fsio.join(p.run_dir, "logs")
    fsio.makedirs(logs)
    small = p.cfg.slurm
    d, pre = p.pretrain.distributed, p.pretrain.executor.slurm
    lines = [
        shell_var("RUN_DIR", p.run_dir),
        shell_var("PREPARE_DONE", int(done["prepare"])),
        shell_var("PREPARE_CONFIG", p.stage_file("prepare")),
        shell_var("PREPARE_SETUP", "\n".join(small.setup)),
        shell_array(
            "PREPARE_SBATCH",
            ["--job-name=rnnpipe-prepare", *sbatch_flags(small, output=f"{logs}/prepare-%j.out")],
        ),
        shell_var("PRETRAIN_DONE", int(done["pretrain"])),
        shell_var("PRETRAIN_CONFIG", p.stage_file("pretrain")),
        shell_var("PRETRAIN_SETUP", "\n".join(pre.setup)),
        shell_array(
            "PRETRAIN_SBATCH",
            [
                "--job-name=rnnpipe-pretrain",
                *sbatch_flags(
                    pre,
                    nodes=d.nodes,
                    ntasks_per_node=tasks_per_node(p.pretrain),
                    gpus_per_node=d.gpus_per_node,
                    signal=f"USR2@{d.signal_grace_s}",
                    requeue=True,
                    output=f"{logs}/pretrain-%j.out",
                ),
            ],
        ),
    ]
    if p.finetune is not None:
        ft = p.finetune.executor.slurm
        names, todo = grid_jobs(p.finetune)
        lines += [
            shell_var("FINETUNE_INDICES", ",".join(map(str, todo))),
            shell_var("FINETUNE_CONFIG", p.stage_file("finetune")),
            shell_var("FINETUNE_DIR", p.finetune.out_dir),
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
