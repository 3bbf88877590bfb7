"""The executor layer: results in order, failures named, the rest still run; Slurm parameters."""

from __future__ import annotations

import pytest
from helpers_tasks import die_on_two, square_or_fail

from rnnpipe.launch.processes.executors import (
    ExecutorConfig,
    ExecutorKind,
    InlineExecutor,
    LocalExecutor,
    SlurmConfig,
    SlurmExecutor,
    TasksFailed,
    make_executor,
)
from rnnpipe.pipeline.errors import PipelineError


@pytest.mark.parametrize("make", [InlineExecutor, lambda: LocalExecutor(2)])
def test_results_in_order_and_failures_reported(make):
    with make() as ex:
        assert ex.map(square_or_fail, [5, 1, 4, 2], name="sq") == [25, 1, 16, 4]
        with pytest.raises(TasksFailed) as e:
            ex.map(square_or_fail, [1, 3, 2, 3], name="sq", weights=[1, 3, 2, 3])
    assert [label for label, _ in e.value.failures] == ["3", "3"]
    assert "2 of 4 sq task(s) failed" in str(e.value) and "three is not allowed" in str(e.value)


def test_a_killed_worker_is_reported_and_the_pool_recovers():
    with LocalExecutor(2) as ex:
        with pytest.raises(TasksFailed) as e:
            ex.map(die_on_two, [1, 2, 3], name="die")
        assert "a worker process died" in str(e.value)
        assert ex.map(square_or_fail, [2, 4], name="again") == [4, 16]


def test_slurm_executor_passes_resources_to_submitit(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    cfg = SlurmConfig(
        partition="gpu",
        account="lab",
        qos="high",
        constraint="a100",
        cpus_per_task=8,
        mem_gb=32,
        time_min=90,
        array_parallelism=16,
        extra={"mail-type": "FAIL"},
        setup=["module load cuda"],
    )
    params = SlurmExecutor(cfg, str(tmp_path)).slurm_parameters("pack")
    # submitit's own sbatch rendering (the same keywords its SlurmExecutor takes; no cluster needed).
    text = _make_sbatch_string(command="python -m x", folder=str(tmp_path), map_count=40, **params)
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab",
        "#SBATCH --qos=high",
        "#SBATCH --constraint=a100",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --time=90",
        "#SBATCH --array=0-39%16",
        "#SBATCH --job-name=rnnpipe-pack",
        "#SBATCH --mail-type=FAIL",
        "module load cuda",
    ):
        assert line in text


def test_slurm_executor_without_slurm_says_so(tmp_path):
    import shutil

    if shutil.which("srun"):
        pytest.skip("this machine has Slurm")
    with pytest.raises(PipelineError, match="no Slurm"):
        SlurmExecutor(SlurmConfig(), str(tmp_path)).submitit_executor("x")


def test_make_executor_follows_config(tmp_path):
    assert isinstance(make_executor(ExecutorConfig(kind=ExecutorKind.inline), str(tmp_path)), InlineExecutor)
    local = make_executor(ExecutorConfig(kind=ExecutorKind.local, workers=3), str(tmp_path))
    assert isinstance(local, LocalExecutor) and local.workers == 3
    slurm = make_executor(ExecutorConfig(kind=ExecutorKind.slurm), str(tmp_path / "logs"))
    assert isinstance(slurm, SlurmExecutor) and slurm.log_dir == str(tmp_path / "logs")


def test_an_array_task_runs_all_its_items_then_fails_naming_the_failed_ones(capsys):
    """On Slurm a failed item makes its array task exit non-zero (sacct: FAILED, afterok unmet);
    the submitting side still names each failed item with its own error."""
    from rnnpipe.launch.processes.executors import ChunkFailed, _chunk_failures, _run_chunk

    assert _run_chunk(square_or_fail, [2, 4]) == [4, 16]
    with pytest.raises(ChunkFailed) as e:
        _run_chunk(square_or_fail, [3, 2, 3])
    assert str(e.value).count("task 3 failed:") == 2 and "three is not allowed" in str(e.value)
    assert "task 3 failed:" in capsys.readouterr().err  # the traceback goes to the task's log

    class Job:  # what submitit's job.result() raised, as text
        job_id = "41_7"

        def stderr(self):
            return "log"

    trace = f"Job failed\n----\nTraceback ...\nlaunch.executors.ChunkFailed: {e.value}\n----\nlogs at"
    failures = dict(_chunk_failures(Job(), RuntimeError(trace), [3, 2]))
    assert failures["3"].startswith("job 41_7: ") and "three is not allowed" in failures["3"]
    assert "lost with its array task" in failures["2"]
    killed = dict(_chunk_failures(Job(), RuntimeError("job 41_7 was killed (OUT_OF_MEMORY)"), [5]))
    assert "OUT_OF_MEMORY" in killed["5"] and killed["5"].endswith("log")
