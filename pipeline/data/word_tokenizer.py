"""The word tokenizer (``tokenizer.kind=word``): a vocabulary of the training split's words.

Text is read as lines of words. A *word* is a maximal run of non-whitespace characters
(whitespace: Unicode's White_Space property, the set Rust's ``char::is_whitespace`` and the
``tokenizers`` library use, so the export's ``tokenizer.json`` splits alike); each ``\\n`` is the
end-of-sentence token ``<eos>`` (one sentence per line, as in Mikolov's PTB). Ids::

    0 = <unk>, 1 = <eos>, 2.. = the words by descending training count (ties by code point),
    last = <eod> (only where a split holds more than one document, like the char tokenizer's)

Bytes per token: a token carries the UTF-8 bytes of its own text *and of the whitespace before
it* (a word its preceding spaces, ``<eos>`` the spaces or ``\\r`` before the newline and the
newline); whitespace after the last token goes to the last token. So the counts sum to the
text's bytes exactly, whatever its spacing, and bits per byte compare with the other kinds. (A
text that holds no word and no newline, e.g. only spaces, has no token and counts 0.)

Decoding rejoins the words with one space and ends each line at ``<eos>``; ``<unk>`` decodes as
the string ``<unk>``, ``<eod>`` to nothing (as if it were absent). ``decode(encode(x)) ==
canonical(x)`` for a text whose words are all in the vocabulary (:func:`canonical`: single
spaces, no space at a line's start or end, ``\\r`` dropped, lowercased with ``lowercase``), and
``== x`` when ``x`` is already canonical; other words come back as ``<unk>``. The one special
name that text can hold is ``<unk>``, the unknown word (PTB writes it); ``<eos>`` or ``<eod>``
typed in text are words like any other.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from rnnpipe.pipeline.data.tokenizer_base import Tokenizer
from rnnpipe.pipeline.errors import PipelineError

WORD_VOCAB_FILE = "tokenizer/word_vocab.json"
UNK, EOS, EOD = "<unk>", "<eos>", "<eod>"
# Unicode White_Space except the newline (which is <eos>): exactly Rust's char::is_whitespace.
SPACE = "\t\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# (whitespace before it, the token: a newline or a word)
_TOKEN = re.compile(f"([{SPACE}]*)(\n|[^{SPACE}\n]+)")
_WORD = re.compile(f"[^{SPACE}\n]+")
# A token standing for more bytes than this does not fit the work dir's byte counts (uint16).
MAX_TOKEN_BYTES = 0xFFFF


def canonical(text: str, lowercase: bool = False) -> str:
    """``text`` as the word tokenizer gives it back: each line's words joined by one space, lines
    ending at each newline (``\\r`` and other spacing dropped), lowercased with ``lowercase``."""
    lines = text.split("\n")
    out = "\n".join(" ".join(_WORD.findall(line)) for line in lines)
    return out.lower() if lowercase else out


def iter_words(text: str, lowercase: bool = False) -> Iterable[str]:
    """The words of ``text`` (no ``<eos>``), lowercased with ``lowercase``."""
    words = _WORD.findall(text)
    return [w.lower() for w in words] if lowercase else words


class WordTokenizer(Tokenizer):
    """Token = word of a fixed vocabulary (see the module docstring for ids, bytes and decoding).

    ``words``: the vocabulary's words in id order from id 2 (no special names among them).
    """

    kind = "word"
    unk_id = 0
    eos_id = 1

    def __init__(self, words: list[str], eod: bool = False, lowercase: bool = False):
        for w in words:
            if not w or _WORD.fullmatch(w) is None or w == UNK:
                raise PipelineError(f"word vocabulary: {w!r} is not a word (empty, whitespace or <unk>)")
        if len(set(words)) != len(words):
            raise PipelineError("word vocabulary: a word appears twice")
        self.words = list(words)
        self.lowercase = lowercase
        n = 2 + len(self.words)
        self.eod_id = n if eod else None
        self.vocab_size = n + int(eod)
        # id -> the string it stands for in the vocabulary (the specials by their names)
        self.tokens = [UNK, EOS, *self.words] + ([EOD] if eod else [])
        # what encoding looks up: the words, <unk> and the newline (the <eos> and <eod> names
        # are words of the text, unknown unless the vocabulary holds them as words)
        self._ids = {w: i + 2 for i, w in enumerate(self.words)}
        self._ids[UNK] = self.unk_id
        self._ids["\n"] = self.eos_id

    def encode_with_lengths(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [n], UTF-8 bytes per token uint16 [n]), the counts summing to the text's
        bytes (whitespace before a token is its own, after the last one the last token's)."""
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8")
        parts = _TOKEN.findall(text)
        lookup, unk = self._ids, self.unk_id
        if self.lowercase:
            ids = [lookup.get(tok.lower(), unk) for _, tok in parts]
        else:
            ids = [lookup.get(tok, unk) for _, tok in parts]
        if text.isascii():
            total = len(text)
            lengths = np.fromiter((len(s) + len(t) for s, t in parts), dtype=np.int64, count=len(parts))
        else:
            total = len(text.encode("utf-8"))
            lengths = np.fromiter(
                (len(s.encode("utf-8")) + len(t.encode("utf-8")) for s, t in parts),
                dtype=np.int64,
                count=len(parts),
            )
        if len(parts):
            lengths[-1] += total - int(lengths.sum())  # the spaces after the last token
            if int(lengths.max()) > MAX_TOKEN_BYTES:
                i = int(np.argmax(lengths))
                raise PipelineError(
                    f"word token {i} ({parts[i][1][:40]!r}) stands for {int(lengths[i])} bytes "
                    f"(with the whitespace before it), more than {MAX_TOKEN_BYTES}"
                )
        return np.asarray(ids, dtype=np.int64), lengths.astype(np.uint16)

    def decode(self, ids: Iterable[int] | np.ndarray) -> bytes:
        """The canonical text ``ids`` stand for: words joined by one space, ``<eos>`` a newline,
        ``<unk>`` the string ``<unk>``, ``<eod>`` nothing (the words around it are spaced as if it
        were absent, as the export's tokenizer.json decodes it without special tokens)."""
        out: list[str] = []
        spaced = False  # a word came last on this line: the next one needs a space
        tokens, eos, eod = self.tokens, self.eos_id, self.eod_id
        for i in np.asarray(ids, dtype=np.int64).tolist():
            if i == eos:
                out.append("\n")
                spaced = False
            elif i != eod:
                out.append(" " + tokens[i] if spaced else tokens[i])
                spaced = True
        return "".join(out).encode("utf-8")

    def special_ids(self) -> dict[str, int | None]:
        return {"eod": self.eod_id, "unk": self.unk_id, "eos": self.eos_id}

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": "word",
                "lowercase": self.lowercase,
                "eod": self.eod_id is not None,
                "specials": {"unk": UNK, "eos": EOS, "eod": EOD},
                "words": self.words,
            },
            ensure_ascii=False,
            indent=0,
        )

    @classmethod
    def from_json(cls, text: str) -> WordTokenizer:
        """The tokenizer a :meth:`to_json` file describes; :class:`PipelineError` if it is not one."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("kind") != "word" or not isinstance(d["words"], list):
                raise KeyError("kind word and a words list")
            return cls([str(w) for w in d["words"]], eod=bool(d["eod"]), lowercase=bool(d["lowercase"]))
        except (ValueError, KeyError, TypeError) as e:
            raise PipelineError(
                f"not a word vocabulary file ({WORD_VOCAB_FILE} of a prepare run): {e}"
            ) from e

    def files(self) -> dict[str, bytes]:
        return {WORD_VOCAB_FILE: self.to_json().encode("utf-8")}


def fit_word_tokenizer(
    texts: Iterable[str],
    *,
    max_size: int = 0,
    min_count: int = 1,
    lowercase: bool = False,
    eod: bool = False,
) -> tuple[WordTokenizer, dict[str, Any]]:
    """The vocabulary of ``texts`` (the training split's documents) and what was cut.

    Words seen at least ``min_count`` times, the most frequent first (ties by code point), at
    most ``max_size`` ids in all, specials included (0 = no limit). Returns (tokenizer, stats:
    ``types`` distinct words seen, ``kept`` of them, ``tokens`` words read, ``unknown`` of those
    that encode as ``<unk>``, a literal ``<unk>`` included)."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(iter_words(text, lowercase))
    if not counts:
        raise PipelineError("the training split holds no word: cannot build a word vocabulary")
    n_special = 2 + int(eod)
    if max_size and max_size <= n_special:
        raise PipelineError(f"tokenizer.max_size={max_size} leaves no room for a word ({n_special} specials)")
    ranked = sorted(((w, c) for w, c in counts.items() if c >= min_count and w != UNK), key=_rank)
    if max_size:
        ranked = ranked[: max_size - n_special]
    tok = WordTokenizer([w for w, _ in ranked], eod=eod, lowercase=lowercase)
    stats = {
        "types": len(counts),
        "kept": len(ranked),
        "tokens": sum(counts.values()),
        "unknown": sum(counts.values()) - sum(c for _, c in ranked),
    }
    return tok, stats


def _rank(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]
