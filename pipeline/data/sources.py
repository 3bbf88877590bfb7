"""Sources: find the inputs, plan the work as independent units, and read a unit's documents.

A unit is one task of the extract stage (a Slurm array task): byte ranges of enwik8 or text files,
or a range of pages of a Wikipedia dump. Reading a unit yields :class:`Piece` s in stream order:
a piece is a document or, where a cut falls inside one (enwik8, a long text file), a part of it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.data.config import DocumentUnit, PrepareConfig, SourceKind, SplitMode, TokenizerKind
from rnnpipe.pipeline.data.wikipedia import DumpInfo, inspect_dump, iter_pages, link_drop_prefixes
from rnnpipe.pipeline.data.wikitext import wikitext_to_text
from rnnpipe.pipeline.errors import PipelineError

log = logging.getLogger(__name__)

ENWIK8_URL = "zip://enwik8::https://mattmahoney.net/dc/enwik8.zip"
ENWIK8_SIZE = 100_000_000
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"


@dataclass
class InputFile:
    url: str  # as the config gave it (after glob expansion)
    path: str  # what tasks read: the same, or a local copy of a remote or compressed input
    size: int = 0  # bytes of ``path`` used (after source.limit_bytes)
    sha256: str = ""  # of the whole of ``path``
    split: str = ""  # text with valid_paths/test_paths: the file's split
    jsonl: bool = False
    dump: dict[str, Any] | None = None  # wikipedia: DumpInfo fields


@dataclass
class Segment:
    file: int  # index into Plan.inputs
    start: int
    end: int
    split: str = ""  # "" = each document's split comes from a hash
    doc_start: bool = False  # a document starts at ``start``
    doc_end: bool = False  # the document ends at ``end``


@dataclass
class Unit:
    index: int
    weight: int  # bytes of input, for the progress bar
    segments: list[Segment] = field(default_factory=list)  # enwik8, text
    file: int = -1  # wikipedia: the dump
    dump_unit: int = -1  # wikipedia: the range within it

    @property
    def label(self) -> str:
        return f"unit {self.index}"


@dataclass
class Plan:
    kind: str
    split_mode: str  # contiguous | hash | explicit
    splits: list[str]  # the splits this dataset has, in order
    inputs: list[InputFile]
    units: list[Unit]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        inputs = [InputFile(**f) for f in d.pop("inputs")]
        units = [Unit(**{**u, "segments": [Segment(**s) for s in u["segments"]]}) for u in d.pop("units")]
        return cls(inputs=inputs, units=units, **d)


@dataclass
class Piece:
    split: str
    data: str | bytes
    doc_start: bool
    doc_end: bool


@dataclass
class InspectTask:
    """Planning work for one input file: checksum (and for dumps, the layout and unit starts)."""

    index: int
    path: str
    wikipedia: bool
    unit_bytes: int

    @property
    def label(self) -> str:
        return self.path


def inspect_input(task: InspectTask, report: Callable[[int], None]) -> dict[str, Any]:
    """sha256 and size of one input; for a dump also its :class:`DumpInfo`."""
    try:
        sha, size = fsio.sha256_of(task.path)
    except OSError as e:
        raise PipelineError(f"cannot read input {task.path}: {e}") from e
    if not task.wikipedia:
        report(size)
        return {"sha256": sha, "size": size}
    info = inspect_dump(task.path, task.unit_bytes, report)
    return {"sha256": sha, "size": size, "dump": asdict(info)}


def split_of(key: bytes, valid_fraction: float, test_fraction: float) -> str:
    """Deterministic split of a document from a hash of ``key`` (a title, or the text)."""
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") / 2.0**64
    if h < valid_fraction:
        return "valid"
    if h < valid_fraction + test_fraction:
        return "test"
    return "train"


# ----------------------------------------------------------------------------------------- planning


def make_units(cfg: PrepareConfig, files: list[InputFile]) -> tuple[list[Unit], list[str], str]:
    """Cut the inspected inputs into units; returns (units, splits, split mode)."""
    src = cfg.source
    splits = ["train"]
    explicit = bool(src.valid_paths or src.test_paths)
    for name, fraction, paths in (
        ("valid", src.valid_fraction, src.valid_paths),
        ("test", src.test_fraction, src.test_paths),
    ):
        if (explicit and paths) or (not explicit and fraction > 0):
            splits.append(name)
    unit_bytes = max(1, int(src.unit_mb * 1e6))
    if src.kind is SourceKind.wikipedia:
        units = []
        for i, f in enumerate(files):
            info = DumpInfo(**f.dump)
            starts = [*info.unit_starts, info.end]
            for k in range(len(info.unit_starts)):
                units.append(
                    Unit(index=len(units), weight=max(1, starts[k + 1] - starts[k]), file=i, dump_unit=k)
                )
        return units, splits, "hash"
    mode = src.split
    if mode is SplitMode.auto:
        mode = SplitMode.contiguous
    # Explicit split files are whole splits; with split=hash, documents are re-assigned by hash.
    mode_name = mode.value if not explicit else ("explicit" if mode is SplitMode.contiguous else "hash")
    whole_files = src.kind is SourceKind.text and src.document is DocumentUnit.file and mode is SplitMode.hash
    if src.kind is SourceKind.enwik8:
        align = "byte" if cfg.tokenizer.kind is TokenizerKind.bytes else "utf8"
    else:
        align = "line"
    segments: list[Segment] = []
    if mode_name in ("explicit", "hash"):
        for i, f in enumerate(files):
            split = f.split if mode_name == "explicit" else ""
            segments += _chop(f, i, 0, f.size, split, unit_bytes, align, whole_files, doc_start=True)
    else:
        segments = _contiguous_segments(files, cfg, unit_bytes, align)
    return _group(segments, unit_bytes), splits, mode_name


def _contiguous_segments(
    files: list[InputFile], cfg: PrepareConfig, unit_bytes: int, align: str
) -> list[Segment]:
    """Cut the concatenated inputs at the split fractions (enwik8: 90/5/5 of the bytes)."""
    total = sum(f.size for f in files)
    n_valid = round(total * cfg.source.valid_fraction)
    n_test = round(total * cfg.source.test_fraction)
    bounds = [
        ("train", 0, total - n_valid - n_test),
        ("valid", total - n_valid - n_test, total - n_test),
        ("test", total - n_test, total),
    ]
    # Global cut positions, moved forward to a line or character boundary in the file they fall in.
    cuts = []
    for g in (bounds[1][1], bounds[2][1]):
        cuts.append(_align_global(files, g, align))
    edges = [0, cuts[0], max(cuts[0], cuts[1]), total]
    out: list[Segment] = []
    offset = 0
    for i, f in enumerate(files):
        for s, (split, _, _) in enumerate(bounds):
            lo, hi = max(edges[s], offset), min(edges[s + 1], offset + f.size)
            if lo < hi:
                out += _chop(
                    f,
                    i,
                    lo - offset,
                    hi - offset,
                    split,
                    unit_bytes,
                    align,
                    False,
                    doc_start=(lo == edges[s]) or lo == offset,
                )
        offset += f.size
    return out


def _align_global(files: list[InputFile], g: int, align: str) -> int:
    offset = 0
    for f in files:
        if g < offset + f.size:
            return offset + align_cut(f, g - offset, align)
        offset += f.size
    return offset


def _chop(
    f: InputFile,
    index: int,
    start: int,
    end: int,
    split: str,
    unit_bytes: int,
    align: str,
    whole: bool,
    doc_start: bool,
) -> list[Segment]:
    """[start, end) of one file in segments of about ``unit_bytes``, cut at ``align`` boundaries."""
    cuts = [start]
    if not whole:
        while cuts[-1] + unit_bytes < end:
            nxt = align_cut(f, cuts[-1] + unit_bytes, align)
            if nxt >= end:
                break
            cuts.append(nxt)
    cuts.append(end)
    return [
        Segment(
            file=index,
            start=a,
            end=b,
            split=split,
            doc_start=doc_start if a == start else False,
            doc_end=(b == f.size),
        )
        for a, b in itertools.pairwise(cuts)
        if b > a
    ]


def align_cut(f: InputFile, pos: int, align: str) -> int:
    """``pos`` moved forward to a boundary: any byte, a UTF-8 character start, or a line start."""
    if align == "byte" or pos <= 0 or pos >= f.size:
        return min(max(pos, 0), f.size)
    with fsspec.open(f.path, "rb") as fh:
        if align == "utf8":
            fh.seek(pos)
            head = fh.read(4)
            k = 0
            while k < len(head) and 0x80 <= head[k] < 0xC0:
                k += 1
            return min(pos + k, f.size)
        fh.seek(pos - 1)
        at = pos - 1
        while at < f.size:
            block = fh.read(1 << 16)
            if not block:
                break
            nl = block.find(b"\n")
            if nl >= 0:
                return min(at + nl + 1, f.size)
            at += len(block)
    return f.size


def _group(segments: list[Segment], unit_bytes: int) -> list[Unit]:
    units: list[Unit] = []
    current: list[Segment] = []
    weight = 0
    for seg in segments:
        current.append(seg)
        weight += seg.end - seg.start
        if weight >= unit_bytes:
            units.append(Unit(index=len(units), weight=weight, segments=current))
            current, weight = [], 0
    if current:
        units.append(Unit(index=len(units), weight=max(weight, 1), segments=current))
    return units


# ---------------------------------------------------------------------------------- reading a unit


def iter_unit_pieces(
    plan: Plan, unit: Unit, cfg: PrepareConfig, stats: dict[str, int], report: Callable[[int], None]
) -> Iterator[Piece]:
    """The pieces (documents or parts of one) of ``unit`` in stream order.

    ``stats`` counts what was read (pages, articles, redirects, ...), for the manifest.
    """
    src = cfg.source
    vf, tf = src.valid_fraction, src.test_fraction
    if plan.kind == "wikipedia":
        f = plan.inputs[unit.file]
        info = DumpInfo(**f.dump)
        drop = link_drop_prefixes(info.namespaces)
        for page in iter_pages(f.path, info, unit.dump_unit, report):
            stats["pages"] = stats.get("pages", 0) + 1
            if page.namespace != 0:
                stats["other_namespaces"] = stats.get("other_namespaces", 0) + 1
                continue
            if page.redirect:
                stats["redirects"] = stats.get("redirects", 0) + 1
                continue
            stats["articles"] = stats.get("articles", 0) + 1
            text = page.title + "\n\n" + wikitext_to_text(page.text, drop)
            yield Piece(split_of(page.title.encode("utf-8"), vf, tf), text, True, True)
        return
    raw_bytes = plan.kind == "enwik8" and cfg.tokenizer.kind is TokenizerKind.bytes
    for seg in unit.segments:
        f = plan.inputs[seg.file]
        with fsspec.open(f.path, "rb") as fh:
            fh.seek(seg.start)
            data = fh.read(seg.end - seg.start)
        if len(data) != seg.end - seg.start:
            raise PipelineError(
                f"{f.url}: expected {seg.end - seg.start} bytes at offset {seg.start}, "
                f"read {len(data)} (did the file change since planning?)"
            )
        report(len(data))
        if plan.kind == "enwik8" or (not f.jsonl and src.document is DocumentUnit.file):
            if cfg.tokenizer.kind is TokenizerKind.bytes:
                text: str | bytes = data
            else:
                text = _decode(data, f, seg.start)
            split = seg.split or split_of(hashlib.sha256(data).digest(), vf, tf)
            yield Piece(split, text if not raw_bytes else data, seg.doc_start, seg.doc_end)
            continue
        yield from _line_pieces(data, f, seg, cfg)


def _line_pieces(data: bytes, f: InputFile, seg: Segment, cfg: PrepareConfig) -> Iterator[Piece]:
    src = cfg.source
    offset = seg.start
    for line in data.split(b"\n"):
        at, offset = offset, offset + len(line) + 1
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        if f.jsonl:
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise PipelineError(f"{f.url}: the line at byte {at} is not valid JSON: {e}") from e
            value = obj.get(src.jsonl_field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise PipelineError(
                    f"{f.url}: the line at byte {at} has no string field "
                    f"{src.jsonl_field!r} (source.jsonl_field)"
                )
            text: str | bytes = value
            key = value.encode("utf-8")
        else:
            text = line if cfg.tokenizer.kind is TokenizerKind.bytes else _decode(line, f, at)
            key = line
        yield Piece(seg.split or split_of(key, src.valid_fraction, src.test_fraction), text, True, True)


def _decode(data: bytes, f: InputFile, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PipelineError(
            f"{f.url}: invalid UTF-8 at byte {offset + e.start} ({e.reason}); "
            "use tokenizer.kind=bytes for binary input"
        ) from e
