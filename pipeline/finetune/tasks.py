"""Task readers and encoding: GLUE-style TSV, CoNLL-2003 columns and word-level LM files (PTB).

Every reader takes a path or URL (fsspec; .gz/.bz2 by extension) and fails on malformed input with
the file and line number. Text is tokenized with the pretrained model's tokenizer; a word's label
goes to the token that holds the word's first byte (exact for bytes, char and sentencepiece
tokenizers, because they report the UTF-8 bytes of every token). A sentence pair is its two
segments encoded alone with the tokenizer's :class:`Separator` between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np

from rnnpipe.pipeline.data.tokenizers import Tokenizer
from rnnpipe.pipeline.errors import PipelineError


def _lines(path: str) -> list[str]:
    try:
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer", newline="\n") as f:
            return f.read().splitlines()
    except FileNotFoundError as e:
        raise PipelineError(f"{path}: no such file") from e
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text ({e})") from e


# ---------------------------------------------------------------------------------------- readers


def read_table(
    path: str,
    wanted: Sequence[str],
    columns: Sequence[str] = (),
    limit: int = 0,
    required: Sequence[str] = (),
    nonempty: Sequence[str] = (),
) -> tuple[dict[str, list[str]], list[int]]:
    """({column: stripped values} for each of ``wanted`` the file has, the line number of each row)
    of a tab-separated file: its columns named by its header row (a leading UTF-8 byte-order mark
    is dropped, as in GLUE's MRPC), or by ``columns`` for a file without one (GLUE's CoLA). Blank
    lines are skipped; every other row must have as many fields as there are columns. The
    ``required`` columns must be in the file, the ``nonempty`` ones (where the file has them) must
    hold a value in every row. The first ``limit`` rows when > 0."""
    lines = _lines(path)
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    if columns:
        header, first = list(columns), 1
        width_says = f"expected {len(header)} ({', '.join(header)})"
    else:
        if not lines:
            raise PipelineError(f"{path}: empty file (expected a header row)")
        header, first = lines[0].split("\t"), 2
        width_says = f"the header has {len(header)}"
    missing = [name for name in required if name not in header]
    if missing:
        raise PipelineError(f"{path}: no column {missing[0]!r} in the header {header}")
    index = {name: header.index(name) for name in wanted if name in header}
    out: dict[str, list[str]] = {name: [] for name in index}
    numbers: list[int] = []
    for n, line in enumerate(lines[first - 1 :], start=first):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise PipelineError(f"{path}:{n}: {len(fields)} tab-separated fields, {width_says}")
        for name, i in index.items():
            value = fields[i].strip()
            if not value and name in nonempty:
                raise PipelineError(f"{path}:{n}: empty {name!r}")
            out[name].append(value)
        numbers.append(n)
        if limit and len(numbers) == limit:
            break
    return out, numbers


def read_tsv(
    path: str, text_column: str, label_column: str, limit: int = 0
) -> tuple[list[str], list[str] | None]:
    """(texts, labels) of a GLUE-style TSV with a header row; labels None when the file has no
    ``label_column`` (GLUE's unlabelled test files). The first ``limit`` rows when limit > 0."""
    wanted = [text_column, label_column]
    cols, _ = read_table(path, wanted, limit=limit, required=[text_column], nonempty=[label_column])
    return cols[text_column], cols.get(label_column)


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


@dataclass(frozen=True)
class Separator:
    """What goes between the two segments of a sentence pair.

    ``ids``: the tokenizer's end-of-document id where it has one (sentencepiece's ``</s>``, a
    char vocabulary's eod, a Hugging Face tokenizer's eos, a word vocabulary's end of sentence):
    no text encodes to it, and the backbone saw it between documents in pretraining. Otherwise
    (bytes; char or huggingface without one) the tokens of a newline, with every newline inside
    the segments turned into a space (``newline_in_text``), so that the separator is again the one
    newline of the input."""

    ids: np.ndarray
    newline_in_text: bool  # True: the segments' own newlines become spaces
    what: str  # "eod id 2", "newline (byte 10)": for logs and errors


def separator(tok: Tokenizer) -> Separator:
    """The :class:`Separator` of sentence pairs for ``tok`` (see there)."""
    if tok.eod_id is not None:
        return Separator(np.array([tok.eod_id], dtype=np.int64), False, f"eod id {tok.eod_id}")
    try:
        ids = np.asarray(tok.encode("\n"), dtype=np.int64)
    except PipelineError:  # a char vocabulary without a newline (and without unk)
        ids = np.zeros(0, dtype=np.int64)
    unk = tok.special_ids().get("unk")
    if not len(ids) or tok.decode(ids) != b"\n" or (unk is not None and unk in ids.tolist()):
        raise PipelineError(
            f"the {tok.kind} tokenizer has no end-of-document id and does not encode a newline "
            "as text of its own: it has no separator for sentence pairs (text_pair_column)"
        )
    return Separator(ids, True, f"newline (id{'s' if len(ids) > 1 else ''} {' '.join(map(str, ids))})")


def encode_pair(tok: Tokenizer, first: str, second: str, max_len: int, sep: Separator) -> np.ndarray:
    """Token ids [n ≤ max_len] of ``first``, ``sep``, ``second``; each segment encoded alone (at
    least one token each). Too long: the longer segment is cut first (its end), so each keeps at
    least half of what is left after the separator when both are long."""
    a, b = first, second
    if sep.newline_in_text:
        a, b = a.replace("\n", " "), b.replace("\n", " ")
    ids_a, _ = _encode(tok, a if a else " ")
    ids_b, _ = _encode(tok, b if b else " ")
    budget = max(0, max_len - len(sep.ids))
    if len(ids_a) + len(ids_b) > budget:
        keep_a = min(len(ids_a), max(budget // 2, budget - len(ids_b)))
        ids_a, ids_b = ids_a[:keep_a], ids_b[: budget - keep_a]
    return np.concatenate([ids_a, sep.ids, ids_b])[:max_len]


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
