"""The code a Slurm submission runs: a snapshot of the rnnpipe package, taken when it is submitted.

A queued job starts hours later; with an editable install it would run whatever the working tree
holds by then. So every submission copies the package (its code, the shipped ``configs/`` and
``slurm/``) into ``<submission folder>/code-<digest>/rnnpipe/``, laid out as a wheel installs it,
and its jobs import from there (lingua's stool copies the code into the dump dir the same way):

- submitit jobs start ``python <snapshot>/submitit_job.py -u -m submitit.core._submit FOLDER``:
  the script's own directory, the snapshot, comes first on ``sys.path`` (ahead of the job's working
  directory, which ``python -m`` would put first). It holds one package, ``rnnpipe``: no generic
  name (``kernels``, ``pipeline``) ever reaches ``sys.path``;
- the plain sbatch scripts run ``<snapshot>/bin/rnnpipe``, the CLI from the snapshot, and source
  ``<snapshot>/rnnpipe/slurm/common.sh``.

``SNAPSHOT.json`` beside the package records the digest (sha256 over every copied file's path and
bytes) and the git commit it was taken from; :func:`rnnpipe.pipeline.provenance.code_version`
reports it from inside a job. A job that submits more jobs (the prepare driver's arrays) passes its
own snapshot on.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import rnnpipe
from rnnpipe import __version__
from rnnpipe.launch.processes.shipped import shipped_dir
from rnnpipe.pipeline.provenance import SNAPSHOT_MARKER, code_root, git_state

SUBMITIT_ENTRY = "submitit_job.py"
CLI_ENTRY = "bin/rnnpipe"

_SUBMITIT_SCRIPT = '''\
"""Run submitit's job entry point with this snapshot's packages first on sys.path (rnnpipe)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if os.environ.get("RNNPIPE_EARLY_STOP") == "1":  # a training job: keep a signal that comes early
    from rnnpipe.pipeline.engine.signals import early

    early()
args = sys.argv[1:]
if args[:1] == ["-u"]:  # submitit asks for unbuffered output
    sys.stdout.reconfigure(write_through=True)
    sys.stderr.reconfigure(write_through=True)
    args = args[1:]
if args[:1] != ["-m"] or len(args) < 2:
    sys.exit("usage: python submitit_job.py [-u] -m MODULE ARGS...")
sys.argv = [args[1], *args[2:]]
runpy.run_module(args[1], run_name="__main__", alter_sys=True)
'''

_CLI_SCRIPT = '''\
#!{python}
"""The rnnpipe command from this snapshot of the code (rnnpipe)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
from rnnpipe.launch.cli import main

sys.exit(main())
'''


@dataclass
class Snapshot:
    """A copy of the code at ``path``; ``digest`` names its content."""

    path: str
    digest: str

    def python_command(self) -> str:
        """submitit's ``python`` option: the interpreter, starting the job from this snapshot."""
        return f"{shlex.quote(sys.executable)} {shlex.quote(os.path.join(self.path, SUBMITIT_ENTRY))}"

    def cli(self) -> str:
        """The rnnpipe command of this snapshot (for the plain sbatch scripts)."""
        return os.path.join(self.path, CLI_ENTRY)


def _sources() -> dict[str, Path]:
    """Where each part of the running package lives: its path in a snapshot -> the folder it is
    copied from (one folder in a wheel or a snapshot; the checkout's top-level folders in a checkout)."""
    parts = {"rnnpipe": Path(rnnpipe.__file__).resolve().parent}
    for sub in ("pipeline", "kernels", "launch"):
        module = importlib.import_module(f"rnnpipe.{sub}")
        parts[f"rnnpipe/{sub}"] = Path(module.__file__).resolve().parent
    for sub in ("configs", "slurm"):
        parts[f"rnnpipe/{sub}"] = shipped_dir(sub)
    return parts


def _files() -> list[tuple[str, Path]]:
    """The files to copy: (path in the snapshot, source file), sorted by the former. The package's
    own folder gives its top-level modules only: its subpackages are listed on their own."""
    out = []
    for dest, src in _sources().items():
        paths = src.glob("*") if dest == "rnnpipe" else src.rglob("*")
        for path in paths:
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                out.append((f"{dest}/{path.relative_to(src)}", path))
    return sorted(out)


def digest_of(files: list[tuple[str, Path]]) -> str:
    """sha256 over every file of the code (its path in the snapshot and its bytes)."""
    h = hashlib.sha256()
    for rel, path in files:
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def current() -> Snapshot | None:
    """The snapshot this process runs from, if it runs from one."""
    root = code_root()
    marker = root / SNAPSHOT_MARKER
    if not marker.exists():
        return None
    return Snapshot(str(root), json.loads(marker.read_text())["digest"])


def take(folder: str) -> Snapshot:
    """Copy the running code into ``folder/code-<digest>`` (once per content) and return it; inside
    a job that runs from a snapshot, that snapshot."""
    running = current()
    if running is not None:
        return running
    root = code_root()
    files = _files()
    digest = digest_of(files)
    dest = Path(folder) / f"code-{digest[:12]}"
    if (dest / SNAPSHOT_MARKER).exists():
        return Snapshot(str(dest), digest)
    tmp = dest.with_name(dest.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, src in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, tmp / rel)
    (tmp / SUBMITIT_ENTRY).write_text(_SUBMITIT_SCRIPT)
    cli = tmp / CLI_ENTRY
    cli.parent.mkdir(parents=True, exist_ok=True)
    cli.write_text(_CLI_SCRIPT.format(python=sys.executable))
    cli.chmod(0o755)
    marker = {
        "digest": digest,
        "source": str(root),
        "git": git_state(root),
        "rnnpipe": __version__,
        "taken": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (tmp / SNAPSHOT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    if dest.exists():  # another submission took the same content meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return Snapshot(str(dest), digest)
