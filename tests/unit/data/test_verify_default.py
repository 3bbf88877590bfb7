"""Corruption caught by default (issue 28, item 5): a flipped payload byte keeps every size, so
``data.verify=sizes`` trained on it with exit 0. The default (``read``) checks each shard's sha256
against the manifest the first time a sample of it is read, in the pass that reads the sample:
the step that would use its tokens fails instead, naming the shard and the way out; ``sizes``
stays as the explicit opt-out, ``full`` checks every shard when the split opens."""

from __future__ import annotations

import os
import pickle
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rnnpipe.pipeline.data.config import DEFAULT_VERIFY, VERIFY_LEVELS
from rnnpipe.pipeline.data.reader import open_split
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.train.config import DataConfig
from rnnpipe.pipeline.train.data import (
    PrefetchedBatches,
    ShuffleBatches,
    StreamBatches,
    _ShuffleWorkerData,
    _WorkerFailure,
)

SEQ = 8192  # two 4,096-token samples a step: stream 0 of 1 enters shard 2 (token 131,072) at step 15


@pytest.fixture
def flipped(tiny_enwik8, tmp_path) -> tuple[Path, Path]:
    """(a copy of tiny_enwik8 with one token of train shard 2 flipped in place, that shard): sizes,
    counts, tar and npy headers unchanged, the mtime kept as silent bit rot keeps it."""
    root = Path(shutil.copytree(tiny_enwik8, tmp_path / "d"))  # (copy2: the index stays newer)
    shard = root / "train" / "train-000002.tar"
    with tarfile.open(shard) as tar:
        npy = [m for m in tar.getmembers() if m.name.endswith(".npy")][3]
    st = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(npy.offset_data + npy.size - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x20]))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    return root, shard


def test_a_flipped_byte_stops_the_step_that_would_train_on_it_at_the_default(flipped):
    root, shard = flipped
    assert DataConfig(path=str(root)).verify == DEFAULT_VERIFY == "read"
    assert VERIFY_LEVELS == ("sizes", "read", "full")
    reader = open_split(str(root), "train", DataConfig(path=str(root)).verify)  # as the loop opens it
    loader = PrefetchedBatches(StreamBatches(reader, 0, 1, 1, SEQ))  # the loop's loader: read ahead
    steps = 0
    with pytest.raises(PipelineError) as e:
        for _ in range(loader.steps_per_epoch):
            next(loader)
            steps += 1
    loader.close()
    assert steps == 15 and loader.state_dict()["step_in_epoch"] == 15  # every batch before shard 2: served
    msg = str(e.value)
    assert msg.startswith(f"{shard}: sha256 ") and "differs from the manifest's" in msg, msg
    assert "before any of its tokens were used" in msg and "\n" not in msg
    assert f"rnnpipe verify {root}" in msg and "running the same rnnpipe prepare again rebuilds" in msg
    # shards 0 and 1 were hashed once each, and a copy (shuffle mode's spawned workers) knows it
    assert reader._hashed == {0, 1} and pickle.loads(pickle.dumps(reader))._hashed == {0, 1}


def test_sizes_is_the_opt_out_and_full_fails_at_open(flipped):
    root, shard = flipped
    quiet = open_split(str(root), "train", "sizes")
    assert len(quiet.read(0, quiet.tokens)) == quiet.tokens  # trained on silently: what the opt-out means
    with pytest.raises(PipelineError, match=rf"^{shard}: sha256 .* differs from the manifest's"):
        open_split(str(root), "train", "full")
    intact = open_split(str(root), "valid")  # an intact split reads whole at the default
    assert len(intact.read(0, intact.tokens)) == intact.tokens and intact._hashed


def test_in_shuffle_mode_a_workers_damaged_shard_is_the_same_one_line(flipped, monkeypatch):
    """Raised in a DataLoader worker, torch re-raises it with the worker's traceback as its message.
    So a worker yields the message as an item instead of raising, and the loader raises it as it is.
    (In this process, as worker 0 runs it: spawning one costs seconds; a real one gives the same.)"""
    root, shard = flipped
    loader = ShuffleBatches(open_split(str(root), "train"), 0, 1, 2, 64, seed=0, workers=1)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=0))
    items = list(iter(_ShuffleWorkerData(loader, 0, 0)))  # what worker 0 hands the DataLoader: no raise
    assert isinstance(items[-1], _WorkerFailure) and items[-1].message.startswith(f"{shard}: sha256 ")
    loader.loader_workers = 0  # the loader over that worker's items, here
    with pytest.raises(PipelineError) as e:
        for _ in range(loader.steps_per_epoch(0)):
            next(loader)
    assert str(e.value) == items[-1].message and "\n" not in str(e.value)
