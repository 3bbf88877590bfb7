"""What a user sees: DeepSpeed's own messages below rnnpipe's level (unless -v), evaluation progress,
and the summary ``rnnpipe pretrain`` ends with. The end-to-end check (a real two-rank launch's output)
is in tests/integration/train/test_pretrain.py, test_resume_after_kill_9_gives_the_same_losses."""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import REPO, prepare

from rnnpipe.launch.processes import distributed
from rnnpipe.launch.stages.summary import read_run, summary
from rnnpipe.pipeline.engine.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED

TEXT = REPO / "configs" / "prepare" / "tinyshakespeare.yaml"


def write_metrics(run_dir: Path, lines: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))


def train_line(step: int, tokens: int) -> dict:
    return {
        "step": step,
        "time": 1000.0 + step,
        "train/loss": 1.0,
        "train/bpb": 1.4,
        "train/tokens_seen": tokens,
    }


def split_line(split: str, step: int, bpb: float) -> dict:
    return {
        "step": step,
        "time": 2000.0 + step,
        f"{split}/loss": bpb,
        f"{split}/bpb": bpb,
        f"{split}/ppl": 3.0,
    }


def checkpoint(run_dir: Path, step: int) -> None:
    tag = f"step{step:08d}"
    (run_dir / "checkpoints" / tag).mkdir(parents=True)
    (run_dir / "checkpoints" / tag / "COMPLETE").write_text(json.dumps({"step": step, "world": 2}))
    (run_dir / "checkpoints" / "latest").write_text(tag)


# ------------------------------------------------------------------------------------ summary


def test_summary_of_a_finished_run(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(
        run_dir,
        [
            train_line(10, 20480),
            split_line("valid", 10, 2.45),
            train_line(20, 40960),
            split_line("valid", 20, 2.40),  # the best: during training, on valid's first tokens
            train_line(30, 61440),
            split_line("valid", 30, 2.50),  # the final evaluation, whole valid, then test
            split_line("test", 30, 2.60),
        ],
    )
    checkpoint(run_dir, 30)
    (run_dir / "tensorboard").mkdir()
    (run_dir / "export").mkdir()
    rec = read_run(run_dir)
    assert (rec.step, rec.tokens_seen, rec.best_valid, rec.last) == (
        30,
        61440,
        (20, 2.40),
        {"valid": 2.50, "test": 2.60},
    )

    text = summary(run_dir, 0, 30, wall_s=125.0, export=str(run_dir / "export"), start_step=0)
    lines = text.splitlines()
    assert lines[0] == "pretrain done: step 30/30, 61,440 tokens seen, wall time 2m05s"
    assert lines[1] == "  best valid 2.4000 bits per byte (step 20); final valid 2.5000; final test 2.6000"
    assert f"  export: {run_dir / 'export'}" in lines
    assert lines[-1] == f"  curves: tensorboard --logdir {run_dir / 'tensorboard'}"
    # resumed: what this launch did
    again = summary(run_dir, 0, 30, wall_s=3.0, start_step=20)
    assert again.splitlines()[0].startswith(
        "pretrain done: step 30/30 (10 this launch, resumed from step 20)"
    )
    assert "export:" not in again  # none made


def test_summary_of_a_preempted_run_says_so_and_where_it_got(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, [train_line(10, 20480), split_line("valid", 10, 2.45), train_line(20, 40960)])
    checkpoint(run_dir, 23)  # stopped between two train lines
    text = summary(run_dir, EXIT_PREEMPTED, 40, wall_s=10.0)
    lines = text.splitlines()
    assert (
        lines[0]
        == "pretrain preempted (exit status 75): step 23/40, 40,960 tokens seen (by step 20), wall time 10.0s"
    )
    assert "done" not in text
    assert lines[1] == "  best valid 2.4500 bits per byte (step 10)"  # no "final": it did not finish
    assert "  run the same command again to continue" in lines
    assert summary(run_dir, EXIT_INTERRUPTED, 40).startswith(
        "pretrain interrupted (exit status 130): step 23/40"
    )


def test_summary_of_a_complete_run_says_there_was_nothing_to_do(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, [train_line(5, 100), split_line("valid", 5, 3.0), split_line("test", 5, 3.1)])
    (run_dir / "export").mkdir()
    text = summary(run_dir, 0, 5, wall_s=1.0, export=str(run_dir / "export"), nothing_to_do=True)
    assert text.splitlines()[0] == "pretrain already complete, nothing to do: step 5/5, 100 tokens seen"
    assert "final valid 3.0000; final test 3.1000" in text and f"export: {run_dir / 'export'}" in text
    assert "tensorboard --logdir" in text


def test_summary_skips_a_torn_last_line_and_a_run_without_metrics(tmp_path):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, [train_line(10, 20480), split_line("valid", 10, 2.0)])
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 20, "train/lo')  # rank 0 killed mid-line
    assert read_run(run_dir).step == 10
    empty = summary(tmp_path / "nothing", EXIT_PREEMPTED, 10)
    assert empty.splitlines()[0] == "pretrain preempted (exit status 75): step 0/10"
    assert "tensorboard" not in empty


# ------------------------------------------------------------------------------------ evaluation


class _Tokens:
    def __init__(self, n: int):
        self.tokens = n

    def read(self, a: int, b: int) -> np.ndarray:
        return np.arange(a, b, dtype=np.int64) % 7


@pytest.mark.parametrize(
    ("n", "world", "streams", "seq", "cap"), [(1000, 3, 2, 7, 0), (97, 2, 3, 40, 0), (5000, 2, 4, 16, 1234)]
)
def test_the_batch_count_is_what_eval_batches_yields(n, world, streams, seq, cap):
    from rnnpipe.pipeline.train.data import eval_batches
    from rnnpipe.pipeline.train.evaluate import eval_batch_count

    for rank in range(world):
        yielded = sum(1 for _ in eval_batches(_Tokens(n), rank, world, streams, seq, cap))  # type: ignore[arg-type]
        assert yielded == eval_batch_count(n, world, streams, seq, cap)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("console")
    src = root / "text.txt"
    rng = np.random.default_rng(0)
    words = ["king", "queen", "sword", "crown", "night", "day", "lord", "to", "be", "or", "not"]
    src.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(600)) + "\n")
    out = root / "data"
    assert prepare(TEXT, out, f"source.paths=[{src}]", "shards.sample_tokens=1024") == 0
    return out


def test_evaluation_logs_its_progress_and_the_results_do_not_change(tiny_dataset, caplog, request):
    from rnnpipe.pipeline.data.reader import SplitReader
    from rnnpipe.pipeline.engine.rank import RankContext
    from rnnpipe.pipeline.models import LanguageModel
    from rnnpipe.pipeline.models.config import MixerKind
    from rnnpipe.pipeline.train.config import ModelConfig
    from rnnpipe.pipeline.train.evaluate import eval_batch_count, evaluate

    reader = SplitReader(str(tiny_dataset), "valid")
    torch.manual_seed(0)
    model = LanguageModel(
        ModelConfig(mixer=MixerKind.mingru, n_layers=1, d_model=16, mlp_ratio=2.0),
        int(reader.manifest["tokenizer"]["vocab_size"]),
    )
    cpu = torch.device("cpu")
    one, second = RankContext.single(cpu), RankContext(1, 2, cpu)  # rank 0 of 1; rank 1 of 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (10x slower on 2 cores)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    total = eval_batch_count(reader.tokens, 1, 2, 16)
    assert total >= 20  # enough for ten lines

    with caplog.at_level(logging.INFO, logger="rnnpipe.train"):
        quiet = evaluate(model, reader, one, 2, 16)  # under 30 s: no line
        assert not [r for r in caplog.records if "batches" in r.getMessage()]
        logged = evaluate(model, reader, one, 2, 16, progress_every_s=0.0)
        others = evaluate(model, reader, second, 1, 16, progress_every_s=0.0)  # rank 1 of 2: silent
    lines = [r.getMessage() for r in caplog.records if r.name == "rnnpipe.train"]
    assert len(lines) == 9, lines  # every tenth but the last (the result's line follows it)
    pattern = rf"valid: (\d+)/{total} batches \((\d+)%\) \| [\d,]+ tok/s \| eta \d+m\d\ds"
    done = [int(re.fullmatch(pattern, line).group(1)) for line in lines]  # type: ignore[union-attr]
    assert done == sorted(done) and done[0] >= total / 10 and done[-1] < total
    assert logged == quiet  # bit for bit: the logging reads nothing the evaluation uses
    assert others is not None and others["tokens"] < quiet["tokens"]  # (only its half of the streams)


# ------------------------------------------------------------------------------------ DeepSpeed


@pytest.fixture
def ds_logger(monkeypatch):
    """DeepSpeed's logger, with a handler of its own to see what would reach DeepSpeed's handlers;
    the root and DeepSpeed levels put back afterwards."""
    deepspeed_logging = pytest.importorskip("deepspeed.utils.logging")
    logger = deepspeed_logging.logger
    root = logging.getLogger()
    saved = (root.level, logger.level)
    seen: list[logging.LogRecord] = []
    own = logging.Handler()
    own.emit = seen.append  # type: ignore[method-assign]
    logger.addHandler(own)
    logger.seen = seen  # type: ignore[attr-defined]
    yield logger
    logger.removeHandler(own)
    root.setLevel(saved[0])
    logger.setLevel(saved[1])


def test_deepspeed_messages_are_debug_unless_asked_for(ds_logger, monkeypatch, caplog):
    assert ds_logger.name == distributed.DEEPSPEED_LOGGER
    monkeypatch.delenv("RNNPIPE_LOG_LEVEL", raising=False)
    distributed.setup_logging()
    assert logging.getLogger().level == logging.INFO
    ds_logger.warning("[WARNING] using untested triton version")
    ds_logger.info("DeepSpeedEngine configuration")
    assert not [r for r in caplog.records if r.name == "DeepSpeed"]
    ds_logger.error("a real error")  # errors show, in rnnpipe's format (root's handlers)
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "DeepSpeed"] == [
        (logging.ERROR, "a real error")
    ]
    assert ds_logger.seen == []  # never through DeepSpeed's own handlers (stdout, its format)

    caplog.clear()
    monkeypatch.setenv("RNNPIPE_LOG_LEVEL", "DEBUG")  # rnnpipe -v
    distributed.setup_logging()
    ds_logger.warning("[WARNING] using untested triton version")
    ds_logger.info("DeepSpeedEngine configuration")
    got = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "DeepSpeed"]
    assert got == [
        (logging.DEBUG, "[WARNING] using untested triton version"),
        (logging.DEBUG, "DeepSpeedEngine configuration"),
    ]
    assert ds_logger.seen == []


def test_deepspeed_prints_and_warnings_follow_the_level(ds_logger, monkeypatch, caplog):
    monkeypatch.setenv("RNNPIPE_LOG_LEVEL", "DEBUG")
    distributed.setup_logging()
    with distributed.deepspeed_prints():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "DeepSpeed"] == [
        (logging.DEBUG, "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    ]
    caplog.clear()
    monkeypatch.setenv("RNNPIPE_LOG_LEVEL", "INFO")
    distributed.setup_logging()
    with distributed.deepspeed_prints():
        print("built successfully")
    assert not caplog.records
    with pytest.raises(RuntimeError), distributed.deepspeed_prints():
        print("[WARNING] the op failed to build: here is why")
        raise RuntimeError("no")
    assert [r.levelno for r in caplog.records if r.name == "DeepSpeed"] == [logging.ERROR]  # the why shows

    with warnings.catch_warnings(record=True) as caught:
        distributed.quiet_deepspeed()
        for module in (
            "deepspeed.runtime.engine",
            "torch.distributed.distributed_c10d",
            "rnnpipe.pipeline.train.loop",
        ):
            warnings.warn_explicit("internal", UserWarning, "x.py", 1, module=module, registry={})
    assert [str(w.message) for w in caught] == ["internal"]  # only the one raised from rnnpipe's code


@pytest.mark.parametrize(
    ("value", "level"), [("DEBUG", 10), ("warning", 30), ("15", 15), ("", 20), ("loud", 20)]
)
def test_log_level_from_the_environment(value, level):
    assert distributed.log_level({"RNNPIPE_LOG_LEVEL": value}) == level


def test_ranks_and_slurm_tasks_log_at_the_launchers_level(monkeypatch, tmp_path):
    from rnnpipe.launch.stages import pretrain
    from rnnpipe.pipeline.config import load_config

    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.WARNING)  # rnnpipe -q (pytest's handlers are on root)
    monkeypatch.delenv("RNNPIPE_LOG_LEVEL", raising=False)
    assert distributed.child_log_level() == "WARNING"
    monkeypatch.setenv("RNNPIPE_LOG_LEVEL", "DEBUG")  # rnnpipe -v
    assert distributed.child_log_level() == "DEBUG"
    job = load_config(
        pretrain.PretrainJob, str(REPO / "configs/pretrain/tiny-lrn.yaml"), [f"run_dir={tmp_path}"]
    )
    ex = pretrain.slurm_executor(job, str(tmp_path / "%j"))
    text = ex._make_submission_file_text("python -c 1", "uid")
    assert "export RNNPIPE_LOG_LEVEL=DEBUG" in text and "export RNNPIPE_EARLY_STOP=1" in text
    # -q quiets the submitting console only: the job's log file keeps its INFO lines
    monkeypatch.delenv("RNNPIPE_LOG_LEVEL")
    text = pretrain.slurm_executor(job, str(tmp_path / "%j"))._make_submission_file_text("python -c 1", "uid")
    assert "RNNPIPE_LOG_LEVEL" not in text and "export RNNPIPE_EARLY_STOP=1" in text
