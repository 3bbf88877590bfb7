"""Tokenizers: exact round trips and exact byte counts per token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnpipe.pipeline.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    train_sentencepiece,
)
from rnnpipe.pipeline.errors import PipelineError

SAMPLES = ["plain ascii", "  leading and trailing  ", "naïve café ☃ 漢字 😀", "tabs\tand\nnewlines\n\n", ""]


def test_bytes_round_trip_and_counts():
    tok = ByteTokenizer()
    for s in SAMPLES:
        ids, nbytes = tok.encode_with_lengths(s)
        assert nbytes is None and len(ids) == len(s.encode()) and tok.decode(ids) == s.encode()
    assert tok.decode(tok.encode(b"\xff\x00raw")) == b"\xff\x00raw"


def test_char_utf8_lengths_specials_and_unknowns():
    tok = CharTokenizer(list("abc é漢😀"), eod=True, unk=True)
    assert len(tok.symbols) == 7 and tok.vocab_size == 9 and tok.eod_id == 7 and tok.unk_id == 8
    ids, nbytes = tok.encode_with_lengths("a é漢😀z")
    assert nbytes.tolist() == [1, 1, 2, 3, 4, 1]
    assert ids[-1] == tok.unk_id and tok.decode(ids[:-1]) == "a é漢😀".encode()
    with pytest.raises(PipelineError, match="not in the char vocabulary"):
        CharTokenizer(list("ab")).encode("abc")
    assert CharTokenizer.from_json(tok.to_json()).encode("abc").tolist() == tok.encode("abc").tolist()


@pytest.fixture(scope="module")
def spm_tokenizer(shakespeare):
    lines = [line for line in shakespeare.read_text().splitlines() if line]
    model = train_sentencepiece(
        lines, vocab_size=500, model_type="bpe", byte_fallback=True, character_coverage=1.0, threads=2
    )
    again = train_sentencepiece(
        lines, vocab_size=500, model_type="bpe", byte_fallback=True, character_coverage=1.0, threads=2
    )
    assert model == again  # deterministic for the same sample and threads
    return SentencePieceTokenizer(model)


def test_sentencepiece_round_trips_exactly(spm_tokenizer):
    for s in [*SAMPLES, "KING RICHARD III:\nNow is the winter  of our discontent"]:
        ids, nbytes = spm_tokenizer.encode_with_lengths(s)
        assert spm_tokenizer.decode(ids).decode() == s
        assert int(nbytes.sum()) == len(s.encode())
    assert spm_tokenizer.eod_id == 1 and spm_tokenizer.vocab_size == 500


def test_sentencepiece_byte_counts_with_its_space_symbol(spm_tokenizer):
    # U+2581 is sentencepiece's space: it decodes to " ", but its bytes are counted exactly anyway.
    s = "a\u2581b"
    _, nbytes = spm_tokenizer.encode_with_lengths(s)
    assert int(nbytes.sum()) == len(s.encode()) == 5
    assert np.all(nbytes >= 0)


@pytest.mark.parametrize("kind", ["bytes", "char", "sentencepiece"])
def test_encode_is_one_int64_sequence_equal_to_the_ids_with_lengths(kind, request):
    # encode used to return (ids, lengths): torch.tensor([tok.encode(s)]) was then a 2-row batch.
    tok = {
        "bytes": ByteTokenizer,
        "char": lambda: CharTokenizer(list("abc é漢😀\u2581"), eod=True, unk=True),
        "sentencepiece": lambda: request.getfixturevalue("spm_tokenizer"),
    }[kind]()
    for s in ["abc é漢😀", "a\u2581b c", ""]:
        ids = tok.encode(s)
        assert isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype == np.int64, s
        assert ids.tolist() == tok.encode_with_lengths(s)[0].tolist(), s
        assert torch.tensor(ids)[None].shape == (1, len(ids))
