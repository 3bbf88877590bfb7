"""The configs that ship with rnnpipe, named without a path from any directory; `rnnpipe configs`."""

from __future__ import annotations

import pytest
from harness import REPO, rnnpipe


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path, monkeypatch):
    """Every test runs from a directory that is not the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name", ["tiny-lrn", "pretrain/tiny-lrn", "configs/pretrain/tiny-lrn.yaml"])
def test_a_shipped_config_is_named_without_a_path(name, capsys):
    assert rnnpipe("pretrain", name, "train.steps=7", "--print-config") == 0
    printed = capsys.readouterr().out
    assert "run_dir: runs/pretrain/tiny-lrn" in printed and "steps: 7" in printed


def test_a_file_of_the_users_own_wins_over_the_shipped_config_of_that_name(tmp_path, capsys):
    mine = tmp_path / "configs" / "pretrain" / "tiny-lrn.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text(
        (REPO / "configs/pretrain/tiny-lrn.yaml").read_text().replace("d_model: 128", "d_model: 48")
    )
    assert rnnpipe("pretrain", "configs/pretrain/tiny-lrn.yaml", "--print-config") == 0
    assert "d_model: 48" in capsys.readouterr().out


def test_each_command_looks_in_its_own_folder_first(capsys):
    """tinyshakespeare-cpu is both a prepare and a pretrain config: the command decides."""
    assert rnnpipe("prepare", "tinyshakespeare-cpu", "--print-config") == 0
    assert "tokenizer:" in capsys.readouterr().out
    assert rnnpipe("configs", "tinyshakespeare-cpu") == 2
    err = capsys.readouterr().err
    assert "prepare/tinyshakespeare-cpu" in err and "pretrain/tinyshakespeare-cpu" in err


def test_a_pipeline_by_name_finds_its_stage_configs(capsys):
    assert rnnpipe("run", "quickstart", "run_dir=here", "--print-config") == 0
    out = capsys.readouterr().out
    assert "# ---- pretrain ----" in out and "mixer: lrn" in out


def test_an_unknown_name_is_a_config_error_that_says_where_to_look(capsys):
    assert rnnpipe("pretrain", "no-such-config") == 2
    err = capsys.readouterr().err
    assert "no-such-config" in err and "rnnpipe configs" in err
    assert rnnpipe("pretrain", "../pretrain/tiny-lrn") == 2  # names stay inside configs/


def test_configs_lists_prints_and_copies_without_overwriting(tmp_path, capsys):
    assert rnnpipe("configs") == 0
    listing = capsys.readouterr().out
    assert "pretrain/tiny-lrn" in listing and "pipeline/quickstart" in listing
    assert rnnpipe("configs", "pipeline/quickstart") == 0
    assert "prepare:" in capsys.readouterr().out
    assert rnnpipe("configs", "--copy", "mine") == 0
    copied = tmp_path / "mine"
    assert (copied / "configs/pretrain/tiny-lrn.yaml").read_bytes() == (
        REPO / "configs/pretrain/tiny-lrn.yaml"
    ).read_bytes()
    assert (copied / "slurm/pipeline.sh").exists() and (copied / "slurm/common.sh").exists()
    (copied / "configs/pretrain/tiny-lrn.yaml").write_text("edited")
    assert rnnpipe("configs", "--copy", "mine") == 2  # refuses, and loses nothing
    assert "already in mine" in capsys.readouterr().err
    assert (copied / "configs/pretrain/tiny-lrn.yaml").read_text() == "edited"
    assert rnnpipe("configs", "--slurm-dir") == 0
    assert capsys.readouterr().out.strip() == str(REPO / "slurm")
