"""Word inputs: the word tokenizer, word-level PTB's 10k vocabulary, GloVe / word2vec embeddings."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import CLI, REPO, data_file, prepare, read_split
from tokenizers import Tokenizer as FastTokenizer

from rnnpipe.pipeline.config import config_from_dict, to_dict
from rnnpipe.pipeline.data.config import PrepareConfig
from rnnpipe.pipeline.data.manifest import dataset_fingerprint_keys, load_tokenizer, read_manifest
from rnnpipe.pipeline.data.tokenizers import load_tokenizer_file
from rnnpipe.pipeline.data.word_tokenizer import WORD_VOCAB_FILE, WordTokenizer, canonical, fit_word_tokenizer
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.models.config import EmbeddingFreeze, EmbeddingsConfig, ModelConfig
from rnnpipe.pipeline.models.embeddings import initialize, read_vectors
from rnnpipe.pipeline.models.hf.tokenizer_files import tokenizer_files
from rnnpipe.pipeline.models.lm import LanguageModel

PTB = REPO / "configs" / "prepare" / "ptb-word.yaml"
TEXT = "the cat sat on the mat\nthe dog sat\n a  cat\r\n saw the Dog \n"
EDGES = [
    " lead and trail  \n",
    "tabs\tand\u00a0nbsp\u2028sep\n\n\nblank lines",
    "naïve café ☃ 漢字 😀\n",
    "",
    "  ",
    "\n",
]


def small_tokenizer(**kw) -> WordTokenizer:
    return fit_word_tokenizer([TEXT], **kw)[0]


def test_word_tokenizer_ids_exact_bytes_and_the_canonical_round_trip():
    tok, stats = fit_word_tokenizer([TEXT])
    assert tok.tokens[:4] == ["<unk>", "<eos>", "the", "cat"]  # specials, then by count, ties by code point
    assert stats == {"types": 9, "kept": 9, "tokens": 14, "unknown": 0}
    assert tok.vocab_size == 11 and tok.special_ids() == {"eod": None, "unk": 0, "eos": 1}
    ids, nbytes = tok.encode_with_lengths(TEXT)
    assert (
        tok.decode(ids).decode()
        == canonical(TEXT)
        == "the cat sat on the mat\nthe dog sat\na cat\nsaw the Dog\n"
    )
    assert int(nbytes.sum()) == len(TEXT.encode())  # a token carries the whitespace before it
    assert tok.encode(" a  cat\r\n").tolist() == [tok.tokens.index("a"), 3, 1]
    assert tok.encode_with_lengths(" a  cat\r\n")[1].tolist() == [2, 5, 2]
    canonical_text = "the cat sat\non the mat\n"
    assert tok.decode(tok.encode(canonical_text)).decode() == canonical_text  # exact when canonical
    for text in EDGES:
        ids, nbytes = tok.encode_with_lengths(text)
        assert int(nbytes.sum()) == (len(text.encode()) if len(ids) else 0), text
        decoded = tok.decode(ids).decode()
        # words outside the vocabulary come back as <unk>; everything else is the canonical text
        assert decoded.split("\n") == [
            " ".join(w if w in tok.tokens[2:] else "<unk>" for w in line.split(" ") if w)
            for line in canonical(text).split("\n")
        ]
    # <unk> in text is the unknown word (PTB writes it); the other special names are words
    assert tok.encode("<unk> <eos> <eod> zebra").tolist() == [0, 0, 0, 0]
    assert tok.decode([2, 1, 0, 3]) == b"the\n<unk> cat"


def test_word_vocabulary_limits_lowercase_eod_and_its_file():
    tok = small_tokenizer(max_size=5, min_count=2)
    assert tok.tokens == ["<unk>", "<eos>", "the", "cat", "sat"]
    low = small_tokenizer(lowercase=True, eod=True)
    assert low.tokens[2] == "the" and "dog" in low.tokens and "Dog" not in low.tokens
    assert low.eod_id == low.vocab_size - 1 and low.tokens[-1] == "<eod>"
    assert low.decode(low.encode("The DOG")) == b"the dog"
    assert low.decode([2, low.eod_id, 3]) == b"the cat"  # <eod> decodes to nothing
    for tok in (small_tokenizer(), low):
        ((name, data),) = tok.files().items()
        assert name == WORD_VOCAB_FILE
        again = load_tokenizer_file("word", data)
        assert (again.tokens, again.lowercase, again.eod_id) == (tok.tokens, tok.lowercase, tok.eod_id)
        assert again.files()[name] == data
    with pytest.raises(PipelineError, match="not a word vocabulary"):
        load_tokenizer_file("word", b'{"symbols": "abc"}')
    with pytest.raises(PipelineError, match="leaves no room"):
        fit_word_tokenizer([TEXT], max_size=2)


def test_word_tokenizer_config_keys():
    def tokenizer(**kw):
        return config_from_dict(PrepareConfig, {"output": "x", "source": {"paths": ["a"]}, "tokenizer": kw})

    assert tokenizer(kind="word", max_size=10000, lowercase=True).tokenizer.max_size == 10000
    with pytest.raises(ConfigError, match=r"tokenizer\.lowercase is for tokenizer\.kind=word, not char"):
        tokenizer(kind="char", lowercase=True)
    with pytest.raises(ConfigError, match=r"tokenizer\.min_count"):
        tokenizer(kind="word", min_count=0)
    # the new keys at their defaults leave every existing dataset's fingerprint as it was
    keys = dataset_fingerprint_keys(to_dict(tokenizer(kind="char")))
    assert not {"max_size", "min_count", "lowercase"} & set(keys["tokenizer"])


def test_the_exported_tokenizer_json_gives_the_word_ids():
    for tok in (small_tokenizer(), small_tokenizer(lowercase=True, eod=True, min_count=2)):
        spec = tokenizer_files(tok)
        fast = FastTokenizer.from_str(spec["tokenizer.json"].decode())
        fast.encode_special_tokens = True  # what tokenizer_config.json's split_special_tokens sets
        for text in [TEXT, *EDGES, "<unk> <eos> <eod> The CAT x\x1cy"]:
            ids = fast.encode(text, add_special_tokens=False).ids
            assert ids == tok.encode(text).tolist(), text
            assert fast.decode(ids, skip_special_tokens=True) == tok.decode(ids).decode(), text
        if tok.eod_id is not None:
            assert json.loads(spec["special_tokens_map.json"])["eos_token"] == "<eod>"
            assert fast.token_to_id("<eod>") == tok.eod_id


def ptb_text(split: str) -> str:
    with gzip.open(data_file(f"ptb/ptb.{split}.txt.gz"), "rt") as f:
        return f.read()


@pytest.fixture(scope="module")
def ptb(tmp_path_factory) -> Path:
    paths = [data_file(f"ptb/ptb.{split}.txt.gz") for split in ("train", "valid", "test")]
    out = tmp_path_factory.mktemp("ptb") / "ptb-word"
    overrides = [
        f"source.{k}=[{p}]" for k, p in zip(("paths", "valid_paths", "test_paths"), paths, strict=True)
    ]
    assert prepare(PTB, out, *overrides) == 0
    return out


def test_ptb_gets_mikolovs_10k_vocabulary_saved_and_reloaded(ptb):
    manifest = read_manifest(str(ptb))
    entry = manifest["tokenizer"]
    assert (
        entry["kind"] == "word" and entry["vocab_size"] == 10_000 and entry["model_file"] == WORD_VOCAB_FILE
    )
    assert entry["special_ids"] == {"eod": None, "unk": 0, "eos": 1}
    tok = load_tokenizer(str(ptb))
    assert len(tok.tokens) == len(set(tok.tokens)) == 10_000 and tok.tokens[:2] == ["<unk>", "<eos>"]
    # the vocabulary file, read back from the manifest, is the tokenizer prepare fitted, byte for byte
    fitted = fit_word_tokenizer([ptb_text("train")], max_size=10_000)[0]
    assert (ptb / WORD_VOCAB_FILE).read_bytes() == fitted.files()[WORD_VOCAB_FILE]
    assert load_tokenizer(str(ptb)).tokens == tok.tokens == fitted.tokens
    # Mikolov's token counts (words and <eos>), every byte of the files counted
    counts = {"train": 929_589, "valid": 73_760, "test": 82_430}
    for split, n in counts.items():
        text = ptb_text(split)
        assert manifest["splits"][split]["tokens"] == n
        assert manifest["splits"][split]["bytes"] == len(text.encode())
        if split != "train":  # every valid/test word is in the vocabulary: the round trip is exact
            tokens = read_split(ptb, split)[0]
            assert tok.decode(tokens).decode() == canonical(text)
    assert manifest["dtype"] == "uint16"


def test_the_ptb_lm_task_on_a_word_backbone_scores_every_word_once(ptb):
    """Fine-tuning's lm task with PTB's own vocabulary: one target per word and per <eos>, so its
    per-word perplexity is exp(nats per token), the literature's (82,430 test words)."""
    from rnnpipe.pipeline.finetune.tasks import encode_lm

    tok = load_tokenizer(str(ptb))
    lines = ptb_text("test").splitlines()
    text = encode_lm(tok, lines)
    assert text.words == len(text.ids) - 1 == 82_430  # the leading <eos> only starts the stream
    assert text.ids[0] == 1 and (text.ids[1:] == 1).sum() == len(lines)
    assert text.bytes == len(ptb_text("test").encode())


# -------------------------------------------------------------------------------- embeddings

D = 8
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "a", "saw"]


def vectors_file(path: Path, fmt: str = "glove") -> dict[str, np.ndarray]:
    """A vectors file of some vocabulary words, one only lowercased (the vocabulary's "Dog"), two
    outside it, and a later duplicate that must not win; returns word -> vector."""
    rng = np.random.default_rng(0)
    vecs = {w: rng.normal(size=D).astype(np.float32) for w in ["the", "cat", "on", "dog", "zebra", "x y"]}
    lines = [f"{w} " + " ".join(f"{v:.6f}" for v in vec) for w, vec in vecs.items()]
    lines.append("the " + " ".join(["9.0"] * D))  # a duplicate: the first line wins
    if fmt == "word2vec":
        lines.insert(0, f"{len(lines)} {D}")
    body = ("\n".join(lines) + "\n").encode()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(body))
    else:
        path.write_bytes(body)
    return {w: np.asarray([float(f"{v:.6f}") for v in vec], dtype=np.float32) for w, vec in vecs.items()}


def model_with(tok: WordTokenizer, init: str, freeze: str = "none", tie: bool = False) -> LanguageModel:
    cfg = ModelConfig(
        n_layers=1, d_model=D, tie_embeddings=tie, embeddings=EmbeddingsConfig(init, EmbeddingFreeze(freeze))
    )
    torch.manual_seed(0)
    return LanguageModel(cfg, tok.vocab_size)


@pytest.mark.parametrize("name,fmt", [("v.txt", "glove"), ("v.txt.gz", "glove"), ("w2v.txt", "word2vec")])
def test_vectors_file_rows_and_coverage(name, fmt, tmp_path):
    tok = small_tokenizer()  # its words: the cat sat Dog a dog mat on saw
    vecs = vectors_file(tmp_path / name, fmt)
    model = model_with(tok, str(tmp_path / name))
    before = model.embed.weight.detach().clone()
    record = initialize(model, model.cfg, tok)
    w = model.embed.weight.detach()
    found = {"the", "cat", "on", "dog", "Dog"}  # Dog through its lowercased form
    for i, word in enumerate(tok.tokens):
        if word in found:
            assert torch.equal(w[i], torch.from_numpy(vecs[word.lower()])), word
        else:
            assert torch.equal(w[i], before[i]), word  # not found: the random initialisation stays
    assert record["found"] == 5 and record["found_lowercased"] == 1 and record["vocab"] == tok.vocab_size
    assert record["coverage"] == pytest.approx(5 / 11) and record["format"] == fmt and record["dim"] == D
    assert record["file_vectors"] == 7 and record["copied"] is True


def test_vectors_file_errors(tmp_path):
    tok = small_tokenizer()
    vectors_file(tmp_path / "v.txt")
    with pytest.raises(ConfigError, match=r"model\.embeddings\.init=.*8-dimensional.*model\.d_model=16"):
        read_vectors(str(tmp_path / "v.txt"), tok.tokens, 16)
    (tmp_path / "bad.txt").write_text("the 1 2 3\ncat 1 2\n")
    with pytest.raises(PipelineError, match="line 2 has 2 numbers after 'cat', expected 3"):
        read_vectors(str(tmp_path / "bad.txt"), tok.tokens, 3)
    with pytest.raises(PipelineError, match="cannot read it"):
        read_vectors(str(tmp_path / "absent.txt"), tok.tokens, 3)
    with pytest.raises(ConfigError, match=r"embeddings\.freeze=found.*embeddings\.init is empty"):
        config_from_dict(ModelConfig, {"embeddings": {"freeze": "found"}})
    char = load_tokenizer_file("char", json.dumps({"symbols": "ab", "eod": False, "unk": False}).encode())
    model = model_with(tok, str(tmp_path / "v.txt"))
    with pytest.raises(ConfigError, match="needs a word-level dataset"):
        initialize(model, model.cfg, char)


@pytest.mark.parametrize("freeze,tie", [("found", False), ("found", True), ("all", False)])
def test_freeze_keeps_the_vectors_through_optimizer_steps(freeze, tie, tmp_path):
    tok = small_tokenizer()
    vectors_file(tmp_path / "v.txt.gz")
    model = model_with(tok, str(tmp_path / "v.txt.gz"), freeze, tie)
    record = initialize(model, model.cfg, tok)
    rows = torch.tensor([i for i, w in enumerate(tok.tokens) if w in {"the", "cat", "on", "dog", "Dog"}])
    start = model.embed.weight.detach().clone()
    opt = torch.optim.AdamW(model.param_groups(), lr=1e-2, weight_decay=0.1)
    tokens = torch.randint(0, tok.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        logits, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = model.embed.weight.detach()
    assert torch.equal(w[rows], start[rows])  # exactly as the file gave them
    others = torch.ones(tok.vocab_size, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(w[others], start[others]) == (freeze == "all")  # the other rows train, unless all
    assert record["freeze"] == freeze
    assert any(p is model.embed.weight for g in model.param_groups() for p in g["params"]) == (
        freeze != "all"
    )


def test_embeddings_keys_validate_and_stay_out_of_huggingface_models():
    with pytest.raises(ConfigError, match=r"embeddings is for kind=rnnpipe"):
        config_from_dict(ModelConfig, {"kind": "huggingface", "embeddings": {"init": "glove.txt"}})


def test_default_embeddings_keys_leave_run_fingerprints_unchanged():
    from rnnpipe.pipeline.train.config import PretrainConfig, run_identity

    values = to_dict(PretrainConfig(run_dir="r"))
    values["data"]["path"] = "d"
    assert not [k for k in run_identity(values, "digest", 1) if k.startswith("model.embeddings")]
    values["model"]["embeddings"]["init"] = "glove.txt"
    assert run_identity(values, "digest", 1)["model.embeddings.init"] == "glove.txt"


@pytest.mark.slow
def test_pretraining_from_glove_records_coverage_and_keeps_frozen_rows(tmp_path):
    pytest.importorskip("deepspeed")
    text = "".join(f"{' '.join(np.random.default_rng(i).choice(WORDS, 9))}\n" for i in range(400))
    for split, part in (("train", text[:-4000]), ("valid", text[-4000:-2000]), ("test", text[-2000:])):
        (tmp_path / f"{split}.txt").write_text(part)
    data = tmp_path / "data"
    keys = {"paths": "train", "valid_paths": "valid", "test_paths": "test"}
    overrides = [f"source.{k}=[{tmp_path}/{split}.txt]" for k, split in keys.items()]
    assert prepare(PTB, data, *overrides, "shards.sample_tokens=512") == 0
    vecs = vectors_file(tmp_path / "glove.txt")
    run_dir = tmp_path / "run"
    cmd = [*CLI, "pretrain", str(REPO / "configs/pretrain/tiny-lrn.yaml")]
    cmd += [f"run_dir={run_dir}", f"data.path={data}", "distributed.nproc=1", "executor.kind=local"]
    cmd += ["model.n_layers=1", f"model.d_model={D}", "model.tie_embeddings=false", "data.seq_len=16"]
    cmd += ["data.batch_size=2", "train.eval_max_tokens=200", "train.sample_tokens=0"]
    cmd += [f"model.embeddings.init={tmp_path}/glove.txt", "model.embeddings.freeze=found"]
    from rnnpipe.pipeline.train.checkpoint import find_latest, read_header
    from rnnpipe.pipeline.train.export import consolidate

    tok = load_tokenizer(str(data))
    start = None
    for steps, copied in ((4, True), (7, False)):  # then resumed: the rows stay frozen, not copied again
        done = subprocess.run(
            [*cmd, f"train.steps={steps}"],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "RNNPIPE_PROGRESS": "0"},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert "4 of 10 ids found" in done.stdout + done.stderr  # the coverage is logged
        header = read_header(find_latest(run_dir))
        record = header["embeddings"]
        assert (header["step"], record["found"], record["copied"]) == (steps, 4, copied)
        assert record["coverage"] == pytest.approx(4 / tok.vocab_size)
        assert json.loads((run_dir / "embeddings.json").read_text()) == record
        weight = consolidate(run_dir).state["embed.weight"].float()
        for word in ("the", "cat", "on", "dog"):
            assert torch.equal(weight[tok.tokens.index(word)], torch.from_numpy(vecs[word]))
        trained = tok.tokens.index("sat")
        assert start is None or not torch.equal(weight[trained], start)  # the other rows train
        start = weight[trained]
