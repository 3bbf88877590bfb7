"""MediaWiki XML dumps (pages-articles), read page by page in constant memory.

A dump is cut into units by byte ranges; a unit owns the pages whose ``<page>`` tag *starts* in
its range and reads past its end to finish the last one (the way Hadoop splits text by lines).
How a range is addressed depends on the file:

- ``plain``: uncompressed XML; ranges are file offsets, a unit seeks to its start.
- ``multistream``: bz2 made of many streams (Wikimedia's ``-multistream`` dumps, pbzip2); ranges
  are compressed offsets of stream starts, a unit seeks to its first stream.
- ``stream``: one bz2 or gzip stream; ranges are offsets in the decompressed XML, found by one
  scan at planning time, and a unit decompresses from the start, discarding up to its range.

Any export schema version: without ``<ns>`` (schema < 0.5, e.g. enwik8) the namespace comes from
the title's prefix and the siteinfo's namespace names; redirects are the ``<redirect>`` element or
text starting with ``#REDIRECT``. A page cut off by the end of the file (enwik8's last page) is
skipped with a warning.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import re
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec

from rnnpipe.pipeline.errors import PipelineError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
_BZ2_STREAM = re.compile(rb"BZh[1-9]1AY&SY")  # stream header + first block magic, byte aligned
_REDIRECT_TEXT = re.compile(r"^\s*#\s*redirect\b", re.I)
_PAGE_OPEN = b"<page>"
_PAGE_CLOSE = b"</page>"
_MAX_HEADER = 64 << 20


@dataclass
class DumpInfo:
    """What planning learned about one dump file."""

    layout: str  # plain | multistream | stream
    compression: str  # none | bz2 | gzip
    namespaces: dict[str, str] = field(default_factory=dict)  # key -> name, from <siteinfo>
    unit_starts: list[int] = field(default_factory=list)  # range starts (see the module docstring)
    end: int = 0  # end of the last range: file size, or decompressed size for ``stream``


@dataclass
class Page:
    title: str
    namespace: int
    redirect: bool
    text: str


def detect_compression(url: str) -> str:
    """``bz2``, ``gzip`` or ``none`` from the file's first bytes."""
    with fsspec.open(url, "rb") as f:
        magic = f.read(3)
    if magic == b"BZh":
        return "bz2"
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    return "none"


def corrupt_stream(url: str, compression: str, error: BaseException, at: int | None = None) -> PipelineError:
    """The one-line error for a compressed input that cannot be decompressed to its end: the file,
    "truncated/corrupt <compression> stream", where (``at``: decompressed bytes read) and why."""
    where = f" after {at:,} decompressed bytes" if at is not None else ""
    reason = f"{type(error).__name__}: {error}".strip()
    return PipelineError(
        f"{url}: truncated/corrupt {compression} stream{where} ({reason}); download or copy it again"
    )


class _Decompressed:
    """A bz2 or gzip reader over ``raw`` whose read errors name the input (a truncated file ends
    in EOFError, a corrupt one in OSError or zlib.error, deep in the standard library)."""

    def __init__(self, raw: Any, compression: str, url: str):
        self._f = bz2.BZ2File(raw) if compression == "bz2" else gzip.GzipFile(fileobj=raw)
        self.compression, self.url, self.done = compression, url, 0

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` decompressed bytes; b"" at the end of the stream."""
        try:
            data = self._f.read(n)
        except (EOFError, OSError, zlib.error) as e:
            raise corrupt_stream(self.url, self.compression, e, self.done) from None
        self.done += len(data)
        return data

    def __enter__(self) -> _Decompressed:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _decompressed(f: Any, compression: str, url: str) -> Any:
    """``f`` (opened ``url``) decompressed as ``compression`` (``none``: ``f`` itself)."""
    if compression in ("bz2", "gzip"):
        return _Decompressed(f, compression, url)
    return f


def inspect_dump(url: str, unit_bytes: int, report: Callable[[int], None]) -> DumpInfo:
    """Plan one dump: its layout, namespaces and the starts of units of about ``unit_bytes``."""
    compression = detect_compression(url)
    namespaces = _read_namespaces(url, compression)
    with fsspec.open(url, "rb") as f:
        size = f.size if hasattr(f, "size") and f.size is not None else None
    if compression == "none":
        size = size if size is not None else _length(url)
        report(size)
        return DumpInfo("plain", compression, namespaces, list(range(0, max(size, 1), unit_bytes)), size)
    if compression == "bz2":
        streams = _bz2_stream_offsets(url)
        if len(streams) > 1:
            size = size if size is not None else _length(url)
            starts = [streams[0]]
            for s in streams[1:]:
                if s - starts[-1] >= unit_bytes:
                    starts.append(s)
            report(size)
            return DumpInfo("multistream", compression, namespaces, starts, size)
    # One compressed stream: find page starts ``unit_bytes`` apart in the decompressed XML.
    starts, total = [0], 0
    tail = b""
    with fsspec.open(url, "rb") as raw, _decompressed(raw, compression, url) as f:
        last = 0
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            buf = tail + chunk
            base = total - len(tail)
            pos = buf.find(_PAGE_OPEN)
            while pos >= 0:
                at = base + pos
                if at - starts[-1] >= unit_bytes and at > 0:
                    starts.append(at)
                pos = buf.find(_PAGE_OPEN, pos + 1)
            tail = buf[-(len(_PAGE_OPEN) - 1) :]
            total += len(chunk)
            now = raw.tell()
            report(now - last)
            last = now
    return DumpInfo("stream", compression, namespaces, starts, total)


def _length(url: str) -> int:
    fs, path = fsspec.core.url_to_fs(url)
    return int(fs.size(path))


def _bz2_stream_offsets(url: str) -> list[int]:
    """Offsets of every bz2 stream in the file (a stream starts byte-aligned with ``BZh?1AY&SY``)."""
    offsets, base, tail = [], 0, b""
    with fsspec.open(url, "rb") as f:
        while True:
            chunk = f.read(CHUNK * 8)
            if not chunk:
                break
            buf = tail + chunk
            start = base - len(tail)
            offsets.extend(start + m.start() for m in _BZ2_STREAM.finditer(buf))
            tail = buf[-9:]
            base += len(chunk)
    return sorted(set(offsets))


def _read_namespaces(url: str, compression: str) -> dict[str, str]:
    """The ``<siteinfo>`` namespaces (key -> name) from the XML before the first ``<page>``."""
    head = b""
    with fsspec.open(url, "rb") as raw, _decompressed(raw, compression, url) as f:
        while _PAGE_OPEN not in head:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            head += chunk
            if len(head) > _MAX_HEADER:
                break
    cut = head.find(_PAGE_OPEN)
    if cut < 0 or b"<mediawiki" not in head[:cut]:
        raise PipelineError(f"{url}: not a MediaWiki XML dump (no <mediawiki> root followed by <page>)")
    try:
        root = ET.fromstring(head[:cut] + b"</mediawiki>")
    except ET.ParseError as e:
        raise PipelineError(f"{url}: the dump's header (<siteinfo>) is not valid XML: {e}") from e
    out = {}
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == "namespace" and el.get("key") is not None:
            out[el.get("key")] = (el.text or "").strip()
    return out


def _unit_chunks(
    url: str, info: DumpInfo, index: int, report: Callable[[int], None]
) -> Iterator[tuple[bytes, bool]]:
    """The decompressed XML from unit ``index``'s start; the flag is True inside its own range."""
    start = info.unit_starts[index]
    end = info.unit_starts[index + 1] if index + 1 < len(info.unit_starts) else info.end
    with fsspec.open(url, "rb") as raw:
        if info.layout == "multistream":
            raw.seek(start)
            yield from _multistream_chunks(raw, end - start, report, url)
            return
        if info.layout == "plain":
            raw.seek(start)
            f, skip = raw, 0
        else:  # one compressed stream: decompress from the start (ranges are decompressed offsets)
            f, skip = _decompressed(raw, info.compression, url), start
        while skip:
            skip -= len(f.read(min(skip, CHUNK)))
        own = end - start
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                return
            if own > 0:
                mine = chunk[:own]
                own -= len(mine)
                report(len(mine))
                yield mine, True
                chunk = chunk[len(mine) :]
                if not chunk:
                    continue
            yield chunk, False


def _multistream_chunks(
    raw, own_compressed: int, report: Callable[[int], None], url: str
) -> Iterator[tuple[bytes, bool]]:
    decomp = bz2.BZ2Decompressor()
    fed = 0
    started = False  # the current stream has been fed bytes but not reached its end marker
    while True:
        limit = own_compressed - fed if fed < own_compressed else CHUNK
        data = raw.read(min(CHUNK, limit))
        if not data:
            if started:  # the file ends inside a stream
                raise corrupt_stream(url, "bz2", EOFError(f"the file ends at compressed byte {fed:,}"))
            return
        own = fed < own_compressed
        fed += len(data)
        if own:
            report(len(data))
        while data:
            try:
                out = decomp.decompress(data)
            except OSError as e:
                raise corrupt_stream(url, "bz2", OSError(f"near compressed byte {fed:,}: {e}")) from None
            started = True
            if out:
                yield out, own
            if decomp.eof:
                data = decomp.unused_data
                decomp = bz2.BZ2Decompressor()
                started = False
            else:
                data = b""


def iter_pages(url: str, info: DumpInfo, index: int, report: Callable[[int], None]) -> Iterator[Page]:
    """The pages of unit ``index`` of the dump at ``url``, in dump order."""
    buf = b""
    pos_base = 0  # unit-relative offset of buf[0]
    own_len = 0  # bytes of the unit's own range seen so far
    own_done = False
    chunks = _unit_chunks(url, info, index, report)

    def more() -> bool:
        nonlocal buf, own_len, own_done
        for chunk, own in chunks:
            if own:
                own_len += len(chunk)
            else:
                own_done = True
            buf += chunk
            return True
        own_done = True
        return False

    search = 0
    while True:
        at = buf.find(_PAGE_OPEN, search)
        if at < 0:
            keep = len(_PAGE_OPEN) - 1
            drop = max(0, len(buf) - keep)
            buf, pos_base, search = buf[drop:], pos_base + drop, 0
            if own_done and pos_base >= own_len:
                return
            if not more():
                return
            continue
        # Until the unit's own range has been read, every buffered byte is in it; after, a page
        # starting at or past its end belongs to the next unit.
        if pos_base + at >= own_len:
            return
        close = buf.find(_PAGE_CLOSE, at)
        while close < 0:
            if not more():
                log.warning(
                    "%s: the last page (at byte %d of unit %d) is cut off by the end of the file; skipped",
                    url,
                    pos_base + at,
                    index,
                )
                return
            close = buf.find(_PAGE_CLOSE, at)
        end = close + len(_PAGE_CLOSE)
        yield _parse_page(buf[at:end], info.namespaces, url)
        buf, pos_base, search = buf[end:], pos_base + end, 0


def _parse_page(xml: bytes, namespaces: dict[str, str], url: str) -> Page:
    try:
        el = ET.fromstring(xml)
    except ET.ParseError as e:
        raise PipelineError(f"{url}: a <page> element is not valid XML ({e}): {xml[:200]!r}") from e
    strip = {child.tag.rsplit("}", 1)[-1]: child for child in el}
    title = (strip["title"].text or "") if "title" in strip else ""
    revisions = [c for c in el if c.tag.rsplit("}", 1)[-1] == "revision"]
    text = ""
    if revisions:
        for c in revisions[-1]:
            if c.tag.rsplit("}", 1)[-1] == "text":
                text = c.text or ""
    if "ns" in strip and (strip["ns"].text or "").strip().lstrip("-").isdigit():
        ns = int(strip["ns"].text)
    else:
        ns = _namespace_from_title(title, namespaces)
    redirect = "redirect" in strip or bool(_REDIRECT_TEXT.match(text))
    return Page(title=title, namespace=ns, redirect=redirect, text=text)


def _namespace_from_title(title: str, namespaces: dict[str, str]) -> int:
    if ":" not in title:
        return 0
    prefix = title.split(":", 1)[0].strip().lower()
    for key, name in namespaces.items():
        if name and name.lower() == prefix:
            return int(key)
    return 0


def link_drop_prefixes(namespaces: dict[str, str]) -> frozenset[str]:
    """Lower-case names of the File (6), Category (14) and Media (-2) namespaces, plus the usual."""
    names = {"file", "image", "media", "category"}
    names.update(namespaces.get(k, "").lower() for k in ("6", "14", "-2"))
    return frozenset(n for n in names if n)
