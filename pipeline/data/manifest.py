"""A prepared dataset: its manifest, its verification, and reading its token streams back.

``manifest.json`` at the dataset root describes everything (docs/data-format.md). ``verify``
re-hashes every shard and re-reads every sample; :func:`iter_split` streams a split's tokens in
order, the way the pretrain stage consumes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline import fsio
from pipeline.data.shards import check_shard, iter_shard
from pipeline.data.tokenizers import Tokenizer, tokenizer_from_manifest
from pipeline.errors import PipelineError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Config keys that do not change the dataset's content (where it lives, how it is run).
_NOT_CONTENT = ("output", "work_dir", "keep_work", "overwrite")
_NOT_CONTENT_SOURCE = ("cache_dir",)


def dataset_fingerprint_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a prepare config that determines the dataset's bytes."""
    out = {k: v for k, v in config.items() if k not in _NOT_CONTENT}
    out["source"] = {k: v for k, v in config["source"].items() if k not in _NOT_CONTENT_SOURCE}
    return out


def read_manifest(root: str) -> dict[str, Any]:
    """The manifest of the dataset at ``root``; a clear error when missing, unreadable or too new."""
    url = fsio.join(fsio.absolute(root), MANIFEST)
    if not fsio.exists(url):
        raise PipelineError(
            f"{url} does not exist: {root} is not a finished rnnpipe dataset "
            "(prepare did not complete, or this is the wrong directory)"
        )
    try:
        manifest = json.loads(fsio.read_text(url))
    except ValueError as e:
        raise PipelineError(f"{url} is not valid JSON: {e}") from e
    if manifest.get("format") != "rnnpipe-shards" or manifest.get("version", 0) > FORMAT_VERSION:
        raise PipelineError(
            f"{url}: unsupported format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r} (this rnnpipe reads version {FORMAT_VERSION})"
        )
    return manifest


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


def check_sizes(root: str, rehash_newer: bool = False) -> list[str]:
    """Cheap problems with the dataset at ``root``: the manifest, and every shard present with the
    size the manifest records and counts that add up. With ``rehash_newer``, a shard modified after
    the manifest was written (prepare writes the manifest last) has its sha256 checked too. A
    preflight check in well under a second: :func:`verify` re-hashes and re-reads everything."""
    root = fsio.absolute(root)
    try:
        manifest = read_manifest(root)
    except PipelineError as e:
        return [str(e)]
    problems = []
    fs, base = fsio.filesystem(root)
    local = fsio.is_local(root)
    written = os.stat(fsio.join(root, MANIFEST)).st_mtime_ns if local else 0
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
            elif (
                rehash_newer
                and local
                and os.stat(url).st_mtime_ns > written
                and fsio.sha256_of(url)[0] != shard["sha256"]
            ):
                problems.append(f"{url}: changed after the manifest was written (sha256 differs)")
        for key in ("samples", "tokens"):
            total = sum(s[key] for s in info["shards"])
            if total != info[key]:
                problems.append(
                    f"{root}: split {split}'s shards add up to {total} {key}, the manifest says {info[key]}"
                )
    return problems


def load_tokenizer(root: str) -> Tokenizer:
    """The tokenizer a dataset was encoded with."""
    root = fsio.absolute(root)
    manifest = read_manifest(root)
    return tokenizer_from_manifest(manifest, lambda rel: fsio.read_bytes(fsio.join(root, rel)))


def iter_split(root: str, split: str) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """A split's samples in stream order: ``(tokens, meta)``; concatenated, they are the split."""
    root = fsio.absolute(root)
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise PipelineError(f"{root} has no split {split!r} (it has {', '.join(manifest['splits'])})")
    for shard in manifest["splits"][split]["shards"]:
        for _, tokens, meta in iter_shard(fsio.join(root, shard["path"])):
            yield tokens, meta


def verify(root: str, deep: bool = True) -> list[str]:
    """Problems with the dataset at ``root`` (empty = it is intact).

    Checks every shard's size and sha256, and with ``deep`` re-reads every sample: keys in stream
    order, dtype, token, byte and sample counts against the manifest; and the tokenizer file.
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
        for shard in info["shards"]:
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
                    problems += [
                        f"{where}: {p}"
                        for p in check_shard(url, split, manifest["dtype"], shard, sample, token)
                    ]
            sample += shard["samples"]
            token += shard["tokens"]
            for k in totals:
                totals[k] += shard[k]
        for k, v in totals.items():
            if v != info[k]:
                problems.append(f"split {split}: shards add up to {v} {k}, the manifest says {info[k]}")
    return problems
