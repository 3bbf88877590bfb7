"""The prepare stage's tasks; each runs on any executor (a process here, an array task on Slurm).

- extract: read a unit's documents and store their text per split (only when a tokenizer must
  be fitted first: char, word or sentencepiece without ``tokenizer.model``);
- fit: build the char or word vocabulary or train sentencepiece on a sample of the training split
  (a pretrained ``huggingface`` tokenizer is loaded by the driver instead,
  :mod:`rnnpipe.pipeline.data.hf_tokenizer`);
- encode: tokenize a unit per split (from the extracted text, or straight from the source);
- pack: cut a split's token stream into samples and write one shard (and, in the work dir, where
  each sample's tokens sit in it: the driver joins these into the split's sample index).

Tasks write their files first and a small JSON marker last: a unit or shard is done exactly when
its marker exists, so a re-run after a kill redoes only what was not finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.data.config import PrepareConfig, TokenizerKind
from rnnpipe.pipeline.data.shards import sample_key, scan_offsets, shard_path, write_shard
from rnnpipe.pipeline.data.sources import Piece, Plan, iter_unit_pieces
from rnnpipe.pipeline.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    RoundTripError,
    SentencePieceTokenizer,
    Tokenizer,
    train_sentencepiece,
)
from rnnpipe.pipeline.data.word_tokenizer import WordTokenizer, fit_word_tokenizer
from rnnpipe.pipeline.errors import PipelineError

Report = Callable[[int], None]
DOC_START, DOC_END = 1, 2


def unit_dir(work: str, index: int) -> str:
    return fsio.join(work, "units", f"{index:06d}")


@functools.lru_cache(maxsize=4)
def load_plan(work: str) -> Plan:
    return Plan.from_json(fsio.read_text(fsio.join(work, "plan.json")))


@functools.lru_cache(maxsize=4)
def load_json(url: str) -> Any:
    return json.loads(fsio.read_text(url))


def _read_marker(url: str) -> dict[str, Any] | None:
    return json.loads(fsio.read_text(url)) if fsio.exists(url) else None


# ---------------------------------------------------------------------------------------- extract


@dataclass
class UnitTask:
    work: str
    unit: int
    cfg: PrepareConfig

    @property
    def label(self) -> str:
        plan = load_plan(self.work)
        u = plan.units[self.unit]
        where = plan.inputs[u.file if u.file >= 0 else u.segments[0].file].url
        return f"unit {self.unit} ({where})"


def extract_unit(task: UnitTask, report: Report) -> dict[str, Any]:
    """Store the unit's pieces as UTF-8 text per split; returns (and marks done with) its stats."""
    marker = fsio.join(unit_dir(task.work, task.unit), "extract.json")
    done = _read_marker(marker)
    if done is not None:
        return done
    plan = load_plan(task.work)
    stats: dict[str, Any] = {"source": {}, "splits": {}}
    texts: dict[str, Any] = {}
    pieces: dict[str, list[int]] = {}
    chars: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    try:
        for piece in iter_unit_pieces(plan, plan.units[task.unit], task.cfg, stats["source"], report):
            data = piece.data if isinstance(piece.data, str) else piece.data.decode("utf-8")
            if piece.split not in texts:
                texts[piece.split] = _open_write(task.work, task.unit, f"{piece.split}.text")
                pieces[piece.split], chars[piece.split], sizes[piece.split] = [], set(), 0
            blob = data.encode("utf-8")
            texts[piece.split].write(blob)
            sizes[piece.split] += len(blob)
            pieces[piece.split] += [sizes[piece.split], DOC_START * piece.doc_start + DOC_END * piece.doc_end]
            chars[piece.split].update(data)
    finally:
        for f in texts.values():
            f.close()
    for split, flat in pieces.items():
        _write_array(task.work, task.unit, f"{split}.pieces", np.asarray(flat, dtype=np.int64))
        flags = np.asarray(flat[1::2])
        stats["splits"][split] = {
            "bytes": sizes[split],
            "pieces": len(flat) // 2,
            "doc_ends": int(((flags & DOC_END) > 0).sum()),
            "chars": "".join(sorted(chars[split])),
        }
    fsio.write_text_atomic(marker, json.dumps(stats))
    return stats


def _open_write(work: str, unit: int, name: str):
    fs, path = fsio.filesystem(fsio.join(unit_dir(work, unit), name))
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    return fs.open(path, "wb")


def _write_array(work: str, unit: int, name: str, arr: np.ndarray) -> None:
    with _open_write(work, unit, name) as f:
        f.write(arr.tobytes())


def _read_array(url: str, dtype: Any, start: int = 0, count: int = -1) -> np.ndarray:
    item = np.dtype(dtype).itemsize
    fs, path = fsio.filesystem(url)
    with fs.open(path, "rb") as f:
        f.seek(start * item)
        data = f.read(-1 if count < 0 else count * item)
    arr = np.frombuffer(data, dtype=dtype)
    if count >= 0 and len(arr) != count:
        raise PipelineError(
            f"{url}: expected {count} values at {start}, found {len(arr)} (work dir damaged?)"
        )
    return arr


def iter_extracted(work: str, unit: int, split: str) -> Iterator[Piece]:
    """The pieces ``extract_unit`` stored for one split of a unit."""
    base = unit_dir(work, unit)
    if not fsio.exists(fsio.join(base, f"{split}.pieces")):
        return
    flat = _read_array(fsio.join(base, f"{split}.pieces"), np.int64)
    text = fsio.read_bytes(fsio.join(base, f"{split}.text"))
    start = 0
    for end, flags in zip(flat[0::2].tolist(), flat[1::2].tolist(), strict=True):
        yield Piece(split, text[start:end].decode("utf-8"), bool(flags & DOC_START), bool(flags & DOC_END))
        start = end


# -------------------------------------------------------------------------------------------- fit


@dataclass
class FitTask:
    work: str
    cfg: PrepareConfig
    unit_stats: list[dict[str, Any]]  # extract stats per unit

    label = "tokenizer"


def fit_tokenizer(task: FitTask, report: Report) -> dict[str, bytes]:
    """Fit the char or word vocabulary or sentencepiece model on the training split; returns its files."""
    cfg = task.cfg.tokenizer
    if cfg.kind is TokenizerKind.word:
        return _fit_words(task, report)
    if cfg.kind is TokenizerKind.char:
        train: set[str] = set()
        other: set[str] = set()
        doc_ends = 0
        for st in task.unit_stats:
            for split, s in st["splits"].items():
                (train if split == "train" else other).update(s["chars"])
                doc_ends += s["doc_ends"]
        if not train:
            raise PipelineError("the training split holds no text: cannot build a char vocabulary")
        return CharTokenizer(sorted(train), eod=doc_ends > 1, unk=bool(other - train)).files()
    total = sum(st["splits"].get("train", {}).get("bytes", 0) for st in task.unit_stats)
    rate = min(1.0, cfg.train_sample_mb * 1e6 / max(total, 1))
    salt = str(cfg.sample_seed).encode()

    def sentences() -> Iterator[str]:
        for unit in range(len(task.unit_stats)):
            for piece in iter_extracted(task.work, unit, "train"):
                report(len(piece.data))
                h = hashlib.blake2b(salt + piece.data.encode("utf-8"), digest_size=8).digest()
                if int.from_bytes(h, "big") / 2.0**64 >= rate:
                    continue
                for line in piece.data.split("\n"):
                    for k in range(0, len(line), 4096):  # sentencepiece skips over-long lines
                        if line[k : k + 4096].strip():
                            yield line[k : k + 4096]

    model = train_sentencepiece(
        sentences(),
        vocab_size=cfg.vocab_size,
        model_type=cfg.model_type.value,
        byte_fallback=cfg.byte_fallback,
        character_coverage=cfg.character_coverage,
        threads=cfg.train_threads,
    )
    return SentencePieceTokenizer(model).files()


def _fit_words(task: FitTask, report: Report) -> dict[str, bytes]:
    """The word vocabulary of the training split, with ``<eod>`` where a split holds more than one
    document (PTB's three files, one document each, get exactly <unk>, <eos> and the words)."""
    cfg = task.cfg.tokenizer
    ends: dict[str, int] = {}
    for st in task.unit_stats:
        for split, s in st["splits"].items():
            ends[split] = ends.get(split, 0) + s["doc_ends"]

    def texts() -> Iterator[str]:
        for unit in range(len(task.unit_stats)):
            for piece in iter_extracted(task.work, unit, "train"):
                report(len(piece.data))
                yield piece.data

    tok, _ = fit_word_tokenizer(
        texts(),
        max_size=cfg.max_size,
        min_count=cfg.min_count,
        lowercase=cfg.lowercase,
        eod=max(ends.values(), default=0) > 1,
    )
    return tok.files()


# ----------------------------------------------------------------------------------------- encode


@dataclass
class EncodeTask(UnitTask):
    tokenizer_files: dict[str, bytes] | None = None  # None: bytes
    dtype: str = "uint8"
    extracted: bool = False  # read the extract stage's text instead of the source
    eos_token: str | None = None  # huggingface: the token whose id ends a document


def make_tokenizer(
    kind: TokenizerKind, files: dict[str, bytes] | None, eos_token: str | None = None
) -> Tokenizer:
    """The tokenizer of ``kind`` from its files (None: bytes); ``eos_token`` for huggingface."""
    if kind is TokenizerKind.bytes or not files:
        return ByteTokenizer()
    ((name, data),) = files.items()
    if kind is TokenizerKind.huggingface:
        from rnnpipe.pipeline.data.hf_tokenizer import HuggingFaceTokenizer

        return HuggingFaceTokenizer(data, eos_token)
    if kind is TokenizerKind.word:
        return WordTokenizer.from_json(data.decode("utf-8"))
    return (
        CharTokenizer.from_json(data.decode("utf-8"))
        if name.endswith(".json")
        else SentencePieceTokenizer(data)
    )


def nbytes_dtype(kind: str) -> type[np.unsignedinteger]:
    """The dtype of a unit's per-token byte counts (``.nbytes``) for tokenizer ``kind``: uint16
    for a pretrained vocabulary and for words (a token may exceed 255 bytes: a long token, or a
    word with the whitespace before it); uint8 otherwise."""
    wide = (TokenizerKind.huggingface.value, TokenizerKind.word.value)
    return np.uint16 if kind in wide else np.uint8


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(
    kind: TokenizerKind, files: tuple[tuple[str, bytes], ...], eos_token: str | None = None
) -> Tokenizer:
    """One tokenizer per worker process, not one per task (loading sentencepiece takes time)."""
    return make_tokenizer(kind, dict(files) if files else None, eos_token)


def encode_unit(task: EncodeTask, report: Report) -> dict[str, Any]:
    """Tokenize a unit: per split ``.tokens`` (dtype), ``.nbytes`` (:func:`nbytes_dtype`),
    ``.docs`` (int64)."""
    marker = fsio.join(unit_dir(task.work, task.unit), "encode.json")
    done = _read_marker(marker)
    if done is not None:
        return done
    files = tuple(sorted((task.tokenizer_files or {}).items()))
    tok = _cached_tokenizer(task.cfg.tokenizer.kind, files, task.eos_token)
    nb_dtype = nbytes_dtype(tok.kind)
    plan = load_plan(task.work)
    source_stats: dict[str, int] = {}
    if task.extracted:
        extract = load_json(fsio.join(unit_dir(task.work, task.unit), "extract.json"))
        source_stats = extract["source"]
        pieces = (p for split in plan.splits for p in iter_extracted(task.work, task.unit, split))
    else:
        pieces = iter_unit_pieces(plan, plan.units[task.unit], task.cfg, source_stats, report)
    limit = np.iinfo(np.dtype(task.dtype)).max
    out: dict[str, dict[str, Any]] = {}
    handles: dict[str, dict[str, Any]] = {}
    try:
        for number, piece in enumerate(pieces):
            try:
                ids, nbytes = tok.encode_with_lengths(piece.data)
            except RoundTripError as e:
                raise _round_trip_error(task, piece, number, e) from None
            if task.extracted:
                report(len(piece.data))
            split = piece.split
            if split not in handles:
                names = ["tokens", "docs"] + ([] if tok.kind == "bytes" else ["nbytes"])
                handles[split] = {n: _open_write(task.work, task.unit, f"{split}.{n}") for n in names}
                out[split] = {"tokens": 0, "bytes": 0, "docs": 0}
            h, o = handles[split], out[split]
            if piece.doc_start:
                h["docs"].write(np.int64(o["tokens"]).tobytes())
                o["docs"] += 1
            if len(ids) and int(ids.max()) > limit:
                raise PipelineError(f"token id {int(ids.max())} does not fit {task.dtype}")
            eod = piece.doc_end and tok.eod_id is not None
            h["tokens"].write(ids.astype(task.dtype, copy=False).tobytes())
            if eod:
                h["tokens"].write(np.asarray([tok.eod_id], dtype=task.dtype).tobytes())
            if nbytes is not None:
                h["nbytes"].write(nbytes.astype(nb_dtype, copy=False).tobytes())
                if eod:
                    h["nbytes"].write(np.zeros(1, nb_dtype).tobytes())
            o["tokens"] += len(ids) + int(eod)
            o["bytes"] += len(ids) if nbytes is None else int(nbytes.sum(dtype=np.int64))
    finally:
        for h in handles.values():
            for f in h.values():
                f.close()
    result = {"splits": out, "source": source_stats}
    fsio.write_text_atomic(marker, json.dumps(result))
    return result


def _round_trip_error(task: EncodeTask, piece: Piece, number: int, e: RoundTripError) -> PipelineError:
    """The error for a document the tokenizer does not give back: which tokenizer, where, what."""
    head = piece.data[:60] if isinstance(piece.data, str) else piece.data[:60].decode("utf-8", "replace")
    return PipelineError(
        f"tokenizer.path={task.cfg.tokenizer.path} does not reproduce the text of {task.label}, "
        f"piece {number} ({piece.split} split, starting {head!r}): {e}. rnnpipe's shards decode "
        "to their source text exactly, so a tokenizer that normalizes text (case, Unicode "
        "forms, spaces) cannot make them; use a byte-level BPE such as GPT-2's, or "
        "tokenizer.kind=sentencepiece"
    )


# ------------------------------------------------------------------------------------------- pack


@dataclass
class PackTask:
    work: str
    split: str
    shard: int
    root: str
    expected: dict[str, Any] | None = None  # a shard record from an earlier manifest

    @property
    def label(self) -> str:
        return shard_path(self.split, self.shard)


def pack_layout(work: str) -> dict[str, Any]:
    return load_json(fsio.join(work, "layout.json"))


def _offsets_url(work: str, split: str, shard: int) -> str:
    return fsio.join(work, "shards", f"{split}-{shard:06d}.offsets")


def shard_offsets(work: str, root: str, split: str, shard: int) -> np.ndarray:
    """[samples, 2] int64: (byte offset of the tokens, tokens) of each sample of a shard, as its
    pack task recorded them; read from the shard's headers where the work dir has no record (a
    shard kept from an earlier run whose work dir is gone)."""
    url = _offsets_url(work, split, shard)
    if fsio.exists(url):
        return _read_array(url, np.int64).reshape(-1, 2)
    return np.asarray(scan_offsets(fsio.join(root, shard_path(split, shard))), np.int64).reshape(-1, 2)


def pack_shard(task: PackTask, report: Report) -> dict[str, Any]:
    """Write one shard of samples; skipped where an identical shard is already in place."""
    layout = pack_layout(task.work)
    rel = shard_path(task.split, task.shard)
    url = fsio.join(task.root, rel)
    marker = fsio.join(task.work, "shards", f"{task.split}-{task.shard:06d}.json")
    record = _read_marker(marker) or task.expected
    if (
        record is not None
        and fsio.exists(url)
        and fsio.size(url) == record["size"]
        and fsio.sha256_of(url)[0] == record["sha256"]
    ):
        return record
    split = layout["splits"][task.split]
    dtype, per_shard, n_tok = layout["dtype"], layout["samples_per_shard"], layout["sample_tokens"]
    first = task.shard * per_shard
    last = min(first + per_shard, split["samples"])
    units = split["units"]  # [unit index, tokens, docs] in stream order
    tok_before = np.concatenate([[0], np.cumsum([u[1] for u in units])])
    doc_before = np.concatenate([[0], np.cumsum([u[2] for u in units])])
    bytes_tokenizer = layout["tokenizer"] == "bytes"
    nb_dtype = nbytes_dtype(layout["tokenizer"])

    def samples() -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        for s in range(first, last):
            t0, t1 = s * n_tok, min((s + 1) * n_tok, split["tokens"])
            tokens, nbytes, starts = [], 0, []
            doc_first = doc_last = -1
            k = int(np.searchsorted(tok_before, t0, side="right")) - 1
            while k < len(units) and tok_before[k] < t1:
                u = units[k][0]
                lo, hi = max(t0, tok_before[k]) - tok_before[k], min(t1, tok_before[k + 1]) - tok_before[k]
                if hi > lo:
                    base = unit_dir(task.work, u)
                    tokens.append(
                        _read_array(fsio.join(base, f"{task.split}.tokens"), dtype, int(lo), int(hi - lo))
                    )
                    if not bytes_tokenizer:
                        nbytes += int(
                            _read_array(
                                fsio.join(base, f"{task.split}.nbytes"), nb_dtype, int(lo), int(hi - lo)
                            ).sum(dtype=np.int64)
                        )
                    docs = (
                        _read_array(fsio.join(base, f"{task.split}.docs"), np.int64)
                        if units[k][2]
                        else np.zeros(0, np.int64)
                    )
                    inside = docs[(docs >= lo) & (docs < hi)]
                    starts += (inside + (tok_before[k] - t0)).tolist()
                    before_lo = int(np.searchsorted(docs, lo, side="right"))
                    before_hi = int(np.searchsorted(docs, hi - 1, side="right"))
                    if doc_first < 0:
                        doc_first = int(doc_before[k]) + before_lo - 1
                    doc_last = int(doc_before[k]) + before_hi - 1
                k += 1
            arr = np.concatenate(tokens) if tokens else np.zeros(0, dtype)
            if bytes_tokenizer:
                nbytes = len(arr)
            meta = {
                "split": task.split,
                "index": s,
                "token_offset": t0,
                "tokens": len(arr),
                "bytes": nbytes,
                "doc_first": doc_first,
                "doc_last": doc_last,
                "doc_starts": [int(x) for x in starts],
            }
            report(arr.nbytes)
            yield sample_key(task.split, s), arr, meta

    metas: list[dict[str, Any]] = []

    def counted() -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        for item in samples():
            metas.append(item[2])
            yield item

    offsets: list[tuple[int, int]] = []
    sha, size = write_shard(url, counted(), offsets)
    # Before the marker: a shard marked done always has its offsets beside it.
    fsio.write_bytes_atomic(
        _offsets_url(task.work, task.split, task.shard), np.asarray(offsets, np.int64).tobytes()
    )
    record = {
        "path": rel,
        "samples": len(metas),
        "tokens": sum(m["tokens"] for m in metas),
        "bytes": sum(m["bytes"] for m in metas),
        "sha256": sha,
        "size": size,
    }
    fsio.write_text_atomic(marker, json.dumps(record))
    return record
