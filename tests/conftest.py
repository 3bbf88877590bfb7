"""The tiers and the shared fixtures. Tests that need ../shared/data skip, saying so, when it is
absent; the helpers they share are in harness.py.

The tiers are the folders (docs/contributing.md, "Tests"): a test under ``integration/`` is
marked ``multiprocess``, under ``cluster/`` ``slurm``, under ``package/`` ``wheel``; ``unit/``
holds the rest. ``make test-fast`` runs the unit tier without the ``slow`` tests; ``make test``
runs everything on two pytest-xdist workers, a file to a worker (``--dist loadfile``): the Slurm
tests, one file, run one after another on the one local cluster of two nodes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from harness import data_file, prepare_enwik8_head

# Without a GPU, the Triton kernels run in Triton's interpreter (it must be set before they load).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each for in-process work (a worker's OpenMP threads
    # spinning against the other's stall every parallel region; the tests that care set their own).
    torch.set_num_threads(1)

TESTS = Path(__file__).resolve().parent
TIER_MARKS = {"integration": ("multiprocess",), "cluster": ("slurm", "multiprocess"), "package": ("wheel",)}


# The files that take longest in CI (`make test` durations, worker-seconds, longest first): they
# are handed to the xdist workers first, so that the last file a worker runs is a short one and
# neither worker idles for minutes at the end (--dist loadfile hands files out in collection order).
LONGEST_FIRST = (
    "integration/train/test_hardening_train.py",
    "integration/train/test_pretrain.py",
    "cluster/test_slurm.py",
    "integration/launch/test_rerun.py",
    "integration/train/test_elastic.py",
    "unit/kernels/test_kernels_triton.py",
    "integration/finetune/test_finetune.py",
    "integration/train/test_recurrence_train.py",
    "package/test_wheel.py",
    "package/test_demo.py",
    "integration/train/test_zero3.py",
    "unit/data/test_prepare_wikipedia.py",
    "integration/launch/test_gpu_check.py",
    "integration/train/test_resume.py",
    "integration/models/test_hf_export.py",
    "unit/finetune/test_word_inputs.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its folder's tier; put the longest files first (:data:`LONGEST_FIRST`,
    the rest in their order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    order = {}
    for i, item in enumerate(items):
        parts = Path(item.path).resolve().relative_to(TESTS).parts
        tier = parts[0] if len(parts) > 1 else ""
        for name in TIER_MARKS.get(tier, ()):
            item.add_marker(getattr(pytest.mark, name))
        order[item.nodeid] = (rank.get("/".join(parts), len(rank)), i)
    items.sort(key=lambda item: order[item.nodeid])


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv("RNNPIPE_PROGRESS", "0")


@pytest.fixture(scope="session")
def enwik8_head() -> Path:
    return data_file("enwik8-head/enwik8-head.txt")


@pytest.fixture(scope="session")
def wiki_dump() -> Path:
    return data_file("wikipedia-xml/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    return data_file("tinyshakespeare/input.txt")


@pytest.fixture(scope="session")
def tiny_enwik8(tmp_path_factory) -> Path:
    """enwik8-head's first 300 kB as bytes (4,096-token samples, 16 per shard), prepared once per
    session for every test that only reads it (a test that changes a dataset prepares its own)."""
    return prepare_enwik8_head(tmp_path_factory.mktemp("data") / "enwik8-300k", limit_bytes=300000)
