"""Config hardening (issue 12): every number's range, YAML errors as config errors, one-line
values, and ``data.verify`` outside the run's identity."""

from __future__ import annotations

import subprocess

import pytest
from harness import CLI, REPO

from rnnpipe.launch.chain.workflow import PipelineConfig
from rnnpipe.launch.stages.finetune import FinetuneJob
from rnnpipe.launch.stages.prepare import PrepareJob
from rnnpipe.launch.stages.pretrain import PretrainJob
from rnnpipe.pipeline.config import load_config, to_dict
from rnnpipe.pipeline.errors import ConfigError
from rnnpipe.pipeline.train.config import resume_changes, run_fingerprint, run_view

PRETRAIN = str(REPO / "configs" / "pretrain" / "tiny-lrn.yaml")
PREPARE = str(REPO / "configs" / "prepare" / "tinyshakespeare.yaml")
FINETUNE = str(REPO / "configs" / "finetune" / "demo.yaml")
PIPELINE = str(REPO / "configs" / "pipeline" / "quickstart.yaml")
CONFIGS = {
    "pretrain": (PretrainJob, PRETRAIN),
    "prepare": (PrepareJob, PREPARE),
    "finetune": (FinetuneJob, FINETUNE),
}


def refusal(kind: str, *overrides: str) -> str:
    schema, path = CONFIGS[kind]
    with pytest.raises(ConfigError) as e:
        load_config(schema, path, list(overrides))
    return str(e.value)


@pytest.mark.parametrize(
    "kind, override, message",
    [
        ("pretrain", "train.log_every=0", "train.log_every must be >= 1, got 0"),
        ("pretrain", "train.eval_every=-1", "train.eval_every must be >= 0 (0 = only at the end), got -1"),
        ("pretrain", "train.time_limit_min=-1", "train.time_limit_min must be >= 0 (0 = none), got -1.0"),
        ("pretrain", "train.checkpoint_every=-1", "train.checkpoint_every must be >= 0"),
        ("pretrain", "train.eval_max_tokens=-1", "train.eval_max_tokens must be >= 0"),
        ("pretrain", "train.sample_tokens=-1", "train.sample_tokens must be >= 0"),
        ("pretrain", "train.peak_tflops=-1", "train.peak_tflops must be >= 0"),
        ("pretrain", "train.seed=-1", "train.seed must be in [0, 4294967296), got -1"),
        ("pretrain", "train.inject_nan_at=[3,-1]", "train.inject_nan_at[1] must be >= 0, got -1"),
        ("pretrain", "optim.warmup_steps=-1", "optim.warmup_steps must be >= 0 (0 = no warm-up), got -1"),
        ("pretrain", "optim.beta1=1.0", "optim.beta1 must be in [0, 1), got 1.0"),
        ("pretrain", "optim.beta2=-0.1", "optim.beta2 must be in [0, 1), got -0.1"),
        ("pretrain", "optim.eps=0", "optim.eps must be > 0, got 0.0"),
        ("pretrain", "optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
        ("pretrain", "optim.lr=.nan", "optim.lr must be > 0, got nan"),
        ("pretrain", "model.n_heads=0", "model.n_heads must be >= 1, got 0"),
        ("pretrain", "model.d_model=0", "model.d_model must be >= 1, got 0"),
        ("pretrain", "model.n_layers=0", "model.n_layers must be >= 1, got 0"),
        ("pretrain", "model.dropout=1.0", "model.dropout must be in [0, 1), got 1.0"),
        ("pretrain", "model.rope_base=0", "model.rope_base must be > 0, got 0.0"),
        ("pretrain", "model.vocab_size=-1", "model.vocab_size must be >= 0 (0 = the dataset's), got -1"),
        ("pretrain", "model.mlp_ratio=0.001", "model.mlp_ratio=0.001 gives an MLP of width 0"),
        ("pretrain", "data.seq_len=0", "data.seq_len must be >= 1, got 0"),
        ("pretrain", "data.seed=-1", "data.seed must be in [0, 4294967296), got -1"),
        ("pretrain", "data.workers=-1", "data.workers must be >= 0, got -1"),
        ("pretrain", "data.verify=partial", "data.verify must be sizes or read or full, got 'partial'"),
        (
            "prepare",
            "tokenizer.character_coverage=0",
            "tokenizer.character_coverage must be in (0, 1], got 0.0",
        ),
        ("prepare", "tokenizer.sample_seed=-1", "tokenizer.sample_seed must be in [0, 4294967296), got -1"),
        ("prepare", "tokenizer.vocab_size=0", "tokenizer.vocab_size must be >= 16, got 0"),
        ("prepare", "shards.shard_mb=0", "shards.shard_mb must be > 0, got 0.0"),
        ("prepare", "source.unit_mb=-1", "source.unit_mb must be > 0, got -1.0"),
        ("finetune", "job.seed=-1", "job.seed must be in [0, 4294967296), got -1"),
        (
            "finetune",
            "job.dropout=1.5",
            "job.dropout must be in [0, 1) (or -1 = the pretrained config's), got 1.5",
        ),
        ("finetune", "job.head.dropout=-0.1", "job.head.dropout must be in [0, 1), got -0.1"),
        ("finetune", "job.optim.weight_decay=-1", "job.optim.weight_decay must be >= 0, got -1.0"),
        # A sweep's tasks are checked when it loads, each named by its key.
        ("finetune", "tasks.conll.max_dev=-1", "tasks.conll.max_dev must be >= 0 (0 = all), got -1"),
        ("finetune", "tasks.conll.tag_column=0", "tasks.conll.tag_column must not be 0"),
    ],
)
def test_out_of_range_value_names_key_value_and_range(kind, override, message):
    assert message in refusal(kind, override)


def test_zero_heads_in_an_attention_layer_is_a_config_error():
    msg = refusal("pretrain", "model.attention_every=2", "model.n_heads=0")
    assert "model.n_heads must be >= 1, got 0" in msg


def test_warmup_steps_zero_starts_the_schedule_at_the_peak():
    import torch

    from rnnpipe.pipeline.engine.schedule import StepScheduler

    def rates(warmup: int) -> list[float]:
        cfg = load_config(PretrainJob, PRETRAIN, [f"optim.warmup_steps={warmup}", "optim.lr=1.0"])
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = StepScheduler(opt, cfg.optim.build_schedule(cfg.train.steps))
        out = []
        for _ in range(4):  # DeepSpeed steps the schedule after each optimizer step
            sched.step()
            out.append(opt.param_groups[0]["lr"])
        return out

    no_warmup = rates(0)
    assert no_warmup[0] == 1.0 and no_warmup[-1] < 1.0  # the peak at once, then the cosine
    warmup = rates(20)
    assert warmup == sorted(warmup) and warmup[-1] < 1.0  # a warm-up stays one


@pytest.mark.parametrize(
    "text, line",
    [
        ("run_dir: x\ndata:\n  path: y\n  seq_len: [1\n", "line 4, column 12"),  # an unclosed [
        ("run_dir: x\ndata:\n\tpath: y\n", "line 3, column 1"),  # a tab indent
        ("run_dir: `x`\n", "line 1, column 10"),
    ],
)
def test_yaml_syntax_error_names_the_file_and_line(tmp_path, text, line):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(PretrainJob, str(path))
    assert f"config file {path} is not valid YAML" in str(e.value) and line in str(e.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.resume=`x`", "override 'train.resume=`x`' is not valid YAML at character 14"),
        ("train.resume=[a", "override 'train.resume=[a' is not valid YAML"),
        ("train.resume", "override 'train.resume' is not of the form key.sub=value"),
        ("train.resum=x", "unknown config key 'train.resum'"),
        ("train.resume=${nowhere}", "bad value for config key 'train.resume'"),
    ],
)
def test_bad_override_is_a_config_error_naming_it(override, message):
    assert message in refusal("pretrain", override)


@pytest.mark.parametrize(
    "args, names",
    [
        (["pretrain", PRETRAIN, "train.log_every=0"], "train.log_every"),
        (["pretrain", PRETRAIN, "model.n_heads=0", "model.attention_every=1"], "model.n_heads"),
        (["pretrain", PRETRAIN, "train.resume=`x`"], "train.resume=`x`"),
        (["prepare", "BAD_YAML"], "bad.yaml is not valid YAML at line 3"),
    ],
)
def test_cli_exits_2_with_one_line_naming_the_key(tmp_path, args, names):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: x\nsource: {paths: [a]\n")
    argv = [str(bad) if a == "BAD_YAML" else a for a in args]
    done = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnnpipe: config error: "), done.stderr
    assert names in lines[0]


def test_data_verify_changes_neither_fingerprint_nor_resume():
    sizes = to_dict(load_config(PretrainJob, PRETRAIN, ["data.verify=sizes"]))
    full = to_dict(load_config(PretrainJob, PRETRAIN, ["data.verify=full"]))
    assert run_fingerprint(sizes, "d", 1) == run_fingerprint(full, "d", 1)
    refused, allowed = resume_changes(run_view(sizes, "d", 1), run_view(full, "d", 1))
    assert not refused and set(allowed) == {"data.verify"}
    # A checkpoint from before the key existed resumes too.
    older = {**sizes, "data": {k: v for k, v in sizes["data"].items() if k != "verify"}}
    assert not resume_changes(run_view(older, "d", 1), run_view(full, "d", 1))[0]


@pytest.mark.parametrize("char", ["\\n", "\\r", "\\0"])
@pytest.mark.parametrize(
    "kind, key",
    [
        ("pretrain", "run_dir"),
        ("pretrain", "data.path"),
        ("pretrain", "train.resume"),
        ("prepare", "output"),
        ("prepare", "work_dir"),
        ("prepare", "source.cache_dir"),
        ("finetune", "out_dir"),
        ("finetune", "pretrained"),
        ("finetune", "tasks.sst2.train"),
    ],
)
def test_line_break_in_a_path_is_refused_naming_the_key(kind, key, char):
    # YAML's double-quoted escapes put the real character into the value.
    value = "a" + {"\\n": "\n", "\\r": "\r", "\\0": "\0"}[char] + "b"
    assert f"{key}={value!r} holds a" in refusal(kind, f'{key}="a{char}b"')


def test_line_break_in_a_list_item_names_its_index():
    assert "source.paths[1]='a\\nb' holds a newline" in refusal("prepare", 'source.paths=[x, "a\\nb"]')


@pytest.mark.parametrize("char", ["\\n", "\\r", "\\0"])
def test_pipeline_run_dir_is_one_line(char):
    with pytest.raises(ConfigError, match=r"run_dir=.* holds a"):
        load_config(PipelineConfig, PIPELINE, [f'run_dir="runs/x{char}y"'])


@pytest.mark.parametrize(
    "override, message",
    [
        ('executor.slurm.partition="gpu\\n#SBATCH --x"', "executor.slurm.partition="),
        ('executor.slurm.account="a\\nb"', "executor.slurm.account="),
        ('executor.slurm.qos="a\\rb"', "executor.slurm.qos="),
        ('executor.slurm.extra={mail-type: "FAIL\\nrm -rf x"}', "executor.slurm.extra.mail-type="),
        ('executor.slurm.extra={"mail-type\\nx": FAIL}', "executor.slurm.extra: the key"),
        ('executor.slurm.extra={"mail type": FAIL}', "is not an sbatch option name"),
        ('executor.slurm.extra={"a=b": FAIL}', "is not an sbatch option name"),
        ('executor.slurm.partition="gpu\\tx"', "holds a control character"),  # executors' own check
    ],
)
def test_slurm_values_and_extra_keys_are_one_line(override, message):
    assert message in refusal("pretrain", override)
    # The same for a pipeline's own Slurm settings.
    with pytest.raises(ConfigError):
        load_config(PipelineConfig, PIPELINE, [override.removeprefix("executor.")])
