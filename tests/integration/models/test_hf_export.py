"""An export loads in ``transformers`` (AutoModelForCausalLM/AutoTokenizer, trust_remote_code, no
network) and in lm-evaluation-harness, and agrees with rnnpipe's own model, tokenizer,
generation and evaluation. Datasets are prepared here from text this file writes."""

from __future__ import annotations

import json
import math
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import REPO, prepare

from rnnpipe.pipeline.config import to_dict
from rnnpipe.pipeline.data.manifest import load_tokenizer, read_manifest
from rnnpipe.pipeline.models.config import MixerKind, ModelConfig
from rnnpipe.pipeline.models.lm import LanguageModel
from rnnpipe.pipeline.models.pretrained import load_pretrained, load_pretrained_tokenizer, save_pretrained

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")

WORDS = str.split(
    "the of and to in a is that for it as was with be by on not he I this are or his from at which "
    "but have an they you were her she there one all we can their has been if more when will would "
    "who so no river stone winter garden 1984 42 7 naïve café über — “quoted” 東京"
)
EDGES = ["", " ", "a  b   c", "\n\nline\n", "digits 1984 42 7", "tab\tsep", "naïve café", "a—b"]
# what looks special to a tokenizer but is text to rnnpipe's: special-token names, byte-piece
# names, sentencepiece's space symbol, control characters, long runs of spaces
ADVERSARIAL = [
    "<|endoftext|> the",
    "a </s> b <unk> c",
    "<0x41><0xFF>",
    "the\u2581river",
    "\x00\x07\x1b",
    " " * 40 + "x",
]


def _corpus(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 20))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ""]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """A prepared dataset per tokenizer kind, from two documents (so char and sentencepiece have
    an end-of-document id)."""
    root = tmp_path_factory.mktemp("hf")
    docs = []
    for i in range(2):
        doc = root / f"doc{i}.txt"
        doc.write_text(_corpus(i, 12_000), encoding="utf-8")
        docs.append(str(doc))
    out = {}
    config = REPO / "configs/prepare/tinyshakespeare.yaml"
    for kind, extra in {
        "bytes": ["tokenizer.kind=bytes"],
        "char": ["tokenizer.kind=char"],
        "sentencepiece": [
            "tokenizer.kind=sentencepiece",
            "tokenizer.vocab_size=400",
            "tokenizer.train_threads=1",
        ],
        "sentencepiece-bpe": [
            "tokenizer.kind=sentencepiece",
            "tokenizer.vocab_size=400",
            "tokenizer.train_threads=1",
            "tokenizer.model_type=bpe",
        ],
    }.items():
        out[kind] = root / kind
        code = prepare(
            config,
            out[kind],
            f"source.paths=[{','.join(docs)}]",
            "source.test_fraction=0.1",
            "shards.sample_tokens=4096",
            *extra,
        )
        assert code == 0
    return out


def _export(dataset: Path, mixer: str, attention_every: int, out: Path, seed: int = 0) -> LanguageModel:
    manifest = read_manifest(str(dataset))
    tok_entry = manifest["tokenizer"]
    files = {}
    if tok_entry.get("model_file"):
        files[tok_entry["model_file"]] = (dataset / tok_entry["model_file"]).read_bytes()
    cfg = ModelConfig(
        mixer=MixerKind(mixer),
        n_layers=2,
        d_model=32,
        mlp_ratio=2.0,
        attention_every=attention_every,
        n_heads=4,
    )
    torch.manual_seed(seed)
    model = LanguageModel(cfg, tok_entry["vocab_size"])
    save_pretrained(out, model.state_dict(), to_dict(cfg), tok_entry, files, {"step": 1})
    return model.eval()


def _hf(export: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
    return model.eval(), tokenizer


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf-modules"))


def _text(dataset: Path, split: str = "test", limit: int = 3000) -> str:
    from harness import read_split

    tokens, _ = read_split(dataset, split)
    return load_tokenizer(str(dataset)).decode(tokens[:limit]).decode("utf-8", errors="ignore")


@pytest.mark.parametrize("kind", ["bytes", "char", "sentencepiece", "sentencepiece-bpe"])
def test_tokenizer_ids_equal_rnnpipe(datasets, kind, tmp_path):
    _export(datasets[kind], "lrn", 0, tmp_path / "e")
    _, hf_tok = _hf(tmp_path / "e")
    ours = load_pretrained_tokenizer(tmp_path / "e")
    texts = [_text(datasets[kind]), *EDGES, *ADVERSARIAL, "unseen ✓ ☃ emoji 🎉"]
    if kind == "sentencepiece":  # a unigram lattice matches the names of control and byte pieces
        texts = [t for t in texts if t not in ("a </s> b <unk> c", "<0x41><0xFF>")]  # docs/evaluation.md
    if kind == "char":  # a char vocabulary without <unk> refuses what its corpus lacks
        texts = [t for t in texts if set(t) <= set(ours.symbols)]
        assert len(texts) >= 5
    for text in texts:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ours.encode(text).tolist(), text[:60]
        assert hf_tok.decode(ids, skip_special_tokens=True) == ours.decode(ids).decode("utf-8")
    if ours.eod_id is not None:
        assert hf_tok.eos_token_id == ours.eod_id


@pytest.mark.parametrize(
    "kind,mixer,attention_every",
    [("bytes", "lrn", 0), ("char", "mingru", 0), ("sentencepiece", "sru", 0), ("char", "lrn", 2)],
    ids=["bytes-lrn", "char-mingru", "spm-sru", "char-hybrid"],
)
def test_model_loads_generates_and_carries_its_state(datasets, kind, mixer, attention_every, tmp_path):
    ours_trained = _export(datasets[kind], mixer, attention_every, tmp_path / "e")
    model, tok = _hf(tmp_path / "e")
    ours = load_pretrained(tmp_path / "e")
    ids = torch.tensor([tok("The river and the stone")["input_ids"]])
    with torch.no_grad():
        hf_logits = model(ids).logits
        assert torch.equal(hf_logits, ours(ids)[0])
        assert torch.equal(hf_logits, ours_trained(ids)[0])  # the weights are the exported ones
    # greedy generate == rnnpipe's greedy generation (no eos stop: compare 40 tokens exactly)
    g = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(g[:, ids.shape[1] :], ours.generate(ids, 40, temperature=0))
    # the cache is the carried state: constant size for recurrent layers, a growing KV cache for attention
    sizes = []
    for n in (10, 500):
        out = model.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
        cache = out.get("cache", out.get("past_key_values"))
        assert cache.get_seq_length() == ids.shape[1] + n - 1  # the last token is never fed back
        sizes.append(cache.nbytes())
    if attention_every:
        assert sizes[1] > sizes[0]
    else:
        assert sizes[1] == sizes[0] > 0
    if kind == "sentencepiece":  # what transformers' save_pretrained writes loads back in both worlds
        from transformers import AutoModel

        resaved = tmp_path / "resaved"
        model.save_pretrained(resaved)
        tok.save_pretrained(resaved)
        assert (resaved / "modeling_rnnpipe.py").read_text() == (
            tmp_path / "e/modeling_rnnpipe.py"
        ).read_text()
        again, again_tok = _hf(resaved)
        with torch.no_grad():
            assert torch.equal(again(ids).logits, hf_logits)
            assert torch.equal(
                AutoModel.from_pretrained(resaved, trust_remote_code=True)(ids).logits, hf_logits
            )
            assert torch.equal(load_pretrained(resaved)(ids)[0], hf_logits)
        assert again_tok("The river")["input_ids"] == tok("The river")["input_ids"]
        assert (
            load_pretrained_tokenizer(resaved).encode("The river").tolist() == tok("The river")["input_ids"]
        )


def test_fresh_python_loads_an_export_and_files_follow_the_umask(datasets, tmp_path):
    export = tmp_path / "e"
    old = os.umask(0o022)
    try:
        _export(datasets["sentencepiece"], "lrn", 0, export)
    finally:
        os.umask(old)
    for f in export.rglob("*"):
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    # the same weights give the same file (the fine-tune stage names its backbone by its sha256)
    again = tmp_path / "again"
    _export(datasets["sentencepiece"], "lrn", 0, again)
    assert (again / "model.safetensors").read_bytes() == (export / "model.safetensors").read_bytes()
    meta = json.loads((export / "config.json").read_text())
    assert meta["model_type"] == "rnnpipe" and "AutoModelForCausalLM" in meta["auto_map"]
    assert {"model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in export.iterdir()
    }
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "ids = t('The river', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "print(type(m).__name__, ids.shape[1], out.shape[1])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mods")}
    run = subprocess.run(
        [sys.executable, "-c", script, str(export)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    name, n_prompt, n_out = run.stdout.split()
    assert name == "RnnpipeForCausalLM" and int(n_out) == int(n_prompt) + 5


def _lm_eval(export: Path, **kwargs):
    pytest.importorskip("lm_eval", reason="the eval extra (lm-evaluation-harness) is not installed")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(export), trust_remote_code=True, device="cpu", batch_size=4, **kwargs)


def _instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_lm_eval_loglikelihood_equals_rnnpipe(datasets, tmp_path):
    export = tmp_path / "e"
    _export(datasets["sentencepiece"], "lrn", 0, export)
    lm = _lm_eval(export)
    ours, tok = load_pretrained(export), load_pretrained_tokenizer(export)
    pairs = [("The river", " and the stone"), ("Winter garden, ", "naïve café!"), ("42", " 7 1984")]
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    for (context, continuation), (ll, _greedy) in zip(pairs, got, strict=True):
        # lm-eval moves the context's trailing spaces to the continuation, encodes context and the
        # whole, and scores the whole's tokens after the context's count
        context, continuation = context.rstrip(), context[len(context.rstrip()) :] + continuation
        ctx = tok.encode(context).tolist()
        whole = tok.encode(context + continuation).tolist()
        cont = whole[len(ctx) :]  # lm-eval's split: the context's own tokens, then the rest of the whole
        with torch.no_grad():
            logp = ours(torch.tensor([ctx + cont]))[0][0].float().log_softmax(-1)
        want = sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert ll == pytest.approx(want, abs=1e-4)


def test_lm_eval_rolling_equals_rnnpipes_evaluation(datasets, tmp_path):
    """lm-eval's loglikelihood_rolling of a split's text (prefixed by its first token) is the
    negative of the nats rnnpipe's evaluation sums over that split with the state carried."""
    from rnnpipe.pipeline.data.reader import SplitReader
    from rnnpipe.pipeline.engine.rank import RankContext
    from rnnpipe.pipeline.train.evaluate import evaluate

    dataset = datasets["char"]
    export = tmp_path / "e"
    _export(dataset, "mingru", 0, export)
    ours, tok = load_pretrained(export), load_pretrained_tokenizer(export)
    reader = SplitReader(str(dataset), "test")
    result = evaluate(ours, reader, RankContext.single(torch.device("cpu")), streams=1, seq_len=256)
    from harness import read_split

    tokens, _ = read_split(dataset, "test")
    first, rest = int(tokens[0]), tokens[1:].tolist()
    assert rest[-1] == tok.eod_id and tok.eod_id not in rest[:-1]  # one document, then its end
    # text has no end-of-document token: lm-eval scores the document, rnnpipe's model its end
    text = tok.decode(rest).decode("utf-8")
    lm = _lm_eval(export, prefix_token_id=first)
    assert lm.tok_encode(text) == rest[:-1]  # lm-eval reads the very tokens rnnpipe evaluated
    (rolling,) = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))
    with torch.no_grad():
        logp_end = ours(torch.tensor([[first, *rest[:-1]]]))[0][0, -1].log_softmax(-1)[tok.eod_id].item()
    assert result["tokens"] == len(rest)
    assert -(rolling + logp_end) == pytest.approx(result["loss"] * result["tokens"], rel=1e-6)
    # bits per byte as lm-eval reports it (over the text's UTF-8 bytes) against rnnpipe's
    lm_eval_bpb = -(rolling + logp_end) / math.log(2) / len(text.encode("utf-8"))
    assert lm_eval_bpb == pytest.approx(result["bpb"], rel=0.01)


@pytest.mark.parametrize("mixer", [k.value for k in MixerKind])
def test_every_mixer_loads_with_its_logits_and_beam_search_reorders_its_state(datasets, mixer, tmp_path):
    ours = _export(datasets["bytes"], mixer, 0, tmp_path / "e")
    model, _ = _hf(tmp_path / "e")
    ids = torch.tensor([list(b"The river and")])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours(ids)[0])
        assert model.model.head.weight is model.model.embed.weight  # still tied after the copy
    # beam search reorders the cache along each mixer's batch dimension (LSTM/GRU: dim 1)
    out = model.generate(
        ids, max_new_tokens=6, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert out.shape == (1, ids.shape[1] + 6)
    best = out[:, ids.shape[1] :]
    with torch.no_grad():  # the beam's tokens, fed again, score as the beam search said they did
        beam = model.generate(
            ids,
            max_new_tokens=6,
            num_beams=3,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,
        )
        logp = ours(torch.cat([ids, best], 1))[0][0, ids.shape[1] - 1 : -1].log_softmax(-1)
    total = logp.gather(-1, best[0, :, None]).sum().item()
    assert beam.sequences_scores.item() == pytest.approx(total / 6, abs=1e-4)  # length-normalised


def test_trainer_conventions_gradient_checkpointing_and_the_loss(datasets, tmp_path):
    """What transformers' Trainer relies on: gradient checkpointing changes no gradient, and the
    loss divides by the Trainer's token count when it passes one (gradient accumulation)."""
    _export(datasets["bytes"], "lrn", 0, tmp_path / "e")
    model, _ = _hf(tmp_path / "e")
    model.train()
    ids = torch.tensor([list(b"The river and the stone."), list(b"A winter garden of 1984.")])
    labels = ids.clone()
    labels[1, :5] = -100

    def grads(checkpointing: bool):
        model.zero_grad()
        # transformers 5 renamed it activation checkpointing; the Trainer's flag calls the same
        on = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        (on if checkpointing else off)()
        out = model(ids, labels=labels)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, plain = grads(False)
    loss_ckpt, ckpt = grads(True)
    assert model.model.gradient_checkpointing
    assert torch.equal(loss, loss_ckpt)
    for a, b in zip(plain, ckpt, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    targets = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        logp = model(ids).logits[:, :-1].log_softmax(-1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0][labels[:, 1:] != -100].sum()
        assert loss.item() == pytest.approx(nll.item() / targets, rel=1e-5)
        summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(3 * targets)).loss
        assert summed.item() == pytest.approx(nll.item() / (3 * targets), rel=1e-5)


def test_padded_batches_right_padding_is_harmless_and_left_padding_reads_each_row(datasets, tmp_path):
    ours = _export(datasets["bytes"], "mingru", 0, tmp_path / "e")
    model, _ = _hf(tmp_path / "e")
    long, short = list(b"The river and"), list(b"Stone")
    pad = len(long) - len(short)
    with torch.no_grad():
        right = model(
            torch.tensor([long, short + [0] * pad]),
            attention_mask=torch.tensor([[1] * 13, [1] * 5 + [0] * pad]),
        ).logits
        # (a batch of 2 and one of 1 may round differently in the matrix products: not bit-equal)
        torch.testing.assert_close(right[1, :5], ours(torch.tensor([short]))[0][0], rtol=1e-5, atol=1e-6)
    # left padding, as generate and lm-eval's generate_until pad: each row as if alone
    batch = model.generate(
        torch.tensor([long, [0] * pad + short]),
        attention_mask=torch.tensor([[1] * 13, [0] * pad + [1] * 5]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(batch[0, 13:], ours.generate(torch.tensor(long), 12, temperature=0)[0])
    assert torch.equal(batch[1, 13:], ours.generate(torch.tensor(short), 12, temperature=0)[0])
    with pytest.raises(ValueError, match="ones then zeros"):
        model(torch.tensor([long]), attention_mask=torch.tensor([[1, 0] * 6 + [1]]))
    _export(datasets["bytes"], "lrn", 2, tmp_path / "hybrid")
    hybrid, _ = _hf(tmp_path / "hybrid")
    with pytest.raises(ValueError, match="attention layers"):
        hybrid(
            torch.tensor([long, [0] * pad + short]),
            attention_mask=torch.tensor([[1] * 13, [0] * pad + [1] * 5]),
        )


def test_a_sentencepiece_model_with_another_normalizer_exports_without_a_wrong_tokenizer_json(
    tmp_path, caplog
):
    """A reused sentencepiece model normalizing text (NFKC, a dummy prefix) has no tokenizers
    equivalent here: the export says so and writes no tokenizer.json rather than one giving other ids."""
    import io

    import sentencepiece as spm

    from rnnpipe.pipeline.data.tokenizers import SentencePieceTokenizer

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(3, 3000).splitlines()),
        model_writer=proto,
        vocab_size=120,
        minloglevel=2,
        eos_id=1,
        unk_id=0,
        bos_id=-1,
        pad_id=-1,
    )
    tok = SentencePieceTokenizer(proto.getvalue())
    entry = {"kind": "sentencepiece", "vocab_size": tok.vocab_size, "model_file": "tokenizer/spm.model"}
    cfg = ModelConfig(n_layers=1, d_model=16)
    model = LanguageModel(cfg, tok.vocab_size)
    with caplog.at_level("WARNING", logger="rnnpipe"):
        save_pretrained(tmp_path / "e", model.state_dict(), to_dict(cfg), entry, tok.files(), {"step": 1})
    assert "no Hugging Face tokenizer files" in caplog.text and "nmt_nfkc" in caplog.text
    assert not (tmp_path / "e/tokenizer.json").exists()
    assert (
        load_pretrained_tokenizer(tmp_path / "e").encode("the river").tolist()
        == tok.encode("the river").tolist()
    )
    hf, _ = _hf_model_only(tmp_path / "e")
    with torch.no_grad():
        assert torch.equal(hf(torch.tensor([[5, 6, 7]])).logits, model.eval()(torch.tensor([[5, 6, 7]]))[0])


def _hf_model_only(export: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval(), None
