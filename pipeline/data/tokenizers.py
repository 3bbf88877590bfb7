"""Tokenizers: bytes, char and sentencepiece, with exact byte counts per token (pretrained
Hugging Face tokenizers, ``kind=huggingface``, are in :mod:`rnnpipe.pipeline.data.hf_tokenizer`, the
word vocabulary, ``kind=word``, in :mod:`rnnpipe.pipeline.data.word_tokenizer`).

``encode`` returns the token ids (1-D int64, what a model reads); ``encode_with_lengths`` also
returns, per token, the number of UTF-8 bytes of text it stands for (0 for the end-of-document
id), so a shard's byte count is exact for any tokenizer and later stages report bits per byte.
``decode(encode(x)) == x`` for every tokenizer: char and bytes by construction, sentencepiece
because it is trained with identity normalization, no dummy prefix, no whitespace folding and
byte fallback (a literal U+2581 is the one exception: sentencepiece uses that symbol for the
space). The word tokenizer is the other exception: it gives back each line's words joined by
single spaces, and ``<unk>`` for a word outside its vocabulary (its byte counts are exact all the
same).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import sentencepiece as spm

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.data.tokenizer_base import RoundTripError as RoundTripError  # (re-exported)
from rnnpipe.pipeline.data.tokenizer_base import Tokenizer, _utf8_lengths
from rnnpipe.pipeline.data.word_tokenizer import WORD_VOCAB_FILE as WORD_VOCAB_FILE  # (re-exported)
from rnnpipe.pipeline.data.word_tokenizer import WordTokenizer
from rnnpipe.pipeline.errors import PipelineError

SPM_MODEL_FILE = "tokenizer/spm.model"
CHAR_VOCAB_FILE = "tokenizer/char_vocab.json"


class ByteTokenizer(Tokenizer):
    """Token = byte, vocab 256, no end-of-document id (the enwik8 convention)."""

    kind = "bytes"
    vocab_size = 256

    def encode_with_lengths(self, text):
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8), None

    def decode(self, ids):
        return np.asarray(ids, dtype=np.int64).astype(np.uint8).tobytes()


class CharTokenizer(Tokenizer):
    """Token = Unicode character of the training split's alphabet (sorted by code point).

    ``unk`` is added only when valid/test hold characters that train does not, ``eod`` only when
    the corpus has more than one document, so tinyshakespeare gets exactly its 65 symbols.
    """

    kind = "char"

    def __init__(self, symbols: list[str], eod: bool = False, unk: bool = False):
        self.symbols = sorted(symbols)
        self._codepoints = np.array([ord(c) for c in self.symbols], dtype=np.int64)
        n = len(self.symbols)
        self.eod_id = n if eod else None
        self.unk_id = n + int(eod) if unk else None
        self.vocab_size = n + int(eod) + int(unk)
        # Decoding table: symbol bytes per id; special ids decode to nothing (unk to U+FFFD).
        self._pieces = (
            [c.encode("utf-8") for c in self.symbols] + [b""] * int(eod) + ["\ufffd".encode()] * int(unk)
        )

    def encode_with_lengths(self, text):
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codepoints, cps)
        ids = np.minimum(ids, len(self.symbols) - 1)
        unknown = self._codepoints[ids] != cps
        if unknown.any():
            if self.unk_id is None:
                bad = chr(int(cps[np.argmax(unknown)]))
                raise PipelineError(f"character {bad!r} (U+{ord(bad):04X}) is not in the char vocabulary")
            ids[unknown] = self.unk_id
        return ids, _utf8_lengths(cps)

    def decode(self, ids):
        return b"".join(self._pieces[int(i)] for i in ids)

    def special_ids(self):
        return {"eod": self.eod_id, "unk": self.unk_id}

    def to_json(self) -> str:
        return json.dumps(
            {
                "symbols": "".join(self.symbols),
                "eod": self.eod_id is not None,
                "unk": self.unk_id is not None,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str) -> CharTokenizer:
        d = json.loads(text)
        return cls(list(d["symbols"]), eod=d["eod"], unk=d["unk"])

    def files(self):
        return {CHAR_VOCAB_FILE: self.to_json().encode("utf-8")}


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model; the end-of-document id is its ``</s>``."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.sp.get_piece_size()
        eos = self.sp.eos_id()
        self.eod_id = eos if eos >= 0 else None
        lengths = np.zeros(self.vocab_size, dtype=np.uint8)
        for i in range(self.vocab_size):
            if self.sp.is_byte(i):
                lengths[i] = 1
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                lengths[i] = 0
            else:
                lengths[i] = len(self.sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self._lengths = lengths

    def encode(self, text):
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        # The ids alone: no byte counts, so no second (proto) pass where the fast count is off.
        return np.asarray(self.sp.encode(text), dtype=np.int64)

    def encode_with_lengths(self, text):
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        ids = np.asarray(self.sp.encode(text), dtype=np.int64)
        lengths = self._lengths[ids]
        if int(lengths.sum(dtype=np.int64)) != len(text.encode("utf-8")):
            # A literal U+2581 or an unknown piece: take exact spans from sentencepiece's proto.
            proto = self.sp.encode(text, out_type="proto")
            lengths = np.array([p.end - p.begin for p in proto.pieces], dtype=np.int64).astype(np.uint8)
        return ids, lengths

    def decode(self, ids):
        ids = [int(i) for i in ids if int(i) != self.eod_id]
        return self.sp.decode(ids).encode("utf-8")

    def special_ids(self):
        return {"eod": self.eod_id, "unk": self.sp.unk_id()}

    def files(self):
        return {SPM_MODEL_FILE: self.model_proto}


def train_sentencepiece(
    sentences: Iterable[str],
    *,
    vocab_size: int,
    model_type: str,
    byte_fallback: bool,
    character_coverage: float,
    threads: int,
) -> bytes:
    """Train a sentencepiece model on ``sentences`` (one line each); returns the model file's bytes.

    Deterministic for the same sentences and ``threads``. Raises :class:`PipelineError` where the
    sample is too small for ``vocab_size``.
    """
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=out,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=0,
            bos_id=-1,
            eos_id=1,
            pad_id=-1,
            unk_surface="\ufffd",
            max_sentence_length=1 << 16,
            input_sentence_size=0,
            num_threads=threads,
            minloglevel=2,
            hard_vocab_limit=True,
        )
    except RuntimeError as e:
        raise PipelineError(
            f"sentencepiece training failed: {e} (try a smaller tokenizer.vocab_size "
            "or a larger tokenizer.train_sample_mb)"
        ) from e
    return out.getvalue()


def tokenizer_from_manifest(manifest: dict[str, Any], read_file: Callable[[str], bytes]) -> Tokenizer:
    """The tokenizer a dataset's (or an export's) manifest describes; ``read_file(relpath) -> bytes``
    reads its files. ``tokenizer.model_file`` must be a relative path inside the directory the
    manifest describes (no absolute path, no ``..``): :class:`PipelineError` otherwise, before
    ``read_file`` sees it."""
    # manifest.py imports this module: its path rule is imported here, when it is needed.

    t = manifest.get("tokenizer")
    if not isinstance(t, dict) or not isinstance(t.get("kind"), str):
        raise PipelineError(f"the manifest's tokenizer is {t!r:.80}: expected an object with a kind")
    if t["kind"] == "bytes":
        return ByteTokenizer()
    if t["kind"] not in ("char", "sentencepiece", "huggingface", "word"):
        raise PipelineError(f"unknown tokenizer kind {t['kind']!r} in manifest")
    rel = t.get("model_file")
    problem = fsio.path_problem(rel)
    if problem:
        raise PipelineError(
            f"tokenizer.model_file={rel!r} {problem}: it must be a relative path inside the dataset"
        )
    if t["kind"] == "char":
        return CharTokenizer.from_json(read_file(rel).decode("utf-8"))
    if t["kind"] == "word":
        return _word_from_manifest(t, read_file(rel))
    if t["kind"] == "huggingface":
        return _hf_from_manifest(t, read_file(rel))
    return SentencePieceTokenizer(read_file(rel))


def _hf_from_manifest(t: dict[str, Any], data: bytes) -> Tokenizer:
    """A ``huggingface`` tokenizer from its stored ``tokenizer.json`` and the entry's eos token,
    checked against the entry's vocabulary size and end-of-document id."""
    from rnnpipe.pipeline.data.hf_tokenizer import HuggingFaceTokenizer

    eos = t.get("eos_token")
    if eos is not None and not isinstance(eos, str):
        raise PipelineError(f"the manifest's tokenizer.eos_token is {eos!r:.60}: expected a string or null")
    tok = HuggingFaceTokenizer(data, eos)
    eod = (t.get("special_ids") or {}).get("eod", tok.eod_id)
    if tok.vocab_size != t["vocab_size"] or eod != tok.eod_id:
        raise PipelineError(
            f"the tokenizer file {t.get('model_file')} has {tok.vocab_size} ids and eod {tok.eod_id}, "
            f"the manifest says {t['vocab_size']} and {eod}"
        )
    return tok


def _word_from_manifest(t: dict[str, Any], data: bytes) -> Tokenizer:
    """A ``word`` tokenizer from its stored vocabulary, checked against the entry's size."""
    tok = WordTokenizer.from_json(data.decode("utf-8"))
    if tok.vocab_size != t["vocab_size"]:
        raise PipelineError(
            f"the word vocabulary {t.get('model_file')} has {tok.vocab_size} ids, "
            f"the manifest says {t['vocab_size']}"
        )
    return tok


def load_tokenizer_file(kind: str, data: bytes) -> Tokenizer:
    """A char or word vocabulary (JSON) or sentencepiece model given by ``tokenizer.model``."""
    if kind == "word":
        return WordTokenizer.from_json(data.decode("utf-8", "replace"))
    if kind == "char":
        try:
            return CharTokenizer.from_json(data.decode("utf-8"))
        except (ValueError, KeyError) as e:
            raise PipelineError(f"tokenizer.model is not a char vocabulary JSON file: {e}") from e
    try:
        return SentencePieceTokenizer(data)
    except RuntimeError as e:
        raise PipelineError(f"tokenizer.model is not a sentencepiece model: {e}") from e
