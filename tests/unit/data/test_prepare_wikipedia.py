"""A Wikipedia dump: articles only, clean text, sentencepiece, any layout and schema version."""

from __future__ import annotations

import bz2
import functools
import json
import re

import numpy as np
import pytest
from harness import REPO, data_file, prepare, read_split

from rnnpipe.pipeline.data.manifest import load_tokenizer
from rnnpipe.pipeline.data.sources import split_of
from rnnpipe.pipeline.data.wikipedia import inspect_dump, iter_pages, link_drop_prefixes
from rnnpipe.pipeline.data.wikitext import wikitext_to_text

CONFIG = REPO / "configs" / "prepare" / "wikipedia.yaml"
DUMP = "wikipedia-xml/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def count_articles(xml: str, namespaces: dict[str, str] | None = None) -> int:
    """Non-redirect main-namespace pages, counted with regexes (independent of the reader)."""
    n = 0
    for page in re.findall(r"<page>(.*?)</page>", xml, re.S):
        ns = re.search(r"<ns>(-?\d+)</ns>", page)
        title = re.search(r"<title>(.*?)</title>", page).group(1)
        if ns is not None:
            main = ns.group(1) == "0"
        else:
            prefix = title.split(":", 1)[0] if ":" in title else None
            main = prefix is None or prefix not in (namespaces or {}).values()
        text = re.search(r"<text[^>]*>(.*?)</text>", page, re.S)
        redirect = "<redirect" in page or (
            text is not None and re.match(r"\s*#redirect", text.group(1), re.I)
        )
        n += bool(main and not redirect)
    return n


@functools.lru_cache(maxsize=2)
def expected_documents(path: str) -> dict[str, list[str]]:
    """The cleaned articles per split in dump order, from the library's reader and cleaner."""
    info = inspect_dump(path, 1 << 40, lambda n: None)
    out: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for page in iter_pages(path, info, 0, lambda n: None):
        if page.namespace == 0 and not page.redirect:
            text = page.title + "\n\n" + wikitext_to_text(page.text, link_drop_prefixes(info.namespaces))
            out[split_of(page.title.encode(), 0.05, 0.05)].append(text)
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    dump = data_file(DUMP)
    out = tmp_path_factory.mktemp("wiki") / "data"
    assert (
        prepare(
            CONFIG,
            out,
            f"source.paths=[{dump}]",
            "tokenizer.vocab_size=2000",
            "shards.sample_tokens=8192",
            "shards.samples_per_shard=8",
            executor="local",
        )
        == 0
    )
    return dump, out


def test_article_count_is_the_non_redirect_main_namespace_pages(dataset):
    dump, out = dataset
    manifest = json.loads((out / "manifest.json").read_text())
    expected = count_articles(bz2.decompress(dump.read_bytes()).decode("utf-8"))
    assert expected == 106
    assert sum(s["documents"] for s in manifest["splits"].values()) == expected
    assert manifest["source"]["stats"] == {
        "pages": 206,
        "articles": 106,
        "redirects": 99,
        "other_namespaces": 1,
    }


def test_shards_hold_exactly_the_clean_articles(dataset):
    dump, out = dataset
    tok = load_tokenizer(str(out))
    assert tok.kind == "sentencepiece" and tok.vocab_size == 2000 and tok.eod_id == 1
    docs = expected_documents(str(dump))
    manifest = json.loads((out / "manifest.json").read_text())
    for split, texts in docs.items():
        tokens, metas = read_split(out, split)
        assert tokens.dtype == np.uint16
        ends = np.flatnonzero(tokens == tok.eod_id)
        assert len(ends) == len(texts) == manifest["splits"][split]["documents"]
        pieces = np.split(tokens, ends + 1)[:-1]
        assert [tok.decode(p).decode("utf-8") for p in pieces] == texts
        # Byte totals are exact: bits per byte is comparable across tokenizers.
        assert manifest["splits"][split]["bytes"] == sum(len(t.encode()) for t in texts)
        assert sum(m["bytes"] for m in metas) == manifest["splits"][split]["bytes"]
        starts = [m["token_offset"] + s for m in metas for s in m["doc_starts"]]
        assert starts == [0, *(ends[:-1] + 1).tolist()]


def test_no_markup_survives_and_text_round_trips(dataset):
    dump, out = dataset
    tok = load_tokenizer(str(out))
    for split in ("train", "valid", "test"):
        text = tok.decode(read_split(out, split)[0]).decode("utf-8")
        for markup in ("[[", "{{", "<ref", "{|"):
            assert markup not in text, (split, markup)
    for texts in expected_documents(str(dump)).values():
        for t in texts:
            ids, nbytes = tok.encode_with_lengths(t)
            assert tok.decode(ids).decode("utf-8") == t
            assert int(nbytes.sum()) == len(t.encode("utf-8"))


def test_tokenizer_model_is_saved_and_named(dataset):
    _, out = dataset
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["model_file"] == "tokenizer/spm.model"
    assert (out / "tokenizer" / "spm.model").stat().st_size > 0
    assert manifest["tokenizer"]["special_ids"] == {"eod": 1, "unk": 0}


def test_hash_split_is_by_title_and_deterministic(dataset):
    dump, _ = dataset
    docs = expected_documents(str(dump))
    assert len(docs["valid"]) > 0 and len(docs["test"]) > 0
    assert split_of(b"Anarchism", 0.05, 0.05) == split_of(b"Anarchism", 0.05, 0.05)
    n = 20000
    counts = {s: 0 for s in ("train", "valid", "test")}
    for i in range(n):
        counts[split_of(f"title {i}".encode(), 0.1, 0.2)] += 1
    assert abs(counts["valid"] / n - 0.1) < 0.01 and abs(counts["test"] / n - 0.2) < 0.01


def test_multistream_dump_gives_identical_shards(dataset, tmp_path):
    """Re-compress the excerpt the way Wikimedia's -multistream dumps are (a header stream, then
    streams of pages), cut it into many units: the shards are the same bytes."""
    dump, _ = dataset
    xml = bz2.decompress(dump.read_bytes())
    first = xml.index(b"<page>")
    starts = [m.start() for m in re.finditer(rb"<page>", xml)]
    groups = [xml[:first]] + [
        xml[a:b] for a, b in zip(starts[::10], [*starts[10::10], len(xml)], strict=True)
    ]
    multi = tmp_path / "multistream.xml.bz2"
    multi.write_bytes(b"".join(bz2.compress(g) for g in groups))
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["tokenizer.kind=char", "shards.sample_tokens=50000", "--executor", "inline"]
    assert prepare(CONFIG, a, f"source.paths=[{dump}]", *common, executor="local") == 0
    assert prepare(CONFIG, b, f"source.paths=[{multi}]", "source.unit_mb=0.1", *common, executor="local") == 0
    plan_units = json.loads((b / "manifest.json").read_text())
    assert (
        plan_units["splits"]["train"]["documents"]
        + plan_units["splits"]["valid"]["documents"]
        + plan_units["splits"]["test"]["documents"]
        == 106
    )
    for split in ("train", "valid", "test"):
        for shard in sorted((a / split).glob("*.tar")):
            assert (b / split / shard.name).read_bytes() == shard.read_bytes()


def test_schema_0_3_plain_xml_dump_without_ns_elements(tmp_path):
    """enwik8 is a 2006 export (schema 0.3: no <ns>, redirects only as #REDIRECT text, no closing tag)."""
    head = data_file("enwik8-head/enwik8-head.txt")
    xml = head.read_text("utf-8")
    assert "<ns>" not in xml and "export-0.3" in xml
    namespaces = dict(re.findall(r'<namespace key="(-?\d+)">([^<]*)</namespace>', xml))
    expected = count_articles(xml, namespaces)
    out = tmp_path / "d"
    assert prepare(CONFIG, out, f"source.paths=[{head}]", "tokenizer.kind=bytes", "source.unit_mb=0.5") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["documents"] for s in manifest["splits"].values()) == expected == 248
    assert manifest["source"]["stats"]["pages"] == 491
