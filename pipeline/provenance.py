"""Provenance: which code, library versions and machines made an output.

Every stage output records :func:`provenance` (the dataset's ``provenance.json``, each pretrain
checkpoint and export, each fine-tune ``result.json``, the collected table): the code version
(the git commit and whether the tracked packages had uncommitted changes; for code running from a
Slurm submission's snapshot, the snapshot's digest and the commit it was taken from; else the
package version), the versions of python, torch, deepspeed and triton, the host, and, where the
caller knows them, the world size and every rank's host.

Versions are read from package metadata, never by importing the package: a config check must stay
fast, and recording provenance must not load CUDA.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import rnnpipe
from rnnpipe import __version__

# The folders of a checkout that hold the code a run's results depend on (the rnnpipe package).
PACKAGES = ("rnnpipe", "launch", "pipeline", "kernels")
# Written into a code snapshot (launch.processes.snapshot) beside the packages.
SNAPSHOT_MARKER = "SNAPSHOT.json"


def code_root() -> Path:
    """The directory holding the ``rnnpipe`` package: a checkout (whose top-level folders it maps),
    a Slurm submission's snapshot, or site-packages."""
    return Path(rnnpipe.__file__).resolve().parent.parent


def git_state(root: Path) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` for a git checkout at ``root``, else None. Dirty means a
    tracked or new file under the packages differs from the commit (``runs/`` and other ignored
    files do not count)."""
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", *PACKAGES],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """This process's code: ``{"rnnpipe": version, "git": {...} | None, "snapshot": {...} | None}``."""
    root = code_root()
    marker = root / SNAPSHOT_MARKER
    if marker.exists():  # a Slurm job running the code as it was submitted
        snap = json.loads(marker.read_text())
        return {
            "rnnpipe": snap.get("rnnpipe", __version__),
            "git": snap.get("git"),
            "snapshot": {"digest": snap["digest"], "path": str(root)},
        }
    return {"rnnpipe": __version__, "git": git_state(root), "snapshot": None}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str | None]:
    """The versions of the libraries whose numerics a result depends on."""
    return {
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "deepspeed", "triton", "numpy", "sentencepiece")},
    }


def provenance(world_size: int | None = None, hosts: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """The record every stage output carries (see the module docstring); ``extra`` is added as is
    (``executor="slurm"``)."""
    out: dict[str, Any] = {
        "code": code_version(),
        "versions": library_versions(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if "SLURM_JOB_ID" in os.environ:
        out["slurm_job"] = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ["SLURM_JOB_ID"]
        if "SLURM_ARRAY_TASK_ID" in os.environ:
            out["slurm_job"] += "_" + os.environ["SLURM_ARRAY_TASK_ID"]
    if world_size is not None:
        out["world_size"] = world_size
    if hosts is not None:
        out["hosts"] = sorted(set(hosts))
    out.update(extra)
    return out


def describe_code(code: dict[str, Any]) -> str:
    """One line for logs: ``git 1a2b3c4d5e6f (dirty)``, ``snapshot 9f8e… of git 1a2b…``, or the version."""
    git = code.get("git")
    where = f"git {git['commit'][:12]}{' (dirty)' if git['dirty'] else ''}" if git else ""
    snap = code.get("snapshot")
    if snap:
        return f"snapshot {snap['digest'][:12]}" + (f" of {where}" if where else "")
    return where or f"rnnpipe {code.get('rnnpipe')}"
