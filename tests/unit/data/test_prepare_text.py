"""Plain text and JSONL sources; the char tokenizer."""

from __future__ import annotations

import gzip
import json

import numpy as np
from harness import REPO, prepare, read_split, rnnpipe

from rnnpipe.pipeline.data.manifest import load_tokenizer

SHAKESPEARE = REPO / "configs" / "prepare" / "tinyshakespeare.yaml"


def test_tinyshakespeare_char_vocabulary_is_65_symbols(shakespeare, tmp_path):
    out = tmp_path / "d"
    assert prepare(SHAKESPEARE, out, f"source.paths=[{shakespeare}]", executor="local") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    text = shakespeare.read_text("utf-8")
    assert manifest["tokenizer"]["vocab_size"] == 65 == len(set(text))
    assert manifest["tokenizer"]["special_ids"] == {"eod": None, "unk": None}
    assert manifest["dtype"] == "uint8"
    tok = load_tokenizer(str(out))
    train, valid = read_split(out, "train")[0], read_split(out, "valid")[0]
    decoded = (tok.decode(train) + tok.decode(valid)).decode("utf-8")
    assert decoded == text
    # The valid split is the last 10%, cut at a line start.
    assert abs(len(valid) / len(text) - 0.10) < 0.001 and tok.decode(train).endswith(b"\n")
    assert "test" not in manifest["splits"]
    assert (out / "tokenizer" / "char_vocab.json").exists()


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))


def test_jsonl_documents_hash_split_with_end_of_document_ids(tmp_path):
    texts = [f"document number {i}: " + "héllo wörld " * (i % 7 + 1) for i in range(400)]
    write_jsonl(tmp_path / "a.jsonl", texts[:250])
    write_jsonl(tmp_path / "b.jsonl", texts[250:])
    out = tmp_path / "d"
    assert (
        prepare(
            SHAKESPEARE,
            out,
            f"source.paths=[{tmp_path}/*.jsonl]",
            "source.split=hash",
            "source.valid_fraction=0.1",
            "source.test_fraction=0.1",
            "source.unit_mb=0.004",
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    tok = load_tokenizer(str(out))
    assert tok.eod_id is not None  # many documents: the char vocabulary gets an end-of-document id
    seen = []
    for split in ("train", "valid", "test"):
        tokens = read_split(out, split)[0]
        docs = [
            tok.decode(p).decode() for p in np.split(tokens, np.flatnonzero(tokens == tok.eod_id) + 1)[:-1]
        ]
        assert len(docs) == manifest["splits"][split]["documents"] > 0
        assert manifest["splits"][split]["bytes"] == sum(len(d.encode()) for d in docs)
        order = [texts.index(d) for d in docs]
        assert order == sorted(order)  # each split keeps the source's order
        seen += docs
    assert sorted(seen) == sorted(texts)


def test_line_documents_and_explicit_split_files_with_gzip(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("first line with a char: yes\n\nsecond line\nthird ∆ valid unseen line\n")
    with gzip.open(tmp_path / "valid.txt.gz", "wt") as f:
        f.write("a valid line\nwith an unseen char: Ω\n")
    (tmp_path / "test.txt").write_text("test line\n")
    out = tmp_path / "d"
    assert (
        prepare(
            SHAKESPEARE,
            out,
            f"source.paths=[{train}]",
            f"source.valid_paths=[{tmp_path}/valid.txt.gz]",
            f"source.test_paths=[{tmp_path}/test.txt]",
            "source.document=line",
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["split_mode"] == "explicit"
    assert {s: v["documents"] for s, v in manifest["splits"].items()} == {"train": 3, "valid": 2, "test": 1}
    tok = load_tokenizer(str(out))
    assert tok.unk_id is not None  # Ω is not in the training split
    valid = tok.decode(read_split(out, "valid")[0]).decode()
    assert valid == "a valid line" + "with an unseen char: \ufffd"
    assert manifest["splits"]["valid"]["bytes"] == len("a valid linewith an unseen char: Ω".encode())


def test_limit_bytes_and_reused_tokenizer(shakespeare, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    assert prepare(SHAKESPEARE, first, f"source.paths=[{shakespeare}]") == 0
    assert (
        prepare(
            SHAKESPEARE,
            second,
            f"source.paths=[{shakespeare}]",
            "source.limit_bytes=100000",
            f"tokenizer.model={first}/tokenizer/char_vocab.json",
        )
        == 0
    )
    m = json.loads((second / "manifest.json").read_text())
    total = m["splits"]["train"]["tokens"] + m["splits"]["valid"]["tokens"]
    cut = shakespeare.read_bytes()[:100500].index(b"\n", 99999) + 1  # moved forward to a line start
    assert total == cut
    assert (second / "tokenizer" / "char_vocab.json").read_bytes() == (
        first / "tokenizer" / "char_vocab.json"
    ).read_bytes()


def test_invalid_utf8_names_file_and_offset(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 10 + b"broken \xff byte\n")
    assert prepare(SHAKESPEARE, tmp_path / "d", f"source.paths=[{bad}]") == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "invalid UTF-8 at byte 107" in err
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_output_on_a_non_local_filesystem(shakespeare, tmp_path):
    """Every output path goes through fsspec: an in-memory filesystem works like a directory."""
    import fsspec

    local = tmp_path / "local"
    assert prepare(SHAKESPEARE, local, f"source.paths=[{shakespeare}]") == 0
    assert prepare(SHAKESPEARE, "memory://rnnpipe-test/ds", f"source.paths=[{shakespeare}]") == 0
    assert rnnpipe("verify", "memory://rnnpipe-test/ds") == 0
    fs = fsspec.filesystem("memory")
    assert not fs.exists("/rnnpipe-test/ds/.work")
    for name in ("train/train-000000.tar", "valid/valid-000000.tar", "tokenizer/char_vocab.json"):
        assert fs.cat_file(f"/rnnpipe-test/ds/{name}") == (local / name).read_bytes()
    fs.rm("/rnnpipe-test", recursive=True)
