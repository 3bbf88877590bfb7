"""A damaged universal conversion (``<checkpoint>/universal/``): a file deleted or cut short
since the conversion is caught by its record before DeepSpeed reads it (and the conversion is
then redone), and a checkpoint DeepSpeed cannot load is named, with the way out, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.train import elastic


def _converted(ckpt: Path) -> Path:
    """A finished conversion as to_universal leaves it: two files and the marker listing them."""
    out = ckpt / elastic.UNIVERSAL
    (out / "zero" / "w").mkdir(parents=True)
    (out / "zero" / "w" / "fp32.pt").write_bytes(b"x" * 100)
    (out / "mp_rank_00_model_states.pt").write_bytes(b"y" * 10)
    files = {"zero/w/fp32.pt": 100, "mp_rank_00_model_states.pt": 10}
    (out / elastic.DONE).write_text(json.dumps({"from": ckpt.name, "files": files}))
    return out


def test_a_truncated_or_deleted_file_of_the_conversion_is_caught_before_loading(tmp_path):
    out = _converted(tmp_path / "step00000004")
    assert elastic.is_converted(tmp_path / "step00000004")
    (out / "zero" / "w" / "fp32.pt").write_bytes(b"x" * 37)
    assert not elastic.is_converted(tmp_path / "step00000004")
    assert elastic.universal_problem(tmp_path / "step00000004") == (
        f"{out / 'zero' / 'w' / 'fp32.pt'}: 37 bytes, the conversion wrote 100"
    )
    (out / "mp_rank_00_model_states.pt").unlink()
    assert "mp_rank_00_model_states.pt: missing" in elastic.universal_problem(tmp_path / "step00000004")
    (out / elastic.DONE).write_text("{}")  # a marker from before the record: converted again
    assert not elastic.is_converted(tmp_path / "step00000004")


class _Engine:
    """An engine whose checkpoint DeepSpeed cannot read (as a damaged pickle fails in it)."""

    lr_scheduler = None

    def load_checkpoint(self, load_dir: str, tag: str):
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory")


@pytest.mark.parametrize("universal", [True, False])
def test_a_checkpoint_deepspeed_cannot_load_is_named_with_the_way_out(tmp_path, monkeypatch, universal):
    monkeypatch.setattr(elastic, "optimizer_hparams", lambda engine: [])
    ckpt = tmp_path / "step00000004"
    plan = (
        elastic.Plan(str(ckpt), elastic.UNIVERSAL, True, 2, 1)
        if universal
        else elastic.Plan(str(tmp_path), ckpt.name, False, 1, 1)
    )
    with pytest.raises(PipelineError) as e:
        elastic.load_engine(_Engine(), plan)
    message = str(e.value)
    assert "\n" not in message and "failed finding central directory" in message
    if universal:
        assert message.startswith(f"{ckpt / 'universal'}: DeepSpeed could not load it")
        assert f"remove {ckpt / 'universal'} and run the same command again" in message
    else:
        assert message.startswith(f"{ckpt}: DeepSpeed could not load it") and "train.resume=PATH" in message
