"""Bad input: one clear message naming the thing, a non-zero exit, nothing that looks complete."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile

import pytest
from harness import REPO, prepare, rnnpipe

TEXT = REPO / "configs" / "prepare" / "tinyshakespeare.yaml"
ENWIK8 = REPO / "configs" / "prepare" / "enwik8-head.yaml"
WIKI = REPO / "configs" / "prepare" / "wikipedia.yaml"


def run_fails(capsys, out, config, *overrides) -> str:
    assert prepare(config, out, *overrides) == 1
    assert not (out / "manifest.json").exists()
    return capsys.readouterr().err


@pytest.fixture
def http_dir(tmp_path):
    """A real HTTP server on localhost serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_missing_input(tmp_path, capsys):
    err = run_fails(capsys, tmp_path / "d", TEXT, f"source.paths=[{tmp_path}/nope.txt]")
    assert f"source.paths[0]: no such file: {tmp_path}/nope.txt" in err


def test_glob_matching_nothing(tmp_path, capsys):
    err = run_fails(capsys, tmp_path / "d", TEXT, f"source.paths=[{tmp_path}/*.txt]")
    assert "matches no files" in err and f"{tmp_path}/*.txt" in err


def test_unreadable_urls(tmp_path, capsys, http_dir):
    _, base = http_dir
    err = run_fails(capsys, tmp_path / "d", TEXT, f"source.paths=[{base}/missing.txt]")
    assert f"no such file: {base}/missing.txt" in err
    err = run_fails(capsys, tmp_path / "d", TEXT, "source.paths=[http://127.0.0.1:9/x.txt]")
    assert "cannot read http://127.0.0.1:9/x.txt" in err


def test_chained_zip_over_http_reads_like_the_local_file(tmp_path, http_dir, enwik8_head):
    www, base = http_dir
    with zipfile.ZipFile(www / "enwik8.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.write(enwik8_head, "enwik8")
    local, remote = tmp_path / "local", tmp_path / "remote"
    common = ["shards.samples_per_shard=20", "--executor", "inline"]
    assert prepare(ENWIK8, local, f"source.paths=[{enwik8_head}]", *common, executor="local") == 0
    assert (
        prepare(ENWIK8, remote, f"source.paths=[zip://enwik8::{base}/enwik8.zip]", *common, executor="local")
        == 0
    )
    for shard in sorted(local.glob("*/*.tar")):
        assert (remote / shard.relative_to(local)).read_bytes() == shard.read_bytes()


def test_empty_split(tmp_path, capsys):
    (tmp_path / "two.txt").write_text("only one line\nand another\n")
    err = run_fails(
        capsys,
        tmp_path / "d",
        TEXT,
        f"source.paths=[{tmp_path}/two.txt]",
        "source.document=line",
        "source.split=hash",
        "source.valid_fraction=0.01",
        "source.test_fraction=0.01",
    )
    assert "split 'valid' is empty" in err and "source.valid_fraction" in err


def test_vocabulary_too_large_for_dtype(tmp_path, capsys):
    (tmp_path / "wide.txt").write_text(("".join(chr(0x4E00 + i) for i in range(300)) + "\n") * 20)
    err = run_fails(
        capsys,
        tmp_path / "d",
        TEXT,
        f"source.paths=[{tmp_path}/wide.txt]",
        "shards.dtype=uint8",
        "source.valid_fraction=0.5",
    )
    assert "the char vocabulary has 301 ids, too many for shards.dtype=uint8" in err  # 300 + newline


def test_output_holding_a_different_dataset(tmp_path, capsys, shakespeare):
    out = tmp_path / "d"
    assert prepare(TEXT, out, f"source.paths=[{shakespeare}]") == 0
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert prepare(TEXT, out, f"source.paths=[{shakespeare}]", "tokenizer.kind=bytes") == 1
    err = capsys.readouterr().err
    assert f"output {out} already holds a different dataset" in err and "overwrite=true" in err
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing lost
    # The same config again: nothing to do.
    assert prepare(TEXT, out, f"source.paths=[{shakespeare}]") == 0
    # overwrite=true replaces it.
    assert prepare(TEXT, out, f"source.paths=[{shakespeare}]", "tokenizer.kind=bytes", "overwrite=true") == 0
    assert '"kind": "bytes"' in (out / "manifest.json").read_text()


def test_output_that_is_not_a_dataset(tmp_path, capsys, shakespeare):
    out = tmp_path / "d"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    err = run_fails(capsys, out, TEXT, f"source.paths=[{shakespeare}]")
    assert "not empty and holds no rnnpipe dataset" in err and "thesis.tex" in err
    assert (out / "thesis.tex").read_text() == "precious"


def test_bad_jsonl_line(tmp_path, capsys):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"body": "wrong field"}\n')
    err = run_fails(capsys, tmp_path / "d", TEXT, f"source.paths=[{f}]")
    assert f"{f}: the line at byte 39 has no string field 'text'" in err
    f.write_text('{"text": "fine"}\n{not json\n')
    err = run_fails(capsys, tmp_path / "d2", TEXT, f"source.paths=[{f}]")
    assert "the line at byte 17 is not valid JSON" in err


def test_not_a_mediawiki_dump(tmp_path, capsys):
    f = tmp_path / "x.xml"
    f.write_text("<html><body>hello</body></html>")
    err = run_fails(capsys, tmp_path / "d", WIKI, f"source.paths=[{f}]")
    assert f"{f}: not a MediaWiki XML dump" in err


def test_verify_on_an_unfinished_directory(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    assert rnnpipe("verify", tmp_path) == 1
    assert "not a finished rnnpipe dataset" in capsys.readouterr().err
