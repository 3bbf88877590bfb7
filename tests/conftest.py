"""Shared fixtures. Tests that need ../shared/data skip, saying so, when it is absent; the helpers
they share are in harness.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from harness import data_file

# Without a GPU, the Triton kernels run in Triton's interpreter (it must be set before they load).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
