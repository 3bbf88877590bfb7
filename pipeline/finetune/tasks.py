"""Task readers and encoding: GLUE-style TSV, CoNLL-2003 columns and word-level LM files (PTB).

Every reader takes a path or URL (fsspec; .gz/.bz2 by extension) and fails on malformed input with
the file and line number. Text is tokenized with the pretrained model's tokenizer; a word's label
goes to the token that holds the word's first byte (exact for bytes, char and sentencepiece
tokenizers, because they report the UTF-8 bytes of every token).
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import numpy as np

from pipeline.data.tokenizers import Tokenizer
from pipeline.errors import PipelineError


def _lines(path: str) -> list[str]:
    try:
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer", newline="\n") as f:
            return f.read().splitlines()
    except FileNotFoundError as e:
        raise PipelineError(f"{path}: no such file") from e
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text ({e})") from e


# ---------------------------------------------------------------------------------------- readers


def read_tsv(
    path: str, text_column: str, label_column: str, limit: int = 0
) -> tuple[list[str], list[str] | None]:
    """(texts, labels) of a GLUE-style TSV with a header row; labels None when the file has no
    ``label_column`` (GLUE's unlabelled test files). The first ``limit`` rows when limit > 0."""
    lines = _lines(path)
    if not lines:
        raise PipelineError(f"{path}: empty file (expected a header row)")
    header = lines[0].split("\t")
    if text_column not in header:
        raise PipelineError(f"{path}: no column {text_column!r} in the header {header}")
    ti = header.index(text_column)
    li = header.index(label_column) if label_column in header else None
    texts: list[str] = []
    labels: list[str] = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise PipelineError(
                f"{path}:{n}: {len(fields)} tab-separated fields, the header has {len(header)}"
            )
        texts.append(fields[ti].strip())
        if li is not None:
            if not fields[li].strip():
                raise PipelineError(f"{path}:{n}: empty {label_column!r}")
            labels.append(fields[li].strip())
        if limit and len(texts) == limit:
            break
    return texts, (labels if li is not None else None)


def read_conll(path: str, tag_column: int = -1, limit: int = 0) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL file as (words, tags): whitespace-separated columns, the word first,
    blank lines between sentences, ``-DOCSTART-`` lines skipped. Tags are returned as written."""
    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    width = 0
    for n, line in enumerate([*_lines(path), ""], start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
                words, tags = [], []
                if limit and len(sentences) == limit:
                    break
            continue
        width = width or len(fields)
        if len(fields) < 2 or len(fields) != width:
            raise PipelineError(f"{path}:{n}: {len(fields)} column(s), expected {width} (word ... tag)")
        tag = fields[tag_column]
        if tag != "O" and not (len(tag) > 2 and tag[0] in "BI" and tag[1] == "-"):
            raise PipelineError(f"{path}:{n}: tag {tag!r} is not O, B-TYPE or I-TYPE")
        words.append(fields[0])
        tags.append(tag)
    return sentences


def to_iob2(tags: list[str]) -> list[str]:
    """IOB1 or IOB2 tags as IOB2: an I-X that starts a chunk (after O or another type) becomes B-X.
    Both schemes mark the same chunks, so conlleval scores them the same."""
    out = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def read_lm_lines(path: str, limit: int = 0) -> list[str]:
    """The lines of a word-level LM file (PTB: one sentence per line, ``<unk>`` and ``N`` as written)."""
    lines = _lines(path)
    if not any(line.strip() for line in lines):
        raise PipelineError(f"{path}: no text")
    return lines[:limit] if limit else lines


# ---------------------------------------------------------------------------------------- encoding


def _encode(tok: Tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    ids, nbytes = tok.encode_with_lengths(text)
    if nbytes is None:
        nbytes = np.ones(len(ids), dtype=np.int64)
    return np.asarray(ids, dtype=np.int64), np.asarray(nbytes, dtype=np.int64)


def encode_text(tok: Tokenizer, text: str, max_len: int) -> np.ndarray:
    """Token ids [n ≤ max_len] of ``text`` (its first max_len tokens); at least one token."""
    ids, _ = _encode(tok, text if text else " ")
    return ids[:max_len]


def encode_words(tok: Tokenizer, words: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n ≤ max_len], first [w]): the words joined by spaces, and for each word the index of
    the token holding its first byte. Words past ``max_len`` tokens are cut off (w may be less
    than len(words))."""
    starts = []
    pos = 0
    for i, w in enumerate(words):
        pos += 1 if i else 0
        starts.append(pos)
        pos += len(w.encode("utf-8"))
    ids, nbytes = _encode(tok, " ".join(words))
    ends = np.cumsum(nbytes)
    first = np.searchsorted(ends, np.asarray(starts), side="right")
    keep = first < min(len(ids), max_len)
    return ids[:max_len], first[keep]


@dataclass
class LMText:
    """A word-level LM split as one token stream, with what per-word and per-byte metrics need."""

    ids: np.ndarray  # [n] the text, after one leading newline token that only starts the stream
    bytes: int  # UTF-8 bytes of the text (without the leading newline)
    words: int  # words plus one end-of-sentence per line (Mikolov's convention)


def encode_lm(tok: Tokenizer, lines: list[str]) -> LMText:
    """The lines as one stream ``"\\n" + line + "\\n" + ...``: every byte of the text is a target."""
    text = "".join(line + "\n" for line in lines)
    ids, _ = _encode(tok, "\n" + text)
    words = sum(len(line.split()) + 1 for line in lines)
    return LMText(ids, len(text.encode("utf-8")), words)


class ArrayReader:
    """A token array with the ``read(a, b)``/``tokens``/``bytes`` interface of the pretrain stage's
    split readers, so its stream batching and evaluation serve the LM task too."""

    def __init__(self, text: LMText):
        self.ids, self.tokens, self.bytes = text.ids, len(text.ids), text.bytes

    def read(self, a: int, b: int) -> np.ndarray:
        return self.ids[a:b]


def pad(seqs: list[np.ndarray], value: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids [B, T] right-padded with ``value``, lengths [B]) of sequences of ints."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    out = np.full((len(seqs), int(lengths.max())), value, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lengths
