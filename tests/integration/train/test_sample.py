"""``rnnpipe sample``: prompt then continuation, reproducible with --seed, equal to ``generate``."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import CLI, REPO

from rnnpipe.launch.cli import main
from rnnpipe.launch.commands.sample import TextStream, load
from rnnpipe.pipeline.config import to_dict
from rnnpipe.pipeline.data.tokenizers import (
    CHAR_VOCAB_FILE,
    SPM_MODEL_FILE,
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    train_sentencepiece,
)
from rnnpipe.pipeline.models.config import ModelConfig
from rnnpipe.pipeline.models.lm import LanguageModel
from rnnpipe.pipeline.models.pretrained import load_pretrained, load_pretrained_tokenizer, save_pretrained

TEXT = "the king queen of and to be or not lord night day sword crown café naïve 漢字"  # 1-3 byte chars
WORDS = TEXT.split()


def some_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(n)]


def manifest_entry(tok: Tokenizer, model_file: str | None) -> dict:
    """The tokenizer entry prepare writes into a dataset's manifest (and export copies)."""
    return {
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "model_file": model_file,
        "special_ids": tok.special_ids(),
    }


def make_export(out: Path, tok: Tokenizer, model_file: str | None) -> Path:
    cfg = ModelConfig(n_layers=2, d_model=32)
    torch.manual_seed(0)
    model = LanguageModel(cfg, tok.vocab_size)
    return save_pretrained(
        out, model.state_dict(), to_dict(cfg), manifest_entry(tok, model_file), tok.files(), {}
    )


@pytest.fixture(scope="module")
def char_export(tmp_path_factory) -> Path:
    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz .,\nïé漢字"))  # no end-of-document id
    return make_export(tmp_path_factory.mktemp("char") / "export", tok, CHAR_VOCAB_FILE)


@pytest.fixture(scope="module")
def spm_tokenizer() -> SentencePieceTokenizer:
    model = train_sentencepiece(
        some_lines(400),
        vocab_size=300,
        model_type="unigram",
        byte_fallback=True,
        character_coverage=1.0,
        threads=1,
    )
    return SentencePieceTokenizer(model)


@pytest.fixture(scope="module")
def spm_export(tmp_path_factory, spm_tokenizer) -> Path:
    return make_export(tmp_path_factory.mktemp("spm") / "export", spm_tokenizer, SPM_MODEL_FILE)


def sample(capsys, *args: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``rnnpipe sample ARGS``."""
    capsys.readouterr()
    rc = main(["sample", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def expected(export: Path, ids: list[int], n: int, **kw) -> str:
    """What ``generate`` samples after ``ids``, decoded, as the CLI prints it (with the newline)."""
    model, tok = load_pretrained(export), load_pretrained_tokenizer(export)
    new = model.generate(torch.tensor(ids), n, **kw)
    assert new.shape == (1, n)
    return tok.decode(new[0].tolist()).decode("utf-8", "replace") + "\n"


# ------------------------------------------------------------------------------------------ export


def test_prints_the_prompt_then_a_continuation_reproducible_with_seed(char_export, capsys, caplog):
    caplog.set_level("INFO", logger="rnnpipe")
    rc, out, _ = sample(capsys, char_export, "--prompt", "the king", "-n", 20, "--seed", 1)
    assert rc == 0
    assert out.startswith("the king") and out.endswith("\n") and len(out) == len("the king") + 20 + 1
    assert "sampling from export" in caplog.text and str(char_export) in caplog.text
    assert "sampling" not in out  # the log stays off stdout
    again = sample(capsys, char_export, "--prompt", "the king", "-n", 20, "--seed", 1)[1]
    other = sample(capsys, char_export, "--prompt", "the king", "-n", 20, "--seed", 2)[1]
    assert again == out
    assert other != out and other.startswith("the king")


@pytest.mark.parametrize("kind", ["char", "sentencepiece"])
@pytest.mark.parametrize(("temperature", "top_k"), [(0.0, 0), (0.9, 5)])
def test_equals_generate_decoded(kind, temperature, top_k, char_export, spm_export, capsys):
    export = char_export if kind == "char" else spm_export
    prompt = "the queen of"
    ids = load_pretrained_tokenizer(export).encode(prompt).tolist()
    flags = ["--temperature", temperature, "--top-k", top_k, "--seed", 7, "--device", "cpu"]
    rc, out, err = sample(capsys, export, "--prompt", prompt, "-n", 40, *flags)
    assert rc == 0, err
    gen = torch.Generator().manual_seed(7)
    assert out == prompt + expected(export, ids, 40, temperature=temperature, top_k=top_k, generator=gen)


def test_empty_prompt_starts_a_document_or_is_refused(char_export, spm_export, spm_tokenizer, capsys):
    rc, out, _ = sample(capsys, spm_export, "--prompt", "", "-n", 15, "--temperature", 0)
    assert rc == 0
    assert out == expected(spm_export, [spm_tokenizer.eod_id], 15, temperature=0)
    rc, out, err = sample(capsys, char_export, "--prompt", "", "-n", 5)
    assert rc == 2 and out == ""
    assert "a prompt is needed" in err and "no end-of-document id" in err


def test_prompt_from_stdin_and_from_a_file(char_export, capsys, monkeypatch, tmp_path):
    ref = sample(capsys, char_export, "--prompt", "a day\n", "-n", 10, "--seed", 3)[1]
    assert ref.startswith("a day\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a day\n"))
    assert sample(capsys, char_export, "-n", 10, "--seed", 3)[:2] == (0, ref)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a day\n"))
    assert sample(capsys, char_export, "--prompt-file", "-", "-n", 10, "--seed", 3)[1] == ref
    (tmp_path / "prompt.txt").write_text("a day\n")
    assert (
        sample(capsys, char_export, "--prompt-file", tmp_path / "prompt.txt", "-n", 10, "--seed", 3)[1] == ref
    )
    rc, _, err = sample(capsys, char_export, "--prompt-file", tmp_path / "absent.txt")
    assert rc == 2 and "absent.txt" in err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["-n", "0"], "-n/--tokens"),
        (["--temperature", "-0.5"], "--temperature"),
        (["--temperature", "nan"], "--temperature"),
        (["--top-k", "-1"], "--top-k"),
        (["--prompt-file", "-"], "--prompt-file"),  # with --prompt too: one or the other
    ],
)
def test_bad_flags_exit_2_naming_the_flag(char_export, capsys, flags, named):
    rc, out, err = sample(capsys, char_export, "--prompt", "ab", *flags)
    assert rc == 2 and out == ""
    assert "config error" in err and named in err


def test_not_an_export_nor_a_run_exits_1_naming_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "absent"):
        rc, out, err = sample(capsys, path, "--prompt", "ab")
        assert rc == 1 and out == ""
        assert str(path) in err and "export" in err and "checkpoints/" in err


def test_a_character_outside_the_char_vocabulary_is_named(char_export, capsys):
    rc, out, err = sample(capsys, char_export, "--prompt", "the KING")
    assert rc == 1 and out == ""
    assert "'K' (U+004B) is not in the char vocabulary" in err


def test_ctrl_c_keeps_what_was_printed_and_ends_the_line(char_export, capsys, monkeypatch):
    three = sample(capsys, char_export, "--prompt", "the", "-n", 3, "--seed", 1)[1]  # with its newline
    real = LanguageModel.stream

    def interrupted(self, *args, **kw):
        for i, tok in enumerate(real(self, *args, **kw)):
            if i == 3:
                raise KeyboardInterrupt
            yield tok

    monkeypatch.setattr(LanguageModel, "stream", interrupted)
    rc, out, _ = sample(capsys, char_export, "--prompt", "the", "-n", 20, "--seed", 1)
    assert rc == 130 and out == three


# -------------------------------------------------------------------------------- text streaming


def test_bytes_of_a_character_come_out_together():
    stream = TextStream(ByteTokenizer())
    pieces = [stream.add(b) for b in "a漢é".encode()]
    assert pieces == ["a", "", "", "漢", "", "é"] and stream.finish() == ""
    stream.add(0xE6)  # a character cut short at the end reads as U+FFFD
    assert stream.finish() == "\ufffd"


def test_sentencepiece_pieces_join_to_the_whole_decode(spm_tokenizer):
    tok, rng = spm_tokenizer, random.Random(1)
    byte_ids = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
    for _ in range(300):
        # Words, byte-fallback pieces (often invalid UTF-8), end-of-document ids and unknowns, mixed.
        ids = [
            rng.choice([rng.randrange(tok.vocab_size), rng.choice(byte_ids), tok.eod_id, 0])
            for _ in range(rng.randint(1, 15))
        ]
        stream = TextStream(tok)
        assert "".join(stream.add(i) for i in ids) + stream.finish() == tok.decode(ids).decode(), ids
    # Text appears as it is made: each word's pieces at once, a byte-fallback character when whole.
    words = tok.encode("the king of")
    stream = TextStream(tok)
    assert [stream.add(i) for i in words] == [tok.decode([i]).decode() for i in words]
    bytes_of = [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in "ж".encode()]  # not in the vocabulary
    assert [stream.add(i) for i in bytes_of] == ["", "ж"]


# ---------------------------------------------------------------------------------------- run dir


@pytest.mark.slow
def test_a_run_dir_samples_like_its_export(tmp_path, capsys):
    pytest.importorskip("deepspeed")
    (tmp_path / "text.txt").write_text("\n".join(some_lines(2000)) + "\n")
    env = {**os.environ, "RNNPIPE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

    def rnnpipe(*args: str) -> None:
        done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    data, run, export = tmp_path / "data", tmp_path / "run", tmp_path / "export"
    rnnpipe(
        "prepare",
        str(REPO / "configs/prepare/tinyshakespeare.yaml"),  # char level
        f"output={data}",
        f"source.paths=[{tmp_path / 'text.txt'}]",
        "shards.sample_tokens=4096",
        "shards.samples_per_shard=4",
        "--executor",
        "inline",
    )
    rnnpipe(
        "pretrain",
        str(REPO / "configs/pretrain/tiny-lrn.yaml"),
        f"run_dir={run}",
        f"data.path={data}",
        "model.n_layers=1",
        "model.d_model=16",
        "data.seq_len=32",
        "data.batch_size=2",
        "train.steps=3",
        "train.eval_every=0",
        "train.checkpoint_every=3",
        "train.sample_tokens=0",
        "train.eval_batch_size=2",
        "train.eval_max_tokens=1000",
        "optim.warmup_steps=1",
        "--executor",
        "inline",
    )
    rnnpipe("export", str(run), str(export))
    args = ["--prompt", "the king", "-n", 30, "--temperature", 0]
    rc, from_run, err = sample(capsys, run, *args)
    assert rc == 0, err
    assert from_run.startswith("the king") and len(from_run) == len("the king") + 30 + 1
    assert sample(capsys, export, *args)[:2] == (0, from_run)
    # The very weights, not only the same text (a barely trained model may say the same either way).
    model, tok, _ = load(run, torch.device("cpu"))
    assert tok.files() == load_pretrained_tokenizer(export).files()
    want = load_pretrained(export).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
