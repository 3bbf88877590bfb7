"""Exports under hostile input and interruption (issue 28): OUT replaced whole whatever step a
kill lands on, the user's files kept, a received export's links and code never copied or run,
an export's config checked against its weights before anything is built, one-line messages,
and a backward LM sampled backwards. In-process, with a checkpoint's consolidation faked (tiny
models, no training); the kill test forks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from rnnpipe.launch.cli import main
from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import to_dict
from rnnpipe.pipeline.data.tokenizers import CHAR_VOCAB_FILE, ByteTokenizer, CharTokenizer, Tokenizer
from rnnpipe.pipeline.models import pretrained
from rnnpipe.pipeline.models.config import ModelConfig
from rnnpipe.pipeline.models.exported import is_export
from rnnpipe.pipeline.models.lm import LanguageModel
from rnnpipe.pipeline.models.pretrained import load_pretrained, load_pretrained_tokenizer, save_pretrained
from rnnpipe.pipeline.train import export as export_mod

CFG = ModelConfig(n_layers=1, d_model=16)


def entry(tok: Tokenizer, model_file: str | None = None) -> dict:
    """A tokenizer's manifest entry, as prepare writes it and an export copies it."""
    return {
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "model_file": model_file,
        "special_ids": tok.special_ids(),
    }


def consolidated(step: int, seed: int, direction: str = "forward") -> export_mod.Consolidated:
    """What ``consolidate`` gives for a run's checkpoint at ``step``: a tiny byte-level LM."""
    torch.manual_seed(seed)
    state = LanguageModel(CFG, 256).state_dict()
    config = {"model": to_dict(CFG), "data": {"path": "data", "direction": direction}, "train": {"steps": 9}}
    ckpt = Path(f"/nonexistent/run{step}/checkpoints/step{step}")
    return export_mod.Consolidated(
        ckpt, state, config, {"step": step, "world": 1}, entry(ByteTokenizer()), {}
    )


@pytest.fixture
def runs(monkeypatch) -> dict[str, export_mod.Consolidated]:
    """Run names for ``rnnpipe export`` ("old", "new", "bwd"), consolidated without DeepSpeed."""
    made = {"old": consolidated(1, 0), "new": consolidated(2, 1), "bwd": consolidated(3, 2, "backward")}
    monkeypatch.setattr(export_mod, "consolidate", lambda source: made[str(source)])
    return made


def make_export(out: Path, tok: Tokenizer, model_file: str | None = None, **source) -> Path:
    torch.manual_seed(0)
    model = LanguageModel(CFG, tok.vocab_size)
    return save_pretrained(out, model.state_dict(), to_dict(CFG), entry(tok, model_file), tok.files(), source)


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> content); links as ``-> target``."""
    found = {}
    for top, dirs, names in os.walk(root):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            path = Path(top, name)
            rel = str(path.relative_to(root))
            found[rel] = f"-> {os.readlink(path)}".encode() if path.is_symlink() else path.read_bytes()
    return found


def whole(out: Path) -> tuple[int, frozenset[str]] | None:
    """(step, file names) of the export in ``out`` after checking it is whole (its weights the
    ones its header records, the user's files intact); None when ``out`` is missing."""
    if not os.path.lexists(out):
        return None
    assert is_export(out), sorted(os.listdir(out))
    header = json.loads((out / "rnnpipe.json").read_text())
    assert fsio.sha256_of(str(out / "model.safetensors"))[0] == header["source"]["weights_sha256"]
    assert (out / "results" / "scores.json").read_text() == "{}" and (out / "README.md").read_text() == "mine"
    return header["source"]["step"], frozenset(files(out))


def cli(capsys, *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([*map(str, args)])
    got = capsys.readouterr()
    return rc, got.out, got.err


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("rnnpipe:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------- OUT replaced whole


def _kill_at(k: int) -> None:
    """In a forked child: SIGTERM to itself (Python's default: death, no cleanup) just before the
    k-th step that changes the tree of directories outside the export's own partial copy (what
    happens inside it, no reader of OUT sees)."""
    count = [0]

    def counted(f):
        def step(*args, **kwargs):
            paths = [os.fspath(a) for a in args if isinstance(a, str | os.PathLike)]
            if not all(".partial-" in p for p in paths):
                count[0] += 1
                if count[0] == k:
                    os.kill(os.getpid(), signal.SIGTERM)
            return f(*args, **kwargs)

        return step

    for name in ("rename", "replace", "unlink", "remove", "rmdir", "link", "symlink", "mkdir"):
        setattr(os, name, counted(getattr(os, name)))
    if hasattr(export_mod, "_exchange"):
        export_mod._exchange = counted(export_mod._exchange)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_kill_at_any_step_of_the_replace_leaves_out_whole(exchange, runs, tmp_path, monkeypatch):
    """A SIGTERM before each step of ``rnnpipe export`` over an earlier export: OUT is the old
    export or the new one, whole, with the user's files; never missing (where the filesystem
    swaps directories; else at worst set aside, and put back by the next export); the next
    export cleans up what the killed ones left. (Past the swap, the steps only remove the old
    copy, one file at a time under its partial name: the test stops three kills after the swap.)"""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not exchange:

        def unsupported(a, b):
            raise OSError(errno.EINVAL, "not supported here")

        monkeypatch.setattr(export_mod, "_exchange", unsupported, raising=False)
    out = tmp_path / "out"
    export_mod.export("old", out)
    (out / "README.md").write_text("mine")  # the user's own README, in place of the card
    (out / "results").mkdir()
    (out / "results" / "scores.json").write_text("{}")
    old = whole(out)
    seen: list = []
    for k in range(1, 500):
        if whole(out) != old:
            export_mod.export("old", out)
        for left in set(tmp_path.iterdir()) - {out}:  # what the last child left: each starts clean
            shutil.rmtree(left)
        pid = os.fork()
        if pid == 0:  # the child: export until killed
            try:
                _kill_at(k)
                export_mod.export("new", out)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        state = whole(out)
        if state is None:
            assert not exchange, f"OUT missing after a kill at step {k}"
            export_mod.recover(out)
            state = whole(out)
            assert state == old
        seen.append(state)
        if not os.WIFSIGNALED(status) or sum(s != old for s in seen) > 3:
            break
        assert os.WTERMSIG(status) == signal.SIGTERM
    assert len(list(tmp_path.iterdir())) > 1  # (what the last killed export left, for the next)
    export_mod.export("new", out)
    new = whole(out)
    assert new[0] == 2 and seen[0] == old and seen[-1] == new
    assert set(seen) <= {old, new}, [s for s in seen if s not in (old, new)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the killed ones' leftovers: gone


def test_user_files_are_kept_and_dead_exports_partials_removed(runs, tmp_path, capsys):
    out = tmp_path / "out"
    export_mod.export("old", out, "bwd")
    (out / "notes.txt").write_text("mine")
    (out / "tokenizer").mkdir(exist_ok=True)
    (out / "tokenizer" / "extra.txt").write_text("also mine")
    card = (out / "README.md").read_bytes()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f"out.partial-{dead.pid}", f"out.partial-{dead.pid}-{os.uname().nodename}"):
        (tmp_path / name / "x").mkdir(parents=True)
    live = tmp_path / f"out.partial-{os.getppid()}"  # another export still writing: left alone
    live.mkdir()
    rc, _, err = cli(capsys, "export", "new", out)
    assert rc == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "tokenizer" / "extra.txt").exists()
    assert not (out / "backward").exists()  # the earlier export's, not the user's: replaced whole
    assert (out / "README.md").read_bytes() != card  # the model card, rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", live.name]
    (out / "config.json").write_text((out / "config.json").read_text() + " ")  # the user edits it
    rc, _, err = cli(capsys, "export", "old", out)
    assert rc == 1 and "config.json" in one_line(err) and "move it out" in err
    assert whole_step(out) == 2


def whole_step(out: Path) -> int:
    return json.loads((out / "rnnpipe.json").read_text())["source"]["step"]


def test_a_symlink_in_a_backward_export_is_refused_before_work(runs, tmp_path, capsys, monkeypatch):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    bwd = make_export(tmp_path / "bwd", ByteTokenizer(), direction="backward")
    (bwd / "tokenizer").mkdir()
    (bwd / "tokenizer" / "notes").symlink_to(secret)
    consolidate = export_mod.consolidate
    monkeypatch.setattr(
        export_mod, "consolidate", lambda s: pytest.fail(f"consolidated {s}") or consolidate(s)
    )
    rc, _, err = cli(capsys, "export", "new", tmp_path / "out", "--backward", bwd)
    line = one_line(err)
    assert rc == 2 and str(bwd / "tokenizer" / "notes") in line and "symbolic link" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- the trust boundary


def planted(export: Path, marker: Path) -> list[str]:
    """Every .py file of ``export`` replaced by code that writes ``marker``; returns their names."""
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    names = sorted(p.name for p in export.glob("*.py"))
    for name in names:
        (export / name).write_text(code)
    return names


def test_rnnpipe_never_imports_an_exports_code_nor_copies_it(runs, tmp_path, capsys):
    """An export's .py files are code: rnnpipe's loaders and `rnnpipe sample` never import them,
    and `rnnpipe export --backward` copies none into the new export (it writes this rnnpipe's)."""
    marker = tmp_path / "ran"
    bwd = make_export(tmp_path / "bwd", ByteTokenizer(), direction="backward")
    code = planted(bwd, marker)
    load_pretrained(bwd), load_pretrained_tokenizer(bwd)
    assert cli(capsys, "sample", bwd, "--prompt", "ab", "-n", 2, "--seed", 0)[0] == 0
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "export", "new", out, "--backward", bwd)
    assert rc == 0, err
    assert not marker.exists()
    copied = {p.name: p.read_text() for p in (out / "backward").glob("*.py")}
    assert sorted(copied) == code and str(marker) not in "".join(copied.values())
    assert copied == {p.name: p.read_text() for p in out.glob("*.py")}  # this rnnpipe's code, both


def test_transformers_after_import_rnnpipe_runs_no_code_of_the_export(tmp_path):
    """With rnnpipe installed, the Auto classes load an export without trust_remote_code, and
    without importing its .py files."""
    transformers = pytest.importorskip("transformers")
    marker = tmp_path / "ran"
    export = make_export(tmp_path / "export", ByteTokenizer())
    planted(export, marker)
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    transformers.AutoTokenizer.from_pretrained(export)
    assert type(model).__module__ == "rnnpipe.pipeline.models.hf.modeling" and not marker.exists()


# ------------------------------------------------------------------ checks before loading, messages


def _break(export: Path, how: str) -> str:
    """Damage ``export`` as ``how`` says; returns the file the message must name."""
    config = json.loads((export / "config.json").read_text())
    if how == "not JSON":
        (export / "config.json").write_text("{'model': ")
    elif how == "no model":
        config.pop("model")
    elif how == "d_model=1e9":
        config["model"]["d_model"] = 1_000_000_000
    elif how == "more layers":
        config["model"]["n_layers"] = 2
    elif how == "wider MLP":
        config["model"]["mlp_ratio"] = 4.0
    elif how == "broken tokenizer":
        (export / CHAR_VOCAB_FILE).write_text('{"symbols": ["a", ')
        return str(export / CHAR_VOCAB_FILE)
    elif how == "truncated weights":
        data = (export / "model.safetensors").read_bytes()
        (export / "model.safetensors").write_bytes(data[: len(data) // 2])
        return str(export / "model.safetensors")
    if how != "not JSON":
        (export / "config.json").write_text(json.dumps(config))
    return str(export / "config.json")


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("not JSON", "not valid JSON"),
        ("no model", "no 'model' key"),
        ("d_model=1e9", "model.d_model=1000000000"),
        ("more layers", "blocks.1."),
        ("wider MLP", "which model.safetensors lacks"),
        ("broken tokenizer", "not a valid char tokenizer file"),
        ("truncated weights", "truncated"),
    ],
)
def test_a_damaged_export_is_refused_in_one_line_before_its_weights_are_read(
    how, says, tmp_path, capsys, monkeypatch
):
    tok = CharTokenizer(list("abcdefgh "))
    export = make_export(tmp_path / "export", tok, CHAR_VOCAB_FILE)
    file = _break(export, how)
    monkeypatch.setattr(
        pretrained, "load_file", lambda *a, **k: pytest.fail("read the weights (and built the model)")
    )
    rc, out, err = cli(capsys, "sample", export, "--prompt", "abc", "-n", 3)
    line = one_line(err)
    assert rc == 1 and out == ""
    assert line.startswith(f"rnnpipe: error: {file}") and says in line, line


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
            'message: "No space left on device" })'
        ),
    ],
    ids=["OSError", "SafetensorError"],
)
def test_disk_full_at_export_says_so_and_leaves_out_as_it_was(error, runs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    export_mod.export("old", out)
    before = files(out)

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(pretrained, "save_file", full)
    rc, _, err = cli(capsys, "export", "new", out)
    line = one_line(err)
    assert rc == 1 and str(out) in line and "no space left on device" in line.lower()
    assert files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------------------- a backward LM


def test_sample_writes_what_precedes_the_prompt_for_a_backward_lm(tmp_path, capsys):
    export = make_export(tmp_path / "bwd", ByteTokenizer(), direction="backward")
    prompt = "the end."
    rc, out, err = cli(capsys, "sample", export, "--prompt", prompt, "-n", 12, "--temperature", 0)
    assert rc == 0, err
    model, tok = load_pretrained(export), load_pretrained_tokenizer(export)
    ids = tok.encode(prompt).tolist()[::-1]  # the text as the model read it in training: last first
    new = model.generate(torch.tensor(ids), 12, temperature=0)[0].tolist()
    assert out == tok.decode(new[::-1]).decode("utf-8", "replace") + prompt + "\n"
