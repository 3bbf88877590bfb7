"""enwik8 as bytes: the shards are the file, split 90/5/5, readable by stock tools."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import numpy as np
import pytest
import webdataset as wds
from harness import REPO, prepare, read_split, rnnpipe

from rnnpipe.pipeline.data.sources import ENWIK8_SHA256

CONFIG = REPO / "configs" / "prepare" / "enwik8-head.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from harness import data_file

    src = data_file("enwik8-head/enwik8-head.txt")
    out = tmp_path_factory.mktemp("enwik8") / "data"
    # Small samples and shards so that every split spans several of each.
    assert (
        prepare(
            CONFIG,
            out,
            f"source.paths=[{src}]",
            "shards.sample_tokens=20000",
            "shards.samples_per_shard=7",
            "source.unit_mb=0.5",
        )
        == 0
    )
    return src, out


def test_shards_decode_to_the_file_byte_for_byte(dataset):
    src, out = dataset
    original = src.read_bytes()
    parts = [read_split(out, split)[0] for split in ("train", "valid", "test")]
    assert all(p.dtype == np.uint8 for p in parts)
    assert b"".join(p.tobytes() for p in parts) == original


def test_split_sizes_are_90_5_5(dataset):
    src, out = dataset
    n = src.stat().st_size
    manifest = json.loads((out / "manifest.json").read_text())
    sizes = {s: manifest["splits"][s]["tokens"] for s in ("train", "valid", "test")}
    assert n == 4_154_064
    assert sizes == {"train": n - 2 * round(n * 0.05), "valid": round(n * 0.05), "test": round(n * 0.05)}
    assert abs(sizes["train"] / n - 0.90) < 1e-6 and abs(sizes["valid"] / n - 0.05) < 1e-6
    for s in sizes:  # bytes tokenizer: a token is a byte
        assert manifest["splits"][s]["bytes"] == sizes[s]


def test_manifest_describes_every_shard(dataset):
    src, out = dataset
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == {
        "kind": "bytes",
        "vocab_size": 256,
        "model_file": None,
        "model_sha256": None,
        "special_ids": {"eod": None},
    }
    assert manifest["dtype"] == "uint8"
    (inp,) = manifest["source"]["inputs"]
    assert inp["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest() and inp["size"] == 4_154_064
    train = manifest["splits"]["train"]
    assert len(train["shards"]) == -(-train["samples"] // 7) > 1
    for i, shard in enumerate(train["shards"]):
        path = out / shard["path"]
        assert shard["path"] == f"train/train-{i:06d}.tar"
        assert shard["size"] == path.stat().st_size
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (out / "config.yaml").read_text().startswith("output:")
    assert not (out / ".work").exists()


def test_samples_are_contiguous_runs_with_positions(dataset):
    _, out = dataset
    tokens, metas = read_split(out, "train")
    offset = 0
    for i, m in enumerate(metas):
        assert m["index"] == i and m["token_offset"] == offset
        assert m["tokens"] == (20000 if i < len(metas) - 1 else len(tokens) - offset)
        assert m["bytes"] == m["tokens"] and m["doc_first"] == m["doc_last"] == 0
        offset += m["tokens"]
    assert metas[0]["doc_starts"] == [0] and all(m["doc_starts"] == [] for m in metas[1:])


def test_stock_webdataset_reads_shards_in_stream_order(dataset):
    src, out = dataset
    urls = sorted(str(p) for p in (out / "valid").glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys) == [f"valid-{i:09d}" for i in range(len(samples))]
    data = b"".join(s["npy"].tobytes() for s in samples)
    n = src.stat().st_size
    assert data == src.read_bytes()[n - 2 * round(n * 0.05) : n - round(n * 0.05)]
    assert all(s["json"]["tokens"] == len(s["npy"]) for s in samples)


def test_tar_lists_the_shards(dataset):
    _, out = dataset
    shard = out / "test" / "test-000000.tar"
    listing = subprocess.run(["tar", "-tvf", str(shard)], capture_output=True, text=True, check=True).stdout
    names = [line.split()[-1] for line in listing.splitlines()]
    assert names[:4] == [
        "test-000000000.json",
        "test-000000000.npy",
        "test-000000001.json",
        "test-000000001.npy",
    ]
    assert "rnnpipe/rnnpipe" in listing and "2000-01-01" in listing


def test_verify_passes(dataset, capsys):
    _, out = dataset
    assert rnnpipe("verify", out) == 0
    assert "OK" in capsys.readouterr().out


def test_full_size_enwik8_with_wrong_checksum_is_refused(tmp_path, capsys):
    fake = tmp_path / "enwik8"
    with open(fake, "wb") as f:
        f.truncate(100_000_000)  # enwik8's length, not its bytes
    out = tmp_path / "out"
    assert prepare(CONFIG, out, f"source.paths=[{fake}]") == 1
    err = capsys.readouterr().err
    assert ENWIK8_SHA256 in err and "corrupt" in err and str(fake) in err
    assert not (out / "manifest.json").exists()


def test_local_and_inline_executors_write_identical_shards(dataset, tmp_path):
    src, out = dataset
    other = tmp_path / "local"
    assert (
        prepare(
            CONFIG,
            other,
            f"source.paths=[{src}]",
            "shards.sample_tokens=20000",
            "shards.samples_per_shard=7",
            "source.unit_mb=0.3",
            "executor.workers=2",
            executor="local",
        )
        == 0
    )
    for split in ("train", "valid", "test"):
        for path in sorted((out / split).glob("*.tar")):
            assert (other / split / path.name).read_bytes() == path.read_bytes(), path.name
    assert os.listdir(other / "train") == os.listdir(out / "train")
