"""``tokenizer.kind=huggingface``: a pretrained (here: tiny, trained in this file) Hugging Face
tokenizer in the prepare stage. Shards decode to the source byte for byte, every token counts the
bytes it stands for, the manifest keeps the tokenizer file, and one that normalizes is refused.
CPU only, no network."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
from harness import REPO, prepare, read_split, rnnpipe
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as FastTokenizer

from rnnpipe.pipeline.config import config_from_dict, to_dict
from rnnpipe.pipeline.data import hf_tokenizer
from rnnpipe.pipeline.data import prepare as prepare_module
from rnnpipe.pipeline.data.config import PrepareConfig, TokenizerConfig, TokenizerKind
from rnnpipe.pipeline.data.hf_tokenizer import HuggingFaceTokenizer, check_hf_path, load_hf_tokenizer
from rnnpipe.pipeline.data.manifest import dataset_fingerprint_keys, load_tokenizer
from rnnpipe.pipeline.data.tokenizers import (
    CharTokenizer,
    RoundTripError,
    SentencePieceTokenizer,
    tokenizer_from_manifest,
    train_sentencepiece,
)
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.models.hf.tokenizer_files import tokenizer_files

ENWIK8 = REPO / "configs" / "prepare" / "enwik8-head.yaml"
TEXT = REPO / "configs" / "prepare" / "tinyshakespeare.yaml"
EOS = "<|endoftext|>"
LONG = "=" * 300  # an added token of more than 255 bytes: the per-token counts are uint16
WORDS = str.split(
    "the of and to in a is that for it as was with be by on not he this are or his from at which "
    "river stone winter garden [[link]] {{template}} 1984 42 naïve café über — “quoted” 東京 😀"
)
SAMPLES = [
    "",
    "plain ascii",
    "  leading and trailing  ",
    "naïve café ☃ 漢字 😀 e\u0301",
    "tabs\tand\nnewlines\n\n",
    f"{EOS} typed in text is text",
    f"a{LONG}b",
    "\x00\x07 control",
]


def _corpus(seed: int, n_lines: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n_lines)]


def _byte_level(normalizer=None) -> FastTokenizer:
    """A GPT-2-style byte-level BPE (a vocabulary of 300) with ``<|endoftext|>`` added
    last, as GPT-2's 50256 is, and a 300-byte added token."""
    tk = FastTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tk.train_from_iterator(_corpus(0, 600), trainer)
    tk.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    tk.add_tokens([AddedToken(LONG, normalized=False)])
    if normalizer is not None:
        tk.normalizer = normalizer
    return tk


@pytest.fixture(scope="module")
def base() -> FastTokenizer:
    return _byte_level()


@pytest.fixture(scope="module")
def hf_dir(base, tmp_path_factory) -> Path:
    """A Hugging Face tokenizer directory, as ``save_pretrained`` writes it."""
    transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    out = tmp_path_factory.mktemp("hf") / "tok"
    transformers.PreTrainedTokenizerFast(tokenizer_object=base, eos_token=EOS).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def json_dir(base, tmp_path_factory) -> Path:
    """A directory with only ``tokenizer.json``."""
    out = tmp_path_factory.mktemp("json")
    base.save(str(out / "tokenizer.json"))
    return out


@pytest.fixture(scope="module")
def tok(json_dir) -> HuggingFaceTokenizer:
    return HuggingFaceTokenizer((json_dir / "tokenizer.json").read_bytes(), EOS)


# -------------------------------------------------------------------------------- the tokenizer


def test_byte_level_round_trip_and_exact_bytes_per_token(tok, base):
    assert tok.byte_level and tok.vocab_size == 302 == base.get_vocab_size(with_added_tokens=True)
    assert tok.eod_id == 300 == base.token_to_id(EOS)
    for text in SAMPLES:
        ids, nbytes = tok.encode_with_lengths(text)
        assert tok.decode(ids) == text.encode() and tok.encode(text).tolist() == ids.tolist()
        assert nbytes.dtype == np.uint16 and int(nbytes.sum()) == len(text.encode())
        # each token's own bytes, not only the sum: what the token decodes to alone
        assert nbytes.tolist() == [len(tok.decode([i])) for i in ids]
        assert tok.eod_id not in ids.tolist()  # "<|endoftext|>" typed in text is text
    ids, nbytes = tok.encode_with_lengths(f"a{LONG}b")
    assert ids.tolist()[1] == base.token_to_id(LONG) and nbytes.tolist() == [1, 300, 1]
    # a sample cut inside a character still decodes to exact bytes, pieces joined
    ids = tok.encode("😀😀")
    assert b"".join(tok.decode(ids[k : k + 1]) for k in range(len(ids))) == "😀😀".encode()
    assert tok.decode([*tok.encode("ab"), tok.eod_id, *tok.encode("c")]) == b"abc"


def test_a_non_byte_level_tokenizer_counts_bytes_from_offsets():
    """A char vocabulary and a sentencepiece model exported to tokenizer.json (no ByteLevel
    decoder): same ids, exact sums, and the char one's per-token counts equal rnnpipe's own."""
    char = CharTokenizer(list("abc é漢😀\n"), eod=True)
    hf = HuggingFaceTokenizer(tokenizer_files(char)["tokenizer.json"], EOS)
    assert not hf.byte_level and hf.eod_id == char.eod_id and hf.vocab_size == char.vocab_size
    for text in ["a é漢😀\nb", "", "cab  "]:
        ids, nbytes = hf.encode_with_lengths(text)
        want_ids, want_bytes = char.encode_with_lengths(text)
        assert ids.tolist() == want_ids.tolist() and nbytes.tolist() == want_bytes.tolist()
        assert hf.decode(ids) == text.encode()
    lines = [line for line in _corpus(1, 400) if line]
    spm = SentencePieceTokenizer(
        train_sentencepiece(
            lines, vocab_size=300, model_type="bpe", byte_fallback=True, character_coverage=1.0, threads=1
        )
    )
    hf = HuggingFaceTokenizer(tokenizer_files(spm)["tokenizer.json"], "</s>")
    assert hf.eod_id == spm.eod_id
    for text in [lines[0], "unseen ✓ 🎉 byte fallback", "  spaces  "]:
        ids, nbytes = hf.encode_with_lengths(text)
        assert ids.tolist() == spm.encode(text).tolist() and hf.decode(ids) == text.encode()
        assert int(nbytes.sum()) == len(text.encode()) and (nbytes >= 0).all()


def test_a_text_that_does_not_come_back_raises(base):
    lower = _byte_level(normalizers.Lowercase())
    tok = HuggingFaceTokenizer(lower.to_str(), EOS)
    assert tok.encode_with_lengths("lower case")[1].sum() == 10
    with pytest.raises(
        RoundTripError, match=r"at byte 0 of 5: the text has 'Upper', the decoded tokens 'upper'"
    ):
        tok.encode_with_lengths("Upper")


def test_the_manifest_entry_rebuilds_it_and_must_match(json_dir, tok):
    data = (json_dir / "tokenizer.json").read_bytes()
    entry = {
        "kind": "huggingface",
        "vocab_size": 302,
        "model_file": "tokenizer/tokenizer.json",
        "special_ids": {"eod": 300},
        "eos_token": EOS,
    }
    again = tokenizer_from_manifest({"tokenizer": entry}, lambda rel: data)
    assert (
        isinstance(again, HuggingFaceTokenizer)
        and again.encode("naïve").tolist() == tok.encode("naïve").tolist()
    )
    with pytest.raises(PipelineError, match="302 ids and eod 300, the manifest says 9999"):
        tokenizer_from_manifest({"tokenizer": {**entry, "vocab_size": 9999}}, lambda rel: data)
    with pytest.raises(PipelineError, match="'<nope>' is not in the tokenizer's vocabulary"):
        tokenizer_from_manifest({"tokenizer": {**entry, "eos_token": "<nope>"}}, lambda rel: data)


# ---------------------------------------------------------------------------------- loading


def test_a_hugging_face_directory_loads_with_its_eos(hf_dir, tok):
    loaded, origin = load_hf_tokenizer(str(hf_dir))
    assert origin == {"path": str(hf_dir), "hub": False}
    assert loaded.eos_token == EOS and loaded.eod_id == 300 and loaded.vocab_size == 302
    assert loaded.encode(SAMPLES[3]).tolist() == tok.encode(SAMPLES[3]).tolist()


def test_a_tokenizer_json_loads_without_transformers(json_dir, tok, monkeypatch):
    monkeypatch.setattr(hf_tokenizer, "has_transformers", lambda: False)
    for path in (json_dir, json_dir / "tokenizer.json"):
        loaded, origin = load_hf_tokenizer(str(path))
        # no tokenizer_config.json: the eos is the special token with a conventional name
        assert loaded.eos_token == EOS and loaded.eod_id == 300 and origin["hub"] is False
        assert loaded.files() == {"tokenizer/tokenizer.json": (json_dir / "tokenizer.json").read_bytes()}
        assert loaded.encode(SAMPLES[3]).tolist() == tok.encode(SAMPLES[3]).tolist()
    with pytest.raises(ConfigError, match=r"hub name needs transformers: pip install 'rnnpipe\[hf\]'"):
        check_hf_path("gpt2")
    empty = json_dir.parent / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=f"tokenizer.path={empty} has no tokenizer.json"):
        load_hf_tokenizer(str(empty))


def test_truncation_and_padding_saved_in_a_file_are_dropped(base, tmp_path):
    """Some tokenizer.json files carry a batch setting such as max_length=50 (a copy of GPT-2's
    does): kept, it would cut every document at 50 tokens."""
    truncating = FastTokenizer.from_str(base.to_str())
    truncating.enable_truncation(max_length=5)
    truncating.enable_padding(length=8)
    truncating.save(str(tmp_path / "tokenizer.json"))
    loaded, _ = load_hf_tokenizer(str(tmp_path / "tokenizer.json"))
    text = " ".join(_corpus(4, 5))
    assert (
        loaded.decode(loaded.encode_with_lengths(text)[0]) == text.encode() and len(loaded.encode(text)) > 8
    )
    stored = json.loads(loaded.files()["tokenizer/tokenizer.json"])
    assert stored["truncation"] is None and stored["padding"] is None


def test_config_keys_and_the_fingerprint_of_existing_datasets():
    def check(**tokenizer):
        config_from_dict(
            PrepareConfig, {"output": "x", "source": {"paths": ["t.txt"]}, "tokenizer": tokenizer}
        )

    with pytest.raises(ConfigError, match=r"tokenizer\.path is empty: tokenizer\.kind=huggingface needs"):
        check(kind="huggingface")
    with pytest.raises(ConfigError, match=r"tokenizer\.path is for tokenizer\.kind=huggingface, not char"):
        check(kind="char", path="gpt2")
    with pytest.raises(
        ConfigError, match=r"tokenizer\.model is for char or sentencepiece tokenizers, not huggingface"
    ):
        check(kind="huggingface", path="gpt2", model="x.model")
    check(kind="huggingface", path="gpt2")
    # at its default the new key is not part of a dataset's identity: fingerprints stay as they were
    keys = dataset_fingerprint_keys(to_dict(PrepareConfig(output="x")))
    assert "path" not in keys["tokenizer"] and "model" in keys["tokenizer"]
    cfg = PrepareConfig(output="x", tokenizer=TokenizerConfig(kind=TokenizerKind.huggingface, path="gpt2"))
    assert dataset_fingerprint_keys(to_dict(cfg))["tokenizer"]["path"] == "gpt2"


def test_bad_paths_are_config_errors(tmp_path, capsys):
    out = tmp_path / "d"
    cases = {
        f"tokenizer.path={tmp_path}/missing": f"tokenizer.path={tmp_path}/missing: no such file or directory",
        f"tokenizer.path={tmp_path}/missing.json": "missing.json: no such file or directory",
        "tokenizer.kind=huggingface": "tokenizer.path is empty",
    }
    for override, message in cases.items():
        assert prepare(ENWIK8, out, "tokenizer.kind=huggingface", override) == 2
        assert message in capsys.readouterr().err
    assert not out.exists()  # refused before touching the output


def test_a_hub_name_that_does_not_load_is_a_config_error(monkeypatch):
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    import huggingface_hub.constants

    # no network (read when huggingface_hub is imported, hence the constant too); not cached either
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ConfigError, match="not a local directory, and loading it from the Hugging Face hub failed"
    ):
        load_hf_tokenizer("rnnpipe-tests/no-such-tokenizer")


def test_a_resumed_prepare_keeps_the_tokenizer_it_started_with(json_dir, tmp_path):
    """The work dir's copy wins over the path: units encoded before a kill and after agree."""
    src = tmp_path / "tok"
    src.mkdir()
    (src / "tokenizer.json").write_bytes((json_dir / "tokenizer.json").read_bytes())
    cfg = PrepareConfig(
        output=str(tmp_path / "d"), tokenizer=TokenizerConfig(kind=TokenizerKind.huggingface, path=str(src))
    )
    work = str(tmp_path / "work")
    files, extra = prepare_module._pretrained(cfg, work)
    assert extra == {"eos_token": EOS, "origin": {"path": str(src), "hub": False}}
    _byte_level(normalizers.Lowercase()).save(str(src / "tokenizer.json"))  # changed meanwhile
    assert prepare_module._pretrained(cfg, work) == (files, extra)


def test_a_normalizing_tokenizer_is_refused_when_loaded(tmp_path, capsys):
    bad = tmp_path / "lower"
    bad.mkdir()
    _byte_level(normalizers.Lowercase()).save(str(bad / "tokenizer.json"))
    text = tmp_path / "t.txt"
    text.write_text("Some Text\n" * 50)
    code = prepare(
        TEXT, tmp_path / "d", f"source.paths=[{text}]", "tokenizer.kind=huggingface", f"tokenizer.path={bad}"
    )
    err = capsys.readouterr().err
    assert code == 2 and f"tokenizer.path={bad}: the tokenizer does not give text back unchanged" in err
    assert "its normalizer is Lowercase" in err


def test_a_document_that_does_not_come_back_is_named(tmp_path, capsys):
    """What the load-time probe misses is caught at the first document that does not come back."""
    bad = tmp_path / "brackets"
    bad.mkdir()
    _byte_level(normalizers.Replace("[", "(")).save(str(bad / "tokenizer.json"))
    text = tmp_path / "t.txt"
    text.write_text("plain line\n" * 20 + "a [[link]] here\n" + "more\n" * 5)
    code = prepare(
        TEXT,
        tmp_path / "d",
        f"source.paths=[{text}]",
        "source.document=line",
        "tokenizer.kind=huggingface",
        f"tokenizer.path={bad}",
    )
    err = capsys.readouterr().err
    assert code == 1 and f"tokenizer.path={bad} does not reproduce the text of unit 0" in err
    assert "starting 'a [[link]] here'" in err and "the text has 'a [[link]] here'" in err


# ----------------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def enwik8_dataset(enwik8_head, hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("enwik8-hf") / "data"
    overrides = [
        f"source.paths=[{enwik8_head}]",
        "source.limit_bytes=300000",
        "source.unit_mb=0.1",
        "shards.sample_tokens=5000",
        "shards.samples_per_shard=4",
        "tokenizer.kind=huggingface",
        f"tokenizer.path={hf_dir}",
    ]
    assert prepare(ENWIK8, out, *overrides) == 0
    return out, overrides


def test_enwik8_shards_decode_to_the_text_byte_for_byte(enwik8_dataset, enwik8_head):
    out, _ = enwik8_dataset
    manifest = json.loads((out / "manifest.json").read_text())
    tok = load_tokenizer(str(out))
    assert isinstance(tok, HuggingFaceTokenizer) and manifest["dtype"] == "uint16"
    decoded = b""
    for split in ("train", "valid", "test"):
        tokens, metas = read_split(out, split)
        text = tok.decode(tokens)
        decoded += text
        # every sample's recorded bytes are exactly the bytes its tokens decode to
        starts = np.cumsum([0] + [m["tokens"] for m in metas])
        for m, lo in zip(metas, starts, strict=False):
            assert m["bytes"] == len(tok.decode(tokens[lo : lo + m["tokens"]]))
        assert manifest["splits"][split]["bytes"] == len(text) == sum(m["bytes"] for m in metas)
    (inp,) = manifest["source"]["inputs"]
    assert decoded == enwik8_head.read_bytes()[: inp["size"]] and 299_990 < len(decoded) <= 300_000


def test_enwik8_manifest_keeps_the_tokenizer(enwik8_dataset, hf_dir):
    import transformers

    out, overrides = enwik8_dataset
    manifest = json.loads((out / "manifest.json").read_text())
    stored = (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert stored == transformers.AutoTokenizer.from_pretrained(hf_dir).backend_tokenizer.to_str().encode()
    assert manifest["tokenizer"] == {
        "kind": "huggingface",
        "vocab_size": 302,
        "model_file": "tokenizer/tokenizer.json",
        "model_sha256": hashlib.sha256(stored).hexdigest(),
        "special_ids": {"eod": 300},
        "eos_token": EOS,
        "origin": {"path": str(hf_dir), "hub": False},
    }
    assert manifest["config"]["tokenizer"]["path"] == str(hf_dir)
    assert rnnpipe("verify", out) == 0
    # a re-run finds it complete (the tokenizer file's sha256 included) and rewrites nothing
    before = (out / "manifest.json").stat().st_mtime_ns
    assert prepare(ENWIK8, out, *overrides) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == before


def test_text_documents_end_with_the_eos_id(json_dir, tmp_path):
    lines = [*_corpus(2, 60), f"x{LONG}y {EOS} naïve 😀", *_corpus(3, 20)]
    src = tmp_path / "docs.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "d"
    overrides = [f"source.paths=[{src}]", "source.document=line", "shards.sample_tokens=300"]
    hf = ["tokenizer.kind=huggingface", f"tokenizer.path={json_dir}/tokenizer.json"]
    assert prepare(TEXT, out, *overrides, *hf) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    tok = load_tokenizer(str(out))
    docs: list[bytes] = []
    for split in ("train", "valid"):
        tokens, _ = read_split(out, split)
        assert (
            tokens[-1] == tok.eod_id
            and (tokens == tok.eod_id).sum() == manifest["splits"][split]["documents"]
        )
        cuts = np.flatnonzero(tokens == tok.eod_id)
        docs += [tok.decode(part) for part in np.split(tokens, cuts + 1)[:-1]]
        assert manifest["splits"][split]["bytes"] == len(tok.decode(tokens))
    assert docs == [line.encode() for line in lines]  # each line a document, exactly
    assert (
        tok.encode(LONG).tolist()[0]
        in read_split(out, "train")[0].tolist() + read_split(out, "valid")[0].tolist()
    )


# ------------------------------------------------------------------------------------ export


def test_the_export_carries_the_stored_tokenizer_json(tok, json_dir, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    files = tokenizer_files(tok)
    assert files["tokenizer.json"] == (json_dir / "tokenizer.json").read_bytes()  # copied through
    config = json.loads(files["tokenizer_config.json"])
    assert config["eos_token"] == EOS and config["split_special_tokens"] is True
    assert json.loads(files["special_tokens_map.json"]) == {"eos_token": EOS}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.eos_token_id == tok.eod_id and len(hf) == tok.vocab_size
    for text in SAMPLES:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ids == tok.encode(text).tolist() and hf.decode(ids) == text


def test_the_export_marks_the_eos_special_and_drops_a_bos_template(base):
    """A tokenizer.json whose eos is an ordinary token and whose post-processor adds ``<s>``:
    the export's file gives rnnpipe's ids (no <s>), with the eos special."""
    spec = json.loads(base.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != EOS]
    spec["model"]["vocab"][EOS] = 300
    edited = FastTokenizer.from_str(json.dumps(spec))
    edited.add_special_tokens(["<s>"])
    edited.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", edited.token_to_id("<s>"))]
    )
    assert edited.encode("ab").ids[0] == edited.token_to_id("<s>")
    tok = HuggingFaceTokenizer(edited.to_str(), EOS)
    exported = FastTokenizer.from_str(tokenizer_files(tok)["tokenizer.json"].decode())
    assert exported.encode("ab").ids == tok.encode("ab").tolist()
    specials = {t.content for t in exported.get_added_tokens_decoder().values() if t.special}
    assert EOS in specials and exported.token_to_id(EOS) == tok.eod_id == 300
