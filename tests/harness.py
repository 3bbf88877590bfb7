"""What the tests share: the repository and data paths, the CLI in-process and as a command, and
the tiny datasets. Tests import it as ``harness`` (pytest puts tests/ on sys.path; the repository
root never is, so no test can import a bare ``kernels``, ``pipeline`` or ``launch``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rnnpipe.launch.cli import main

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("RNNPIPE_DATA", REPO.parent / "shared" / "data")).resolve()
# The rnnpipe command in a subprocess, as the installed console script runs it: -P keeps the
# working directory off sys.path (the repository root holds folders named kernels/ and pipeline/).
CLI = [sys.executable, "-P", "-m", "rnnpipe"]


# The pretrain runs of the tests: tiny-lrn.yaml made smaller still (1 layer of width 32, 2 × 32
# tokens a step, the final evaluation capped), a few seconds a run. A test adds its own keys after
# these (a later key=value wins).
PRETRAIN_CONFIG = REPO / "configs" / "pretrain" / "tiny-lrn.yaml"
TINY_PRETRAIN = (
    "model.n_layers=1",
    "model.d_model=32",
    "model.mlp_ratio=2.0",
    "data.seq_len=32",
    "data.batch_size=2",
    "train.eval_batch_size=2",
    "train.eval_every=0",
    "eval.max_tokens=2000",  # the final evaluation's share of valid and test (all of it: minutes)
    "train.sample_tokens=0",
    "train.log_every=1",
    "optim.warmup_steps=2",
)


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment for a CLI subprocess: no progress bars, plus ``extra``."""
    return {**os.environ, "RNNPIPE_PROGRESS": "0", **extra}


def run_cli(
    *args: object, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``rnnpipe ARGS`` in a subprocess, as a user runs it (output captured as text; ``env``
    defaults to :func:`cli_env`)."""
    return subprocess.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env() if env is None else env,
        timeout=timeout,
        cwd=cwd,
    )


def pretrain_args(
    run_dir: Path, data: Path, *overrides: str, executor: str = "inline", nproc: int = 1
) -> list[str]:
    """The arguments of a tiny pretrain (``TINY_PRETRAIN``) of ``data`` into ``run_dir``, then
    ``overrides``: ``run_cli(*pretrain_args(...))`` runs it."""
    return [
        "pretrain",
        str(PRETRAIN_CONFIG),
        f"run_dir={run_dir}",
        f"data.path={data}",
        f"executor.kind={executor}",
        f"distributed.nproc={nproc}",
        *TINY_PRETRAIN,
        *overrides,
    ]


def data_file(relative: str) -> Path:
    """A file under the shared data folder, or skip the test with the reason."""
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"needs {path} (the shared data folder, RNNPIPE_DATA); it is absent here")
    return path


def rnnpipe(*args: str) -> int:
    """Run the CLI in this process; returns its exit status."""
    return main([str(a) for a in args])


def read_split(root: Path, split: str):
    """(all tokens of a split concatenated, the list of sample metas)."""
    import numpy as np

    from rnnpipe.pipeline.data.manifest import iter_split

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


def forget_plugin(module: str, registry: dict) -> None:
    """Undo what importing the plugin ``module`` registered in ``registry`` (kind -> class), and the
    import itself: a test that loads a plugin leaves the registries of its worker as it found them."""
    from rnnpipe.pipeline import plugins

    for kind, cls in list(registry.items()):
        if cls.__module__ == module:
            del registry[kind]
    sys.modules.pop(module, None)
    plugins._loaded.discard(module)


def import_test_module(relative: str):
    """A test module of another folder, imported as pytest imports it (by its name, with its folder
    on ``sys.path``), for the helpers it defines:
    ``import_test_module("integration/finetune/test_finetune").sweep_yaml``."""
    import importlib

    path = REPO / "tests" / f"{relative}.py"
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    return importlib.import_module(path.stem)


def benchmark(name: str):
    """The module ``benchmarks/NAME.py`` as its script sees its siblings: benchmarks are scripts
    (``python benchmarks/NAME.py``), which import each other by their plain names."""
    import importlib

    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)  # after site-packages: a benchmark's name never shadows a package
    return importlib.import_module(name)
