"""A disk that fills while a checkpoint is written (issue 28, item 7): one line naming the file that
could not be written, why in words (not torch's "unexpected pos"), the space left, the last complete
checkpoint and what to do; nothing half-written left looking complete, ``latest`` untouched.

In-process, with a stand-in for the DeepSpeed engine that writes its file as DeepSpeed does (its
checkpoint engine's ``save``: ``torch.save`` to a path). A real full disk: the engine's file is a
symlink to /dev/full, where every write fails with ENOSPC; the other files fail with an
``OSError(ENOSPC)`` from the atomic write (monkeypatched). The real engine's failure (a file-size
limit, EFBIG) is tests/integration/train/test_hardening_train.py's."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.train import checkpoint

MODEL = "mp_rank_00_model_states.pt"


class _Writer:
    def save(self, state_dict: dict, path: str) -> None:
        torch.save(state_dict, path)


class _Engine:
    """What checkpoint.save uses of a DeepSpeed engine: its checkpoint engine and save_checkpoint."""

    device = "cpu"

    def __init__(self) -> None:
        self.checkpoint_engine = _Writer()

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        state = {"module": {"w": torch.zeros(4096)}, **client_state}
        self.checkpoint_engine.save(state, os.path.join(save_dir, tag, MODEL))


class _State:
    def __init__(self, step: int) -> None:
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step, "data": {"epoch": 0}}


def _save(run_dir: Path, step: int) -> Path:
    return checkpoint.save(_Engine(), run_dir, _State(step), {"config": {}}, keep=2)


def _full_at(monkeypatch, name: str) -> None:
    """Every atomic write of a file called ``name`` fails as on a full disk."""
    write = fsio.write_bytes_atomic

    def failing(url: str, data: bytes) -> str:
        if Path(url).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(url, data)

    monkeypatch.setattr(fsio, "write_bytes_atomic", failing)


@pytest.mark.parametrize("where", [MODEL, "rank00000.pt", checkpoint.COMPLETE, "latest"])
def test_a_full_disk_at_a_checkpoint_is_one_line_naming_the_file_and_what_to_do(tmp_path, monkeypatch, where):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    first = _save(run_dir, 1)  # a complete one, then the disk fills
    tag = checkpoint.tag_of(2)
    if where == MODEL:
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full here: the real ENOSPC of torch.save cannot be made")
        (root / tag).mkdir()
        (root / tag / MODEL).symlink_to("/dev/full")  # torch.save to it: a real ENOSPC in its C++ writer
    else:
        _full_at(monkeypatch, where)
    with pytest.raises(checkpoint.CheckpointError) as e:
        _save(run_dir, 2)
    msg = str(e.value)
    assert "\n" not in msg and "unexpected pos" not in msg.split("(torch: ")[0], msg
    target = root / ("latest" if where == "latest" else f"{tag}/{where}")
    assert msg.startswith(f"checkpoint at step 2 not written: rank 0 could not write {target}: "), msg
    why = "the write stopped short, as on a full disk" if where == MODEL else "no space left on device"
    assert why in msg and " free there)" in msg, msg
    assert f"the last complete one is {first}" in msg, msg
    assert ". Free space on that disk and run the same command again to resume from it" in msg, msg
    assert msg.endswith(", or start over in another run_dir"), msg
    # nothing half-written: the partial directory is gone, latest and the complete one untouched
    assert not (root / tag).exists() and checkpoint.find_latest(run_dir) == first
    assert (root / "latest").read_text() == checkpoint.tag_of(1) and checkpoint.is_complete(first)
    monkeypatch.undo()
    assert _save(run_dir, 2) == root / tag and checkpoint.find_latest(run_dir) == root / tag  # space again


def test_with_no_complete_checkpoint_it_says_the_run_starts_again(tmp_path, monkeypatch):
    _full_at(monkeypatch, "rank00000.pt")
    with pytest.raises(checkpoint.CheckpointError) as e:
        _save(tmp_path / "run", 1)
    assert "; no complete checkpoint exists. " in str(e.value) and "it starts again from step 0" in str(
        e.value
    )
    assert not list((tmp_path / "run" / "checkpoints").glob("step*"))
