"""rnnpipe as a user installs it: the wheel, built from this checkout, installed with the ``hf`` extra
into a fresh virtual environment (torch first, every version from the lock) and used from a
directory outside the repository, beside Hugging Face's ``kernels`` package that transformers
needs. The environment is made once per test session (a few minutes; pip's cache keeps it short)."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from harness import REPO

LOCK = REPO / "constraints.txt"


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built as pip builds it for a user (an isolated build environment) from the files
    a clone would have: tracked or new and not ignored, copied out, so nothing stale in build/ or
    left by an editable install can slip into it."""
    tree = tmp_path_factory.mktemp("source") / "rnnpipe"
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        if (REPO / rel).is_file():
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, tree / rel)
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(tree)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("rnnpipe-*.whl")
    return path


def test_the_wheel_installs_one_package_with_the_shipped_configs_and_scripts(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"rnnpipe"}  # no bare kernels, pipeline or launch
    info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(info).decode().split() == ["rnnpipe"]
    # every package folder of the checkout is in it (pyproject.toml lists them one by one)
    for folder in ("pipeline", "kernels", "launch"):
        for init in (REPO / folder).rglob("__init__.py"):
            assert f"rnnpipe/{init.relative_to(REPO).as_posix()}" in names
    for shipped in ("configs", "slurm"):
        files = [p for p in (REPO / shipped).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files
        for p in files:
            assert f"rnnpipe/{p.relative_to(REPO).as_posix()}" in names
    assert "rnnpipe/kernels/csrc/lrn_forward.c" in names


@pytest.fixture(scope="session")
def user_env(tmp_path_factory, wheel) -> Path:
    """A fresh virtual environment with torch, then the wheel and its hf extra, from the lock."""
    venv = tmp_path_factory.mktemp("user") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile"]
    pip += ["--constraint", str(LOCK)]
    for what in ("torch", f"rnnpipe[hf] @ {wheel.as_uri()}"):  # torch first: the CPU build where it lies
        done = subprocess.run([*pip, what], capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, f"pip install {what}: {done.stderr[-3000:]}"
    return venv


def _corpus(path: Path) -> Path:
    """About 60 KB of made-up text: enough for a few shards of a character-level dataset."""
    rng = random.Random(0)
    words = ["the", "recurrent", "model", "reads", "a", "stream", "of", "text", "and", "carries", "state"]
    lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(1000)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_user_prepares_pretrains_exports_and_samples_from_their_own_directory(user_env, tmp_path):
    """The installed command from a directory that is not the checkout, with shipped configs named
    without a path; then transformers' GPT-2 classes, Hugging Face's kernels and rnnpipe side by
    side in one Python, and the export loaded by AutoModelForCausalLM without remote code."""
    work = tmp_path / "my-project"
    work.mkdir()
    corpus = _corpus(work / "corpus.txt")
    rnnpipe = str(user_env / "bin" / "rnnpipe")
    env = {"PATH": f"{user_env / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "RNNPIPE_PROGRESS": "0"}

    def run(*args: str) -> str:
        done = subprocess.run(
            [rnnpipe, "-q", *args], cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"rnnpipe {' '.join(args)}:\n{done.stderr[-3000:]}"
        return done.stdout

    assert "pretrain/tiny-lrn" in run("configs")
    run(
        "prepare", "tinyshakespeare", "output=data", f"source.paths=[{corpus}]",
        "shards.sample_tokens=4096", "--executor", "inline",
    )  # fmt: skip
    run(
        "pretrain", "tiny-lrn", "run_dir=run", "data.path=data", "train.steps=4", "model.d_model=32",
        "data.seq_len=32", "data.batch_size=2", "train.eval_every=0", "train.eval_max_tokens=2000",
        "train.eval_batch_size=2", "train.sample_tokens=0", "--executor", "inline",
    )  # fmt: skip
    run("export", "run", "export")
    text = run("sample", "export", "--prompt", "the model", "-n", "20", "--seed", "0")
    assert text.startswith("the model") and len(text) > len("the model")
    config = json.loads((work / "export" / "config.json").read_text())
    assert str(work) not in json.dumps(config) and str(tmp_path) not in json.dumps(config)

    check = """
import json, sys
import kernels, rnnpipe, torch, transformers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from rnnpipe.pipeline.models import load_pretrained
assert kernels.__file__.startswith(sys.prefix) and hasattr(kernels, "get_kernel"), kernels.__file__
assert rnnpipe.__file__.startswith(sys.prefix), rnnpipe.__file__
gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
model = AutoModelForCausalLM.from_pretrained("export")  # no trust_remote_code
ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
assert torch.equal(model(ids).logits, load_pretrained("export")(ids)[0])
print(json.dumps({"model": type(model).__module__, "kernels": kernels.__file__}))
"""
    done = subprocess.run(
        [str(user_env / "bin" / "python"), "-c", check], cwd=work, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1])["model"] == "rnnpipe.pipeline.models.hf.modeling"
