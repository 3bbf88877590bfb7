"""Configs: YAML + overrides, and errors that name the key before any work starts."""

from __future__ import annotations

import pytest
from harness import REPO, prepare

from rnnpipe.launch.stages.prepare import PrepareJob
from rnnpipe.pipeline.config import load_config, to_yaml
from rnnpipe.pipeline.data.config import SourceKind, TokenizerKind
from rnnpipe.pipeline.errors import ConfigError

CONFIG = REPO / "configs" / "prepare" / "wikipedia.yaml"


def test_yaml_then_overrides_apply_in_order():
    job = load_config(
        PrepareJob,
        str(CONFIG),
        [
            "tokenizer.vocab_size=1000",
            "source.paths=[a.xml,b.xml]",
            "executor.kind=inline",
            "executor.slurm.extra={mail-type: FAIL}",
        ],
    )
    assert job.source.kind is SourceKind.wikipedia
    assert job.tokenizer.kind is TokenizerKind.sentencepiece
    assert job.tokenizer.vocab_size == 1000
    assert job.source.paths == ["a.xml", "b.xml"]
    assert job.executor.kind.value == "inline"
    assert job.executor.slurm.extra == {"mail-type": "FAIL"}
    # Without the override the file's value stands; without the file, the dataclass default.
    assert load_config(PrepareJob, str(CONFIG)).tokenizer.vocab_size == 8192
    assert (
        load_config(PrepareJob, None, ["output=/o", "source.paths=[x]"]).tokenizer.kind is TokenizerKind.bytes
    )


def test_resolved_yaml_round_trips(tmp_path):
    job = load_config(PrepareJob, str(CONFIG), ["output=/x", "shards.sample_tokens=123"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(job))
    assert load_config(PrepareJob, str(path)) == job


def test_unknown_key_on_command_line_names_it_and_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(PrepareJob, str(CONFIG), ["tokenizer.vocab_sise=10"])
    msg = str(e.value)
    assert "unknown config key 'tokenizer.vocab_sise'" in msg
    assert "from the command line" in msg
    assert "vocab_size" in msg and "model_type" in msg  # the valid keys at tokenizer
    assert "did you mean 'vocab_size'" in msg


def test_unknown_key_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: /tmp/x\nsource:\n  kind: text\n  pathz: [a]\n")
    with pytest.raises(ConfigError) as e:
        load_config(PrepareJob, str(bad))
    assert "unknown config key 'source.pathz'" in str(e.value)
    assert str(bad) in str(e.value)
    assert "paths" in str(e.value)


def test_unknown_top_level_key():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'sharts' .* valid keys at the top level: .*shards"
    ):
        load_config(PrepareJob, None, ["sharts.x=1"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError) as e:
        load_config(PrepareJob, str(CONFIG), ["shards.sample_tokens=lots"])
    msg = str(e.value)
    assert "shards.sample_tokens" in msg and "expects int" in msg and "'lots'" in msg


def test_bad_enum_value_lists_choices():
    with pytest.raises(ConfigError) as e:
        load_config(PrepareJob, str(CONFIG), ["tokenizer.kind=wordpiece"])
    assert "tokenizer.kind" in str(e.value)
    assert "bytes, char, sentencepiece" in str(e.value)


def test_missing_required_value():
    with pytest.raises(ConfigError, match=r"missing required config value.*output"):
        load_config(PrepareJob, None, ["source.paths=[x]"])


def test_value_checks_run_after_loading():
    with pytest.raises(ConfigError, match=r"source\.valid_fraction must be in"):
        load_config(PrepareJob, str(CONFIG), ["source.valid_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"shards\.dtype"):
        load_config(PrepareJob, str(CONFIG), ["shards.dtype=int8"])
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config(PrepareJob, str(CONFIG), ["justaword"])


def test_cli_exits_2_on_config_error_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    assert prepare(CONFIG, out, "tokenizer.vocab_sise=10", executor="local") == 2
    assert "unknown config key 'tokenizer.vocab_sise'" in capsys.readouterr().err
    assert not out.exists()
    assert prepare(CONFIG, out, "shards.sample_tokens=x", executor="local") == 2
    assert not out.exists()


def test_print_config_shows_overrides(capsys):
    assert prepare(CONFIG, "/o", "--print-config", "tokenizer.vocab_size=77", executor="local") == 0
    text = capsys.readouterr().out
    assert "vocab_size: 77" in text and "output: /o" in text and "executor:" in text


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    from rnnpipe.launch.stages.finetune import FinetuneJob
    from rnnpipe.launch.stages.pretrain import PretrainJob

    if path.parent.name == "pipeline":
        from rnnpipe.launch.chain.workflow import load

        p = load(str(path), [])  # every stage file it names loads too
        assert p.jobs["prepare"].output.startswith(p.run_dir)
        assert (p.jobs.get("finetune") is not None) == bool(p.cfg.finetune.config)  # optional stage
    elif path.parent.name == "pretrain":
        job = load_config(PretrainJob, str(path))
        assert job.run_dir and job.data.path
    elif path.parent.name == "finetune":
        job = load_config(FinetuneJob, str(path))
        assert job.out_dir and job.pretrained and job.grid["task"]
        assert all(t.train.startswith(job.data_root) for t in job.tasks.values())
    else:
        job = load_config(PrepareJob, str(path))
        assert job.output and job.source.paths
