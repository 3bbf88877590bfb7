"""The pretrain stream reader (issue 26, item 4): a cache sized to the streams (no re-reads beyond
the streams' sample crossings), the next batch read in a background thread without changing what
is trained on or the checkpointed position, and each split's sample index written once by prepare
(one read per rank instead of a scan of every tar header), with datasets made before it still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from harness import REPO, prepare, rnnpipe

from rnnpipe.pipeline.data.manifest import read_manifest
from rnnpipe.pipeline.data.reader import SplitReader, open_split
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.train.data import PrefetchedBatches, StreamBatches

CONFIG = REPO / "configs" / "prepare" / "enwik8-head.yaml"
# 256-token samples, 16 a shard: 120 kB of text gives 422 training samples in 27 shards, enough for
# 128 streams of 3 to 4 samples each (32-token steps: a stream enters its next sample every 8 steps).
SHARDS = ["shards.sample_tokens=256", "shards.samples_per_shard=16"]
SEQ = 32


def _args(corpus: Path) -> list[str]:
    return [f"source.paths=[{corpus}]", *SHARDS]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus, a dataset of it prepared with its sample indexes); tests change copies of it."""
    base = tmp_path_factory.mktemp("reader")
    corpus = base / "corpus.txt"
    rng = np.random.default_rng(0)
    corpus.write_bytes(rng.integers(32, 127, 120_000, dtype=np.uint8).tobytes())
    assert prepare(CONFIG, base / "d", *_args(corpus)) == 0
    return corpus, base / "d"


@pytest.fixture
def dataset(built, tmp_path) -> Path:
    shutil.copytree(built[1], tmp_path / "d")  # (copy2: the files keep their mtimes)
    return tmp_path / "d"


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The paths the local filesystem opens from now on (every shard and index read goes through it)."""
    paths: list[str] = []
    orig = LocalFileSystem._open

    def counting(fs, path, *args, **kwargs):
        paths.append(str(path))
        return orig(fs, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", counting)
    return paths


def _needed(reader, loader: StreamBatches, steps: int) -> int:
    """Sample reads the loader's streams need over ``steps`` steps: each stream's first sample and
    one per sample it enters (the split's samples, forward or reversed)."""
    n, N = reader.sample_tokens, reader.tokens
    backward = type(reader).__name__ == "ReversedReader"
    total = 0
    for j in range(loader.rank * loader.batch, (loader.rank + 1) * loader.batch):
        touched: set[int] = set()
        for k in range(steps):
            a = int(loader.bounds[j]) + k * SEQ
            b = min(a + SEQ, int(loader.bounds[j + 1]))  # tokens [a, b] are read
            if b > a:
                lo, hi = (N - 1 - b, N - 1 - a) if backward else (a, b)
                touched |= set(range(lo // n, hi // n + 1))
        total += len(touched)
    return total


@pytest.mark.parametrize(("streams", "direction"), [(64, "forward"), (128, "forward"), (128, "backward")])
def test_sample_reads_are_the_streams_sample_crossings(built, opened, streams, direction):
    """A 64-sample LRU read by 64 or 128 streams in turn evicted each sample just before its next
    use: 30 and 129 reads a step where the streams enter 0.5 and 1 new samples."""
    reader = open_split(str(built[1]), "train", direction=direction)
    loader = StreamBatches(reader, 0, 1, streams, SEQ)
    steps = loader.steps_per_epoch
    assert steps * SEQ >= 3 * reader.sample_tokens  # every stream enters several samples
    opened.clear()
    for _ in range(steps):
        next(loader)
    reads = sum(p.endswith(".tar") for p in opened)
    need = _needed(reader, loader, steps)
    assert reads <= need, f"{reads} sample reads over {steps} steps, the streams need {need}"


def _same(a, b) -> None:
    assert torch.equal(a.inputs_BT, b.inputs_BT) and torch.equal(a.targets_BT, b.targets_BT)
    assert (a.reset, a.targets) == (b.reset, b.targets)


def test_prefetched_batches_and_positions_are_the_plain_readers(built):
    root = str(built[1])
    plain = StreamBatches(SplitReader(root, "train"), 1, 2, 5, SEQ)
    pre = PrefetchedBatches(StreamBatches(SplitReader(root, "train"), 1, 2, 5, SEQ))
    assert (pre.batch, pre.world, pre.steps_per_epoch) == (5, 2, plain.steps_per_epoch)  # its attributes
    states = []
    for _ in range(plain.steps_per_epoch + 3):  # into the second epoch
        _same(next(plain), next(pre))
        # the consumer's position, not the prefetcher's (a step ahead)
        assert pre.state_dict() == plain.state_dict()
        states.append(plain.state_dict())
    # resume: a fresh loader at a saved position, and this one moved back while a read is in flight
    for k in (3, 0):
        again = PrefetchedBatches(StreamBatches(SplitReader(root, "train"), 1, 2, 5, SEQ))
        for loader in (again, pre):
            loader.load_state_dict(states[k])
            ref = StreamBatches(SplitReader(root, "train"), 1, 2, 5, SEQ)
            ref.load_state_dict(states[k])
            for _ in range(4):
                _same(next(ref), next(loader))
            assert loader.state_dict() == ref.state_dict()
    thread = pre._thread
    pre.close()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_damaged_shard_read_in_the_prefetch_thread_raises_the_same_error(dataset):
    root = str(dataset)
    plain = StreamBatches(SplitReader(root, "train"), 0, 1, 2, SEQ)
    pre = PrefetchedBatches(StreamBatches(SplitReader(root, "train"), 0, 1, 2, SEQ))
    shard = dataset / "train" / "train-000001.tar"  # samples 16-31: stream 0 reaches it at step 127
    os.truncate(shard, 1700)  # after the readers indexed it: inside sample 16's tokens
    errors = []
    for loader in (plain, pre):
        with pytest.raises(PipelineError) as e:
            for _ in range(plain.steps_per_epoch):
                next(loader)
        errors.append((str(e.value), loader.state_dict()))
        if loader is pre:  # it was read in the thread, and is raised unchanged in the loop
            frames = [f.name for f in traceback.extract_tb(e.value.__traceback__)]
            assert "_prefetch" in frames and "__next__" in frames, frames
    assert errors[0] == errors[1]
    assert errors[0][0].startswith(f"{shard}: sample 16: read ") and "(truncated)" in errors[0][0]
    assert errors[0][1]["step_in_epoch"] == (16 * 256 - SEQ) // SEQ  # the step that needs it, not before


def test_a_rank_reads_the_sample_index_not_every_tar_header(built, dataset, opened, tmp_path):
    manifest = read_manifest(str(dataset))
    index = manifest["splits"]["train"]["index"]
    assert index["path"] == "train/train-index.npy"
    assert (dataset / index["path"]).stat().st_size == index["size"]
    opened.clear()
    reader = SplitReader(str(dataset), "train")
    assert [Path(p).name for p in opened if "/train/" in p] == ["train-index.npy"]  # one read, no shard
    # the same places as the tar headers give (a manifest without the index: today's scan)
    scanned = _without_index(Path(shutil.copytree(built[1], tmp_path / "old")))
    opened.clear()
    old = SplitReader(str(scanned), "train")
    assert sum(p.endswith(".tar") for p in opened) == len(manifest["splits"]["train"]["shards"])
    assert np.array_equal(reader._places, old._places)
    assert [Path(u).name for u in reader._urls] == [Path(u).name for u in old._urls]
    assert np.array_equal(reader.read(0, reader.tokens), old.read(0, old.tokens))
    # a shard modified after the index was written is read from its headers (and checked there)
    shard = dataset / "train" / "train-000003.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, (dataset / index["path"]).stat().st_mtime_ns + 1))
    opened.clear()
    SplitReader(str(dataset), "train")
    assert [Path(p).name for p in opened if "/train/" in p] == ["train-index.npy", "train-000003.tar"]
    # shuffle mode's spawned workers get the reader pickled (its lock is not)
    assert np.array_equal(pickle.loads(pickle.dumps(reader)).read(5000, 6000), reader.read(5000, 6000))


def _without_index(root: Path) -> Path:
    """``root`` as a dataset prepared before the index: no index file, no manifest entry."""
    m = json.loads((root / "manifest.json").read_text())
    for info in m["splits"].values():
        (root / info.pop("index")["path"]).unlink()
    (root / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    return root


def test_a_dataset_without_the_index_reads_and_prepare_adds_it(built, dataset, caplog):
    corpus, original = built
    before = read_manifest(str(dataset))
    _without_index(dataset)
    with caplog.at_level(logging.INFO, logger="rnnpipe.pipeline.data.reader"):
        reader = SplitReader(str(dataset), "train")
        SplitReader(str(dataset), "valid")
    told = [r.getMessage() for r in caplog.records if "no sample index" in r.getMessage()]
    assert len(told) == 1 and f"rnnpipe prepare {dataset}/config.yaml output={dataset}" in told[0]
    same = SplitReader(str(original), "train").read(0, reader.tokens)
    assert np.array_equal(reader.read(0, reader.tokens), same)
    assert rnnpipe("verify", dataset) == 0
    # the same prepare again: it adds the indexes; shards and fingerprint stay as they are
    tars = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in dataset.glob("*/*.tar")}
    assert prepare(CONFIG, dataset, *_args(corpus)) == 0
    after = read_manifest(str(dataset))
    assert after == before  # (the index entries included: byte-identical indexes)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in dataset.glob("*/*.tar")} == tars
    for split in ("train", "valid", "test"):
        path = after["splits"][split]["index"]["path"]
        assert (dataset / path).read_bytes() == (original / path).read_bytes()
    assert rnnpipe("verify", dataset) == 0


def test_verify_checks_the_index_and_a_damaged_one_falls_back_to_the_headers(dataset, capsys, caplog):
    index = dataset / "train" / "train-index.npy"
    rows = np.load(index)
    rows[20, 1] += 512  # sample 20 (shard 1) placed one block later: counts and sizes still agree
    np.save(index, rows)
    m = json.loads((dataset / "manifest.json").read_text())
    m["splits"]["train"]["index"].update(
        size=index.stat().st_size, sha256=hashlib.sha256(index.read_bytes()).hexdigest()
    )
    (dataset / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert rnnpipe("verify", dataset, "--quick") == 0  # (sizes and hashes only)
    assert rnnpipe("verify", dataset) == 1
    err = capsys.readouterr().err
    assert "train/train-index.npy: places sample 20 (train/train-000001.tar) at byte" in err, err
    # a flipped byte: verify names it, and the reader warns and reads the tar headers instead
    data = bytearray(index.read_bytes())
    data[-1] ^= 1
    index.write_bytes(bytes(data))
    assert rnnpipe("verify", dataset, "--quick") == 1
    assert "train/train-index.npy: " in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="rnnpipe.pipeline.data.reader"):
        reader = SplitReader(str(dataset), "train")
    assert any("reading the train shards' tar headers instead" in r.getMessage() for r in caplog.records)
    assert reader._places[20, 1] == rows[20, 1] - 512
