"""A prepared dataset: its manifest, its verification, and reading its token streams back.

``manifest.json`` at the dataset root describes everything (docs/data-format.md). It is
validated when read: every key the readers use is present with its type, and every path in it
is relative and stays inside the dataset root (:func:`inside`), so a crafted manifest can make no
reader or writer leave the dataset. ``verify`` re-hashes every shard and re-reads every sample;
:func:`iter_split` streams a split's tokens in order, the way the pretrain stage consumes them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.data.shards import check_shard, iter_shard, parse_index
from rnnpipe.pipeline.data.tokenizers import Tokenizer, tokenizer_from_manifest
from rnnpipe.pipeline.errors import PipelineError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = ("uint8", "uint16", "uint32")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# What a reader needs, per level: key -> (types, what to call them). bool is excluded from int.
_TOP: dict[str, tuple[tuple[type, ...], str]] = {
    "format": ((str,), "a string"),
    "version": ((int,), "an integer"),
    "dtype": ((str,), "a string"),
    "sample_tokens": ((int,), "an integer"),
    "tokenizer": ((dict,), "an object"),
    "splits": ((dict,), "an object"),
}
_TOKENIZER = {"kind": ((str,), "a string"), "vocab_size": ((int,), "an integer")}
_SPLIT = {
    "shards": ((list,), "a list"),
    "tokens": ((int,), "an integer"),
    "samples": ((int,), "an integer"),
    "bytes": ((int,), "an integer"),
}
# A split's sample index (optional: datasets prepared before rnnpipe wrote them have none).
_INDEX = {
    "path": ((str,), "a string"),
    "size": ((int,), "an integer"),
    "sha256": ((str,), "a string"),
}
_SHARD = {
    "path": ((str,), "a string"),
    "size": ((int,), "an integer"),
    "sha256": ((str,), "a string"),
    "samples": ((int,), "an integer"),
    "tokens": ((int,), "an integer"),
    "bytes": ((int,), "an integer"),
}
# Config keys that do not change the dataset's content (where it lives, how it is run).
_NOT_CONTENT = ("output", "work_dir", "keep_work", "overwrite")
_NOT_CONTENT_SOURCE = ("cache_dir",)
# Keys added after datasets were recorded without them, (section, key) -> the default that means
# "as before": at that value the key is left out of the fingerprint, so adding it changed no
# existing dataset's fingerprint (a finished dataset stays complete on a re-run).
ADDED_KEYS: dict[tuple[str, str], Any] = {
    ("tokenizer", "path"): "",
    # tokenizer.kind=word's
    ("tokenizer", "max_size"): 0,
    ("tokenizer", "min_count"): 1,
    ("tokenizer", "lowercase"): False,
}
# The tokenizer kinds whose manifest entry names a file (tokenizer.model_file).
FILE_KINDS = ("char", "sentencepiece", "huggingface", "word")


def dataset_fingerprint_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a prepare config that determines the dataset's bytes."""
    out = {k: v for k, v in config.items() if k not in _NOT_CONTENT}
    out["source"] = {k: v for k, v in config["source"].items() if k not in _NOT_CONTENT_SOURCE}
    for (section, key), default in ADDED_KEYS.items():
        if isinstance(out.get(section), dict) and out[section].get(key, default) == default:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


# The manifests this process has read and validated, by path: (the file's identity, the manifest).
# A command asks for one dataset's manifest many times (each stage's check and plan, the preflight,
# the reader); it is read and validated again only when the file changed. The identity holds the
# inode and ctime: prepare replaces the file (a new inode), and no copy can set a ctime.
_READ: dict[str, tuple[tuple[int, ...], dict[str, Any]]] = {}


def read_manifest(root: str) -> dict[str, Any]:
    """The manifest of the dataset at ``root``, validated (:func:`validate_manifest`); a
    :class:`PipelineError` naming the manifest and the key when it is missing, unreadable, too
    new, lacks a key or holds a path that leaves the dataset root. A local manifest is read and
    validated once per process while it is unchanged (a copy each call)."""
    url = fsio.join(fsio.absolute(root), MANIFEST)
    try:
        st = os.stat(url) if fsio.is_local(url) else None
    except OSError:
        st = None
    key = None if st is None else (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key is not None and url in _READ and _READ[url][0] == key:
        return copy.deepcopy(_READ[url][1])
    if not fsio.exists(url):
        raise PipelineError(
            f"{url} does not exist: {root} is not a finished rnnpipe dataset "
            "(prepare did not complete, or this is the wrong directory)"
        )
    try:
        manifest = json.loads(fsio.read_text(url))
    except ValueError as e:
        raise PipelineError(f"{url} is not valid JSON: {e}") from e
    validate_manifest(manifest, fsio.absolute(root))
    if key is not None:
        _READ[url] = (key, copy.deepcopy(manifest))
    return manifest


def _check_keys(obj: Any, spec: dict[str, tuple[tuple[type, ...], str]], where: str, url: str) -> None:
    for key, (types, what) in spec.items():
        name = f"{where}.{key}" if where else key
        if key not in obj:
            raise PipelineError(f"{url}: {name} is missing (a manifest of rnnpipe's has it)")
        value = obj[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise PipelineError(f"{url}: {name} is {type(value).__name__} {value!r:.60}, expected {what}")
        if types == (int,) and value < 0:
            raise PipelineError(f"{url}: {name} is {value}, expected a count (>= 0)")


def validate_manifest(manifest: Any, root: str) -> None:
    """Check a parsed manifest of the dataset at ``root`` (docs/data-format.md): the keys every
    reader uses are present with their types, and every path (``splits.*.shards[*].path``,
    ``splits.*.index.path``, ``tokenizer.model_file``) is relative, normalised, free of ``..`` and
    inside ``root``.
    Raises :class:`PipelineError` naming the manifest and the key."""
    url = fsio.join(root, MANIFEST)
    if not isinstance(manifest, dict):
        raise PipelineError(f"{url}: holds {type(manifest).__name__}, not a manifest object")
    if (
        manifest.get("format") != "rnnpipe-shards"
        or not isinstance(manifest.get("version"), int)
        or (manifest["version"] > FORMAT_VERSION)
    ):
        raise PipelineError(
            f"{url}: unsupported format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r} (this rnnpipe reads version {FORMAT_VERSION})"
        )
    _check_keys(manifest, _TOP, "", url)
    if manifest["dtype"] not in DTYPES:
        raise PipelineError(f"{url}: dtype is {manifest['dtype']!r}, expected one of {', '.join(DTYPES)}")
    if manifest["sample_tokens"] < 1:
        raise PipelineError(f"{url}: sample_tokens is {manifest['sample_tokens']}, expected >= 1")
    tok = manifest["tokenizer"]
    _check_keys(tok, _TOKENIZER, "tokenizer", url)
    model_file = tok.get("model_file")
    if tok["kind"] in FILE_KINDS and not isinstance(model_file, str):
        raise PipelineError(
            f"{url}: tokenizer.model_file is {model_file!r}: a {tok['kind']} tokenizer needs its file"
        )
    if model_file is not None:
        _inside(root, model_file, "tokenizer.model_file", url)
    if not manifest["splits"]:
        raise PipelineError(f"{url}: splits is empty (a dataset has at least a train split)")
    for split, info in manifest["splits"].items():
        where = f"splits.{split}"
        if not isinstance(info, dict):
            raise PipelineError(f"{url}: {where} is {type(info).__name__}, expected an object")
        _check_keys(info, _SPLIT, where, url)
        if "index" in info:
            _check_file_entry(info["index"], _INDEX, f"{where}.index", root, url)
        for i, shard in enumerate(info["shards"]):
            at = f"{where}.shards[{i}]"
            _check_file_entry(shard, _SHARD, at, root, url)


def _check_file_entry(entry: Any, spec: dict[str, Any], at: str, root: str, url: str) -> None:
    """A manifest entry naming a file (a shard, a split's index): an object with ``spec``'s keys,
    a sha256 hex digest and a path inside the dataset."""
    if not isinstance(entry, dict):
        raise PipelineError(f"{url}: {at} is {type(entry).__name__}, expected an object")
    _check_keys(entry, spec, at, url)
    if not _SHA256.match(entry["sha256"]):
        raise PipelineError(f"{url}: {at}.sha256 is {entry['sha256']!r:.80}, not a sha256 hex digest")
    _inside(root, entry["path"], f"{at}.path", url)


def _inside(root: str, rel: Any, key: str, where: str) -> str:
    problem = fsio.path_problem(rel)
    url = "" if problem else fsio.join(root, rel)
    if problem is None and fsio.is_local(root):
        # A symlink inside the dataset may still point out of it: resolve both and compare.
        real_root = os.path.realpath(root)
        real = os.path.realpath(url)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            problem = f"resolves to {real}, outside the dataset root {real_root} (a symlink?)"
    if problem:
        raise PipelineError(
            f"{where}: {key}={rel!r} {problem}; every path in a manifest is relative to the "
            "dataset root and stays inside it"
        )
    return url


def inside(root: str, rel: Any, key: str) -> str:
    """The URL of ``rel`` (a path read from a manifest under ``key``) in the dataset at ``root``;
    :class:`PipelineError` naming the key and the path when it is absolute, not normalised, has
    ``..`` components or (local datasets) resolves outside ``root``."""
    root = fsio.absolute(root)
    return _inside(root, rel, key, fsio.join(root, MANIFEST))


def dataset_digest(manifest: dict[str, Any]) -> str:
    """The identity of a dataset's content: sha256 over every shard's path, size and sha256, the
    tokenizer (kind, vocabulary, model file's sha256) and the dtype. Two datasets with equal digests
    hold the same tokens, wherever they live; what a pretrain run was trained on is recorded as this."""
    tok = manifest["tokenizer"]
    content = {
        "dtype": manifest["dtype"],
        "tokenizer": [tok["kind"], tok["vocab_size"], tok.get("model_sha256")],
        "shards": {
            split: [[s["path"], s["size"], s["sha256"]] for s in info["shards"]]
            for split, info in sorted(manifest["splits"].items())
        },
    }
    blob = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def check_sizes(root: str, rehash_newer: bool = False, hashes: bool = False) -> list[str]:
    """Problems with the dataset at ``root`` (empty = whole): the manifest, and every shard present
    with the size the manifest records and counts that add up. With ``hashes``, every shard's and
    the tokenizer file's sha256 are checked too (what prepare's completeness needs: a flipped byte
    keeps the size). Without, it is a preflight check in well under a second; ``rehash_newer``
    then re-hashes only a shard modified after the manifest was written (prepare writes the
    manifest last). :func:`verify` also re-reads every sample."""
    root = fsio.absolute(root)
    try:
        manifest = read_manifest(root)
    except PipelineError as e:
        return [str(e)]
    problems = []
    fs, base = fsio.filesystem(root)
    local = fsio.is_local(root)
    written = os.stat(fsio.join(root, MANIFEST)).st_mtime_ns if local else 0
    tok = manifest["tokenizer"]
    if hashes and tok.get("model_file"):
        url = fsio.join(root, tok["model_file"])
        if not fsio.exists(url):
            problems.append(f"{url}: missing (the manifest names it as the tokenizer)")
        elif sha256_cached(url) != tok.get("model_sha256"):
            problems.append(f"{url}: sha256 differs from the manifest")
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            url = fsio.join(root, shard["path"])
            try:
                size = int(fs.size(base.rstrip("/") + "/" + shard["path"]))
            except FileNotFoundError:
                problems.append(f"{url}: missing")
                continue
            if size != shard["size"]:
                problems.append(f"{url}: {size} bytes, the manifest says {shard['size']}")
            elif hashes and sha256_cached(url) != shard["sha256"]:
                problems.append(f"{url}: sha256 differs from the manifest (the shard is damaged)")
            elif (
                rehash_newer
                and not hashes
                and local
                and os.stat(url).st_mtime_ns > written
                and sha256_cached(url) != shard["sha256"]
            ):
                problems.append(f"{url}: changed after the manifest was written (sha256 differs)")
        for key in ("samples", "tokens"):
            total = sum(s[key] for s in info["shards"])
            if total != info[key]:
                problems.append(
                    f"{root}: split {split}'s shards add up to {total} {key}, the manifest says {info[key]}"
                )
    return problems


_SHA_CACHE: dict[tuple[str, int, int, int, int, int], str] = {}


def sha256_cached(url: str) -> str:
    """sha256 hex of the file at ``url``. A local file's digest is remembered in this process under
    its inode, size, mtime and ctime: a write changes ctime (which no tool can set back), so a
    stage's plan and its completeness check after the run hash a dataset once, not twice."""
    if not fsio.is_local(url):
        return fsio.sha256_of(url)[0]
    st = os.stat(url)
    key = (url, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = fsio.sha256_of(url)[0]
    return _SHA_CACHE[key]


def index_rows_problem(rows: np.ndarray, shards: list[dict[str, Any]], itemsize: int) -> str | None:
    """What is wrong with a split's index ``rows`` [samples, 3] (shard, data offset in bytes,
    tokens) against the split's manifest ``shards`` (None: nothing): rows grouped by shard in
    order, each shard's sample and token counts, every sample's data (``itemsize`` bytes a token)
    inside its shard's recorded size."""
    shard, offset, tokens = rows[:, 0], rows[:, 1], rows[:, 2]
    if len(rows) and (np.any(np.diff(shard) < 0) or shard[0] < 0 or shard[-1] >= len(shards)):
        return "its shard column is not the split's shards in order"
    counts = np.bincount(shard, minlength=len(shards))
    sums = np.zeros(len(shards), np.int64)
    np.add.at(sums, shard, tokens)
    for k, entry in enumerate(shards):
        if counts[k] != entry["samples"] or sums[k] != entry["tokens"]:
            return (
                f"it lists {counts[k]} samples and {sums[k]} tokens in {entry['path']}, the manifest "
                f"says {entry['samples']} and {entry['tokens']}"
            )
    sizes = np.array([entry["size"] for entry in shards], np.int64)
    if len(rows) and (np.any(offset < 0) or np.any(offset + tokens * itemsize > sizes[shard])):
        return "it places a sample outside its shard"
    return None


def read_index(root: str, manifest: dict[str, Any], split: str) -> tuple[np.ndarray, int | None]:
    """The rows [samples, 3] (shard, data offset in bytes, tokens) of ``split``'s sample index in
    the dataset at ``root``, read in one piece and checked: its size and sha256 against the
    manifest, its rows against the split's shards (:func:`index_rows_problem`); and its mtime in
    ns (None where the dataset is not local). ValueError saying what is wrong, naming the file."""
    info = manifest["splits"][split]
    index = info.get("index")
    if index is None:
        raise ValueError(f"split {split} has no sample index (prepared before rnnpipe wrote them)")
    url = inside(root, index["path"], f"splits.{split}.index.path")
    try:
        data = fsio.read_bytes(url)
    except FileNotFoundError:
        raise ValueError(f"{index['path']}: missing (the manifest names it as the {split} index)") from None
    if len(data) != index["size"] or hashlib.sha256(data).hexdigest() != index["sha256"]:
        raise ValueError(f"{index['path']}: {len(data)} bytes with another sha256 than the manifest records")
    try:
        rows = parse_index(data)
        problem = index_rows_problem(rows, info["shards"], np.dtype(manifest["dtype"]).itemsize)
    except ValueError as e:
        problem = str(e)
    if problem:
        raise ValueError(f"{index['path']}: {problem}")
    return rows, os.stat(url).st_mtime_ns if fsio.is_local(url) else None


def index_problem(root: str, manifest: dict[str, Any], split: str, mtimes: bool = True) -> str | None:
    """What is wrong with the sample index of ``split`` in the dataset at ``root`` (None: nothing):
    what :func:`read_index` finds, or (``mtimes``, local datasets) a shard modified after the index
    was written. Reads the index, not the shards (:func:`verify` compares it with them)."""
    try:
        _, written = read_index(root, manifest, split)
    except ValueError as e:
        return str(e)
    if mtimes and written is not None:
        for shard in manifest["splits"][split]["shards"]:
            url = fsio.join(fsio.absolute(root), shard["path"])
            if os.path.exists(url) and os.stat(url).st_mtime_ns > written:
                return f"{manifest['splits'][split]['index']['path']}: {shard['path']} was modified after it"
    return None


def load_tokenizer(root: str) -> Tokenizer:
    """The tokenizer a dataset was encoded with."""
    root = fsio.absolute(root)
    manifest = read_manifest(root)
    return tokenizer_from_manifest(
        manifest, lambda rel: fsio.read_bytes(inside(root, rel, "tokenizer.model_file"))
    )


def iter_split(root: str, split: str) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """A split's samples as the manifest lists them, ``(tokens, meta)``: concatenated, they are the
    forward token stream a run reads (``data.direction=backward`` reads it reversed:
    :class:`rnnpipe.pipeline.data.reader.ReversedReader`). Each shard is checked as it is parsed,
    not against the manifest's sizes and hashes (``rnnpipe verify`` does that)."""
    root = fsio.absolute(root)
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise PipelineError(f"{root} has no split {split!r} (it has {', '.join(manifest['splits'])})")
    for i, shard in enumerate(manifest["splits"][split]["shards"]):
        for _, tokens, meta in iter_shard(inside(root, shard["path"], f"splits.{split}.shards[{i}].path")):
            yield tokens, meta


def _index_rows_against(
    rows: np.ndarray, shard: int, first: int, offsets: list[tuple[int, int]], index: str, where: str
) -> list[str]:
    """The index ``rows`` of shard number ``shard`` (whose first sample is ``first`` in the split)
    against the (offset, tokens) read from it."""
    mine = rows[rows[:, 0] == shard][:, 1:]
    got = np.asarray(offsets, np.int64).reshape(-1, 2)
    if mine.shape == got.shape and np.array_equal(mine, got):
        return []
    bad = next((i for i in range(min(len(mine), len(got))) if tuple(mine[i]) != tuple(got[i])), None)
    if bad is None:
        return [f"{index}: lists {len(mine)} samples in {where}, it holds {len(got)}"]
    return [
        f"{index}: places sample {first + bad} ({where}) at byte {mine[bad][0]} with {mine[bad][1]} "
        f"tokens, the shard has it at byte {got[bad][0]} with {got[bad][1]}"
    ]


def verify(root: str, deep: bool = True) -> list[str]:
    """Problems with the dataset at ``root`` (empty = it is intact).

    Checks every shard's size and sha256, and with ``deep`` re-reads every sample: keys in stream
    order, dtype, token, byte and sample counts against the manifest; the tokenizer file; and each
    split's sample index, where it has one: its size and sha256, its counts against the manifest,
    and with ``deep`` every row against the sample it points to.
    """
    root = fsio.absolute(root)
    try:
        manifest = read_manifest(root)
    except PipelineError as e:
        return [str(e)]
    problems: list[str] = []
    tok = manifest["tokenizer"]
    if tok.get("model_file"):
        url = fsio.join(root, tok["model_file"])
        if not fsio.exists(url):
            problems.append(f"{tok['model_file']}: missing (the manifest names it as the tokenizer)")
        elif fsio.sha256_of(url)[0] != tok.get("model_sha256"):
            problems.append(f"{tok['model_file']}: sha256 differs from the manifest")
    for split, info in manifest["splits"].items():
        sample = token = 0
        totals = {"samples": 0, "tokens": 0, "bytes": 0}
        index = info.get("index")
        rows = None
        if index is not None:
            try:
                rows = read_index(root, manifest, split)[0]
            except ValueError as e:
                problems.append(str(e))
        for k, shard in enumerate(info["shards"]):
            url = fsio.join(root, shard["path"])
            where = shard["path"]
            if not fsio.exists(url):
                problems.append(f"{where}: missing")
            else:
                size = fsio.size(url)
                sha = fsio.sha256_of(url)[0]
                if size != shard["size"]:
                    problems.append(
                        f"{where}: {size} bytes, the manifest says {shard['size']}"
                        + (" (truncated)" if size < shard["size"] else "")
                    )
                if sha != shard["sha256"]:
                    problems.append(
                        f"{where}: sha256 {sha[:16]}… differs from the manifest's {shard['sha256'][:16]}…"
                    )
                if deep:
                    offsets: list[tuple[int, int]] = []
                    found = check_shard(url, split, manifest["dtype"], shard, sample, token, offsets)
                    problems += [f"{where}: {p}" for p in found]
                    if rows is not None and not found:  # a damaged shard is named once, above
                        problems += _index_rows_against(rows, k, sample, offsets, index["path"], where)
            sample += shard["samples"]
            token += shard["tokens"]
            for k in totals:
                totals[k] += shard[k]
        for k, v in totals.items():
            if v != info[k]:
                problems.append(f"split {split}: shards add up to {v} {k}, the manifest says {info[k]}")
    return problems
