"""``rnnpipe plan PIPELINE``: the pipeline for ``slurm/pipeline.sh`` (plain sbatch), as bash
assignments: for each stage, its resolved config file, whether it runs, its sbatch options and
script, and the code snapshot its jobs run. All of it comes from the same configs, the same plan
(:func:`rnnpipe.launch.chain.workflow.decide`) and each stage's one ``slurm_shape`` as
``rnnpipe run --executor slurm``: a stage added to the pipeline reaches pipeline.sh with no change
here or there.
"""

from __future__ import annotations

import time
from typing import Any

from rnnpipe.launch.chain.workflow import Pipeline, Step, decide, write_stage_files
from rnnpipe.launch.processes import record
from rnnpipe.launch.processes.slurm import shell_array, shell_var
from rnnpipe.launch.processes.snapshot import take
from rnnpipe.launch.stages.stage import SlurmShape
from rnnpipe.pipeline import fsio


def _stage_lines(p: Pipeline, i: int, step: Step, shape: SlurmShape, logs: str) -> list[str]:
    """``STAGE_<i>_*``: what pipeline.sh needs to submit stage ``i`` (every value quoted)."""
    v = f"STAGE_{i}_"
    name = step.name
    # The script takes the stage's resolved config; collect reads the fine-tune stage's.
    config = p.stage_file(shape.config_stage or name)
    array = ""
    if shape.array and step.decision.run:
        array = ",".join(map(str, step.decision.todo)) + f"%{shape.resources.array_parallelism}"
    log = f"{logs}/{name}-%A_%a.out" if shape.array else f"{logs}/{name}-%j.out"
    return [
        shell_var(v + "NAME", name),
        shell_var(v + "RUN", int(step.decision.run)),
        shell_var(v + "CONFIG", config),
        shell_var(v + "SCRIPT", shape.script),
        shell_var(v + "SETUP", "\n".join(shape.resources.setup)),
        shell_var(v + "LOG", log),
        shell_var(v + "ARRAY", array),
        shell_array(v + "SBATCH", shape.sbatch_options(name, logs)),
        shell_array(v + "TASKS", shape.tasks),  # an array's task names, by index (the run record)
    ]


def shell_plan(p: Pipeline) -> str:
    """Bash assignments for ``slurm/pipeline.sh``: ``RUN_DIR``, ``CODE`` (the snapshot of the code
    the jobs run: its ``bin/rnnpipe`` and ``rnnpipe/slurm/``), ``STAGES`` (the stage names in order)
    and, for stage ``i``, ``STAGE_<i>_{NAME,RUN,CONFIG,SCRIPT,SETUP,LOG,ARRAY,SBATCH,TASKS}``. Every
    value is shell-quoted: the script evaluates this text. Like ``run``, it checks and plans every
    stage first and starts a new record of the run (refused while the last submission's jobs are
    going); the script adds its job ids."""
    decide(p)  # every refusal comes before the run dir is touched
    with record.lock(p.run_dir):
        record.refuse_if_busy(p.run_dir)
        steps = decide(p)
        write_stage_files(p)
        folder = fsio.join(p.run_dir, "slurm", time.strftime("%Y%m%d-%H%M%S"))
        code = take(folder)
        record.begin(p.run_dir, "slurm", code={"path": code.path, "digest": code.digest})
        for step in steps:
            if not step.decision.run:
                record.record(p.run_dir, step.name, {"state": "SKIPPED", "detail": step.decision.reason})
            else:  # what the job will find when it starts (pretrain: its config, no run to replace)
                stage_in: Any = getattr(step.stage, "stage_in", None)
                if stage_in is not None:
                    stage_in(step.job, step.decision)
    logs = fsio.join(p.run_dir, "logs")
    fsio.makedirs(logs)
    lines = [
        shell_var("RUN_DIR", p.run_dir),
        shell_var("CODE", code.path),
        shell_array("STAGES", [s.name for s in steps]),
    ]
    for i, step in enumerate(steps):
        shape = step.stage.slurm_shape(step.job, p.cfg.slurm)
        lines += _stage_lines(p, i, step, shape, logs)
    return "\n".join(lines) + "\n"
