"""``tokenizer.json`` (the ``tokenizers`` format that ``AutoTokenizer`` loads) for every rnnpipe
tokenizer, giving the same ids as rnnpipe's own ``encode``:

- bytes: 256 byte tokens, id = byte value (byte-level pre-tokenizer, no merges);
- char: one token per symbol of the training alphabet, the end-of-document id as a special token
  and, where the vocabulary has one, U+FFFD as the unknown token;
- sentencepiece: the model's pieces and scores (unigram or BPE), spaces as U+2581, byte fallback;
- word: a WordLevel model over the vocabulary (``<unk>`` its unknown token, the newline the
  ``<eos>`` id), split at whitespace and newlines as rnnpipe splits (Unicode White_Space), lowercased
  where the vocabulary is (one known difference: ``tokenizers`` lowercases character by character,
  so a word-final Greek capital sigma becomes σ where Python's ``str.lower`` gives ς); decoding
  joins words with single spaces and ends lines at ``<eos>``, as rnnpipe's does;
- huggingface: the dataset's stored ``tokenizer.json`` as it is (GPT-2's stays byte for byte),
  rewritten only where it must be: its eos token marked special when it is not, and a
  post-processor that adds tokens (a BOS) dropped, since rnnpipe encodes without them.

Checked against rnnpipe's tokenizers in tests/integration/models/test_hf_export.py.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

from rnnpipe.pipeline.data.hf_tokenizer import HuggingFaceTokenizer
from rnnpipe.pipeline.data.tokenizers import ByteTokenizer, CharTokenizer, SentencePieceTokenizer, Tokenizer
from rnnpipe.pipeline.data.word_tokenizer import EOD, SPACE, UNK, WordTokenizer

EOD_TOKEN = "<|endoftext|>"  # the char tokenizer's end-of-document id has no text of its own


class UnsupportedTokenizer(ValueError):
    """No ``tokenizer.json`` can reproduce this tokenizer's ids."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table, which the byte-level pre-tokenizer uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bytes_json() -> tuple[FastTokenizer, dict[str, Any]]:
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = FastTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok, {}


def _char_json(t: CharTokenizer) -> tuple[FastTokenizer, dict[str, Any]]:
    vocab = {s: i for i, s in enumerate(t.symbols)}
    special: dict[str, Any] = {}
    unk = None
    if t.unk_id is not None:
        unk = "\ufffd" if "\ufffd" not in vocab else "<unk>"
        vocab[unk] = t.unk_id
        if unk != "\ufffd":  # U+FFFD decodes as itself, as rnnpipe's unk does: not a special token
            special["unk_token"] = unk
    if t.eod_id is not None:
        vocab[EOD_TOKEN] = t.eod_id
        special["eos_token"] = EOD_TOKEN
    # BPE without merges over the whole text splits it into characters: one token per symbol
    tok = FastTokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.decoder = decoders.Fuse()
    return tok, special


def _word_json(t: WordTokenizer) -> tuple[FastTokenizer, dict[str, Any]]:
    """A WordLevel ``tokenizer.json`` giving the word tokenizer's ids and canonical decoding."""
    vocab = {UNK: t.unk_id, "\n": t.eos_id}
    vocab.update({w: i + 2 for i, w in enumerate(t.words)})
    tok = FastTokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    if t.lowercase:
        tok.normalizer = normalizers.Lowercase()
    # words: runs of non-whitespace; each newline a token of its own (<eos>)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(f"[{SPACE}]+"), "removed"), pre_tokenizers.Split("\n", "isolated")]
    )
    # " " before every token, then none around a newline, none at the start
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(Regex("^"), " "),
            decoders.Fuse(),
            decoders.Replace(" \n", "\n"),
            decoders.Replace("\n ", "\n"),
            decoders.Strip(" ", 1, 0),
        ]
    )
    # <unk> is not declared special: PTB's text holds it as a word, and decoding without special
    # tokens would drop it (rnnpipe's decode writes it)
    special: dict[str, Any] = {}
    if t.eod_id is not None:
        # the last id, outside the WordLevel vocabulary: added as a token, it gets exactly that
        # id, and (split_special_tokens) the same name typed in text stays a word, as in rnnpipe
        name = EOD
        while name in vocab:
            name = f"<{name}>"
        tok.add_special_tokens([name])
        special["eos_token"] = name
    return tok, special


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The merges of a sentencepiece BPE model: every split of a piece into two pieces, ranked by
    the merged piece's id (sentencepiece's BPE ids follow its merge order), then the halves' ids."""
    merges = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def _spm_json(t: SentencePieceTokenizer) -> tuple[FastTokenizer, dict[str, Any]]:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(t.model_proto)
    norm = proto.normalizer_spec
    if norm.name != "identity" or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        raise UnsupportedTokenizer(
            f"its normalizer ({norm.name!r}, add_dummy_prefix={norm.add_dummy_prefix}, "
            f"remove_extra_whitespaces={norm.remove_extra_whitespaces}) is not the identity rnnpipe "
            "trains with, so a tokenizers file could give other ids"
        )
    sp = t.sp
    n = sp.get_piece_size()
    # pieces that sentencepiece never matches in text (control, unknown, byte pieces) stay out of
    # the BPE merges; a unigram lattice cannot exclude them: their names typed in text, such as
    # "</s>" or "<0x41>", become those pieces (docs/evaluation.md)
    text_piece = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)) for i in range(n)]
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(n)]
    unk_id = sp.unk_id()
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        merges = _bpe_merges({p: i for p, i in vocab.items() if text_piece[i]})
        model = models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=pieces[unk_id][0],
            fuse_unk=True,
            byte_fallback=byte_fallback,
        )
    else:
        model = models.Unigram(pieces, unk_id=unk_id, byte_fallback=byte_fallback)
    tok = FastTokenizer(model)
    # rnnpipe trains with identity normalization and no dummy prefix: only the space becomes ▁
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    decs = [decoders.Replace("\u2581", " ")]
    if byte_fallback:
        decs.append(decoders.ByteFallback())
    tok.decoder = decoders.Sequence([*decs, decoders.Fuse()])
    special = {"unk_token": pieces[unk_id][0]}
    if t.eod_id is not None:
        special["eos_token"] = pieces[t.eod_id][0]
    return tok, special


def _pretrained_json(t: HuggingFaceTokenizer) -> tuple[bytes, dict[str, Any]]:
    """The stored ``tokenizer.json`` of a ``huggingface`` dataset, and its eos token."""
    special = {"eos_token": t.eos_token} if t.eos_token is not None else {}
    fast = FastTokenizer.from_str(t.tokenizer_json.decode("utf-8"))
    changed = False
    marked = {a.content for a in fast.get_added_tokens_decoder().values() if a.special}
    if t.eos_token is not None and t.eos_token not in marked:
        fast.add_special_tokens([t.eos_token])
        changed = True
    if fast.encode("a", add_special_tokens=True).ids != fast.encode("a", add_special_tokens=False).ids:
        # a template adding <s> or </s>: the model was trained on rnnpipe's ids, which have none
        spec = json.loads(fast.to_str())
        spec["post_processor"] = None
        fast = FastTokenizer.from_str(json.dumps(spec))
        changed = True
    return (fast.to_str(pretty=True).encode("utf-8") if changed else t.tokenizer_json), special


def tokenizer_files(t: Tokenizer) -> dict[str, bytes]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` for ``t``."""
    if isinstance(t, HuggingFaceTokenizer):
        tokenizer_json, special = _pretrained_json(t)
    else:
        if isinstance(t, ByteTokenizer):
            fast, special = _bytes_json()
        elif isinstance(t, CharTokenizer):
            fast, special = _char_json(t)
        elif isinstance(t, SentencePieceTokenizer):
            fast, special = _spm_json(t)
        elif isinstance(t, WordTokenizer):
            fast, special = _word_json(t)
        else:
            raise TypeError(f"no Hugging Face tokenizer for {type(t).__name__}")
        for content in special.values():
            fast.add_special_tokens([content])  # already in the vocabulary: this marks them special
        tokenizer_json = fast.to_str(pretty=True).encode("utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 30,  # a recurrent model has no context limit of its own
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        # "<|endoftext|>" or "</s>" typed in text is text, as for rnnpipe's tokenizers
        "split_special_tokens": True,
        "rnnpipe_kind": t.kind,
        **special,
    }
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": (json.dumps(config, indent=1, ensure_ascii=False) + "\n").encode("utf-8"),
        "special_tokens_map.json": (json.dumps(special, indent=1, ensure_ascii=False) + "\n").encode("utf-8"),
    }
