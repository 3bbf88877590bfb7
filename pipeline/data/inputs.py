"""Finding a source's input files: globs expanded, remote and compressed inputs copied locally.

Every path is an fsspec URL: local paths, file://, s3://, gs://, http(s)://, and chains such as
``zip://enwik8::https://mattmahoney.net/dc/enwik8.zip``. Tasks seek into their inputs, so inputs
that are remote or compressed (by extension) are first copied, decompressed, to a cache; a chain's
remote file is downloaded whole first, with a plain GET, because not every server honours range
requests. A finished copy is reused by later runs.
"""

from __future__ import annotations

import hashlib
import logging
import lzma
import zlib

import fsspec

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.data.config import PrepareConfig, SourceKind, TextFormat
from rnnpipe.pipeline.data.sources import InputFile
from rnnpipe.pipeline.data.wikipedia import corrupt_stream
from rnnpipe.pipeline.errors import PipelineError

log = logging.getLogger(__name__)

COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lzma")
_JSONL = (".jsonl", ".json", ".ndjson")


def resolve_inputs(cfg: PrepareConfig) -> list[InputFile]:
    """Expand globs in source.paths (and valid_paths/test_paths); fail on any that match nothing."""
    src = cfg.source
    groups = [("paths", "", src.paths)]
    if src.valid_paths or src.test_paths:
        groups = [
            ("paths", "train", src.paths),
            ("valid_paths", "valid", src.valid_paths),
            ("test_paths", "test", src.test_paths),
        ]
    files: list[InputFile] = []
    for key, split, patterns in groups:
        for i, pattern in enumerate(patterns):
            for url in _expand(f"source.{key}[{i}]", fsio.absolute(pattern)):
                name = url.rsplit("/", 1)[-1].lower()
                for suffix in COMPRESSED:
                    name = name.removesuffix(suffix)
                jsonl = src.text_format is TextFormat.jsonl or (
                    src.text_format is TextFormat.auto and name.endswith(_JSONL)
                )
                files.append(InputFile(url=url, path=url, split=split, jsonl=jsonl))
    if src.kind is SourceKind.enwik8 and len(files) != 1:
        raise PipelineError(
            f"source.kind=enwik8 takes exactly one input file, source.paths gave {len(files)}"
        )
    return files


def _expand(key: str, pattern: str) -> list[str]:
    if "::" in pattern or not any(c in pattern for c in "*?["):
        base = pattern.rsplit("::", 1)[-1]  # a chain (zip://member::https://x.zip): the file to fetch
        try:
            fs, path = fsio.filesystem(base)
            fs.info(path)  # not exists(): that answers False for an unreachable host too
        except FileNotFoundError as e:
            cause = e.__cause__  # fsspec's http reports every failure as missing; the cause tells
            if cause is not None and getattr(cause, "status", None) not in (404, 410):
                raise PipelineError(f"{key}: cannot read {pattern}: {type(cause).__name__}: {cause}") from e
            raise PipelineError(f"{key}: no such file: {base}") from e
        except Exception as e:  # a bad URL, an unreachable host, a missing protocol library
            raise PipelineError(f"{key}: cannot read {pattern}: {type(e).__name__}: {e}") from e
        return [pattern]
    fs, path = fsio.filesystem(pattern)
    found = sorted(p for p in fs.glob(path) if fs.isfile(p))
    if not found:
        raise PipelineError(f"{key}: the pattern {pattern} matches no files")
    return [fs.unstrip_protocol(p) if "://" in pattern else p for p in found]


def materialize(files: list[InputFile], cache_dir: str, keep_compressed: bool) -> None:
    """Copy remote inputs (and, unless ``keep_compressed``, compressed ones, decompressed) to
    ``cache_dir`` so tasks can seek in them. A chained URL's remote file is downloaded whole first
    (a plain GET: not every server honours range requests). Finished copies are reused."""
    for f in files:
        url = f.url
        if "::" in url:
            head, base = url.rsplit("::", 1)
            if not fsio.is_local(base):
                url = head + "::" + _copy(base, cache_dir, decompress=False)
        compressed = url.lower().endswith(COMPRESSED) and not keep_compressed
        if fsio.is_local(url) and not compressed:
            continue
        f.path = _copy(url, cache_dir, decompress=not keep_compressed)


def _copy(url: str, cache_dir: str, decompress: bool) -> str:
    name = url.split("::")[0].rsplit("/", 1)[-1].split("://")[-1] or "input"
    if decompress:
        for suffix in COMPRESSED:
            name = name.removesuffix(suffix)
    dest = fsio.join(cache_dir, f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{name}")
    if fsio.exists(dest):
        return dest
    log.info("copying %s to %s", url, dest)
    streaming = {"block_size": 0} if url.split("://")[0] in ("http", "https") else {}
    try:
        with (
            fsspec.open(url, "rb", compression="infer" if decompress else None, **streaming) as src,
            fsio.atomic_writer(dest) as dst,
        ):
            while True:
                block = src.read(1 << 22)
                if not block:
                    break
                dst.write(block)
    except PipelineError:
        raise
    except (EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        kind = next((c.strip(".") for c in COMPRESSED if url.split("::")[0].endswith(c)), "")
        if decompress and kind and not isinstance(e, FileNotFoundError):
            raise corrupt_stream(url, kind, e) from e
        raise PipelineError(f"cannot read input {url}: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise PipelineError(f"cannot read input {url}: {type(e).__name__}: {e}") from e
    return dest
