"""The native build cache (issue 28, item 3; kernels/cpu_native.py): a library is loaded only from
a cache directory this user owns and no one else can write, only when its sha256 matches the one
recorded when it was built, and only with the functions rnnpipe calls; anything else is built again
or the PyTorch loop runs, never a crash (a truncated library used to kill the process with SIGBUS).

Each test compiles at most two small libraries with the system C compiler (well under a second each)
and skips, saying so, where there is none."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rnnpipe.kernels import cpu_native
from rnnpipe.kernels import reference as R

CC = shutil.which(os.environ.get("CC", "cc"))
pytestmark = pytest.mark.skipif(
    CC is None, reason="no C compiler (cc or $CC): no native library can be built here"
)

# A library as an attacker would plant it: the functions rnnpipe looks for, and a constructor that
# runs when the library is mapped (it writes the file $RNNPIPE_TEST_MARKER names).
PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *p = getenv("RNNPIPE_TEST_MARKER");
    FILE *f = p ? fopen(p, "w") : 0;
    if (f) { fputs("the planted constructor ran\n", f); fclose(f); }
}
void lrn_forward_f32(void) {}
void lrn_forward_f64(void) {}
"""
EMPTY = "int rnnpipe_not_the_forward(void) { return 0; }\n"  # a library without the functions


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh cache directory (not created yet) that library() uses, its memo cleared around the test."""
    monkeypatch.setenv("RNNPIPE_NATIVE_CACHE", str(tmp_path / "native"))
    monkeypatch.delenv("RNNPIPE_NATIVE", raising=False)
    cpu_native.library.cache_clear()
    yield tmp_path / "native"
    cpu_native.library.cache_clear()


def compile_library(source: str, out: Path, record: bool) -> None:
    """Compile ``source`` into ``out`` (a shared library); with ``record`` write its sha256 beside
    it as a build does, so the hash check passes and what follows it is tested."""
    src = out.parent / f"{out.name}.c"
    src.write_text(source)
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(out), str(src)], check=True, capture_output=True)
    src.unlink()
    if record:
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        cpu_native.record_of(out).write_text(f"{digest}  {out.name}\n")


def _works() -> None:
    """The loaded library computes LRN's forward (a real build, not what was planted)."""
    x = torch.randn(2, 5, 8)
    h = cpu_native.forward(x, x, x, None, None)
    assert h is not None
    torch.testing.assert_close(h, R.lrn_loop(x, x, x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "someone else's"])
def test_a_library_planted_in_a_cache_others_control_is_never_loaded(
    cache, tmp_path, monkeypatch, caplog, how
):
    cache.mkdir(mode=0o700)
    if how == "someone else's":
        if os.getuid() != 0:
            pytest.skip("only root can give the directory to another user")
        os.chown(cache, 65534, -1)  # nobody
    else:
        os.chmod(cache, 0o777 if how == "world-writable" else 0o770)
    target = cpu_native.library_path(CC)
    compile_library(PLANTED, target, record=True)  # its record too: the attacker can write both
    marker = tmp_path / "marker"
    monkeypatch.setenv("RNNPIPE_TEST_MARKER", str(marker))
    with caplog.at_level(logging.INFO, logger="rnnpipe.kernels"):
        assert cpu_native.library() is None
    assert not marker.exists(), "the planted library was loaded: its constructor ran"
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(told) == 1 and str(cache) in told[0], told
    assert "chmod go-w" in told[0] and "RNNPIPE_NATIVE_CACHE" in told[0] and "PyTorch loop" in told[0]
    assert ("not by you" if how == "someone else's" else "is writable by") in told[0]
    x = torch.randn(2, 3, 4)
    assert cpu_native.forward(x, x, x, None, None) is None  # the callers take the PyTorch loop


def test_a_truncated_library_is_built_again_before_it_is_mapped(cache, caplog):
    """Truncated in place (a copy cut short, a full disk): mapping it killed every CPU LRN run
    with SIGBUS, and it stayed in the cache. Now the sha256 check catches it first."""
    cache.mkdir(mode=0o700)
    path = cpu_native.library_path(CC)
    assert cpu_native._build(CC, path) is None  # built as library() builds, not mapped by this process
    recorded = cpu_native.record_of(path).read_text().split()[0]
    assert recorded == hashlib.sha256(path.read_bytes()).hexdigest()
    os.truncate(path, path.stat().st_size // 2)
    with caplog.at_level(logging.INFO, logger="rnnpipe.kernels"):
        assert cpu_native.library() is not None
    assert f"{path}: its sha256 " in caplog.text and "building it again" in caplog.text
    assert hashlib.sha256(path.read_bytes()).hexdigest() == cpu_native.record_of(path).read_text().split()[0]
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [path.name, f"{path.name}.sha256"]
    )  # no temporaries
    _works()


def test_a_library_without_the_functions_is_built_again(cache, caplog):
    """Recorded and whole, but not the forward (today: AttributeError from every CPU LRN call)."""
    cache.mkdir(mode=0o700)
    path = cpu_native.library_path(CC)
    compile_library(EMPTY, path, record=True)
    with caplog.at_level(logging.INFO, logger="rnnpipe.kernels"):
        assert cpu_native.library() is not None
    assert f"{path}: it lacks lrn_forward_f32, lrn_forward_f64; building it again" in caplog.text
    _works()


def test_a_build_keeps_the_cache_private_and_one_without_a_record_is_built_again(cache, caplog):
    """Under a umask of 002 the cache library() creates is 0700 and its library 0700 (the linker's
    0775 would fail the check next time). One without a record (built by an rnnpipe before the
    records): built again, quietly."""
    old = os.umask(0o002)
    try:
        assert cpu_native.library() is not None
        path = cpu_native.library_path(CC)
        assert (cache.stat().st_mode & 0o777, path.stat().st_mode & 0o777) == (0o700, 0o700)
        cpu_native.record_of(path).unlink()
        cpu_native.library.cache_clear()
        with caplog.at_level(logging.INFO, logger="rnnpipe.kernels"):
            assert cpu_native.library() is not None
    finally:
        os.umask(old)
    assert f"{path}: no sha256 recorded in {path.name}.sha256; building it again" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert cpu_native.record_of(path).read_text().split()[0] == hashlib.sha256(path.read_bytes()).hexdigest()
    _works()
