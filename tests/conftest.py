"""Shared fixtures. Tests that need ../shared/data skip, saying so, when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from launch.cli import main

# Without a GPU, the Triton kernels run in Triton's interpreter (it must be set before they load).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RNNPIPE_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("RNNPIPE_PROGRESS", "0")


def data_file(relative: str) -> Path:
    """A file under the shared data folder, or skip the test with the reason."""
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder, RNNPIPE_DATA); it is absent here")
    return path


@pytest.fixture(scope="session")
def enwik8_head() -> Path:
    return data_file("enwik8-head/enwik8-head.txt")


@pytest.fixture(scope="session")
def wiki_dump() -> Path:
    return data_file("wikipedia-xml/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    return data_file("tinyshakespeare/input.txt")


def rnnpipe(*args: str) -> int:
    """Run the CLI in this process; returns its exit status."""
    return main([str(a) for a in args])


def read_split(root: Path, split: str):
    """(all tokens of a split concatenated, the list of sample metas)."""
    import numpy as np

    from pipeline.data.manifest import iter_split

    arrays, metas = [], []
    for tokens, meta in iter_split(str(root), split):
        arrays.append(tokens)
        metas.append(meta)
    return np.concatenate(arrays), metas


def prepare(config, out, *overrides: str, executor: str = "inline") -> int:
    """``rnnpipe prepare CONFIG output=OUT OVERRIDES --executor EXECUTOR``; returns its exit status."""
    return rnnpipe("prepare", config, f"output={out}", *overrides, "--executor", executor)


def prepare_enwik8_head(out: Path, limit_bytes: int = 0) -> Path:
    """The pretrain tests' tiny dataset: enwik8-head as bytes (its first ``limit_bytes``; 0 = all),
    4,096-token samples, 16 per shard, prepared into ``out``; skips when the data is absent."""
    src = data_file("enwik8-head/enwik8-head.txt")
    limit = [f"source.limit_bytes={limit_bytes}"] if limit_bytes else []
    overrides = ["shards.sample_tokens=4096", "shards.samples_per_shard=16"]
    code = prepare(
        REPO / "configs/prepare/enwik8-head.yaml", out, f"source.paths=[{src}]", *limit, *overrides
    )
    assert code == 0
    return out
