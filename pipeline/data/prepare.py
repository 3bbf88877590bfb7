"""The prepare stage: a corpus in, webdataset shards and a manifest out.

    plan ─▶ [extract ─▶ fit tokenizer ─▶] encode ─▶ pack ─▶ sample indexes ─▶ manifest.json

(``tokenizer.kind=huggingface`` loads its pretrained tokenizer before the plan instead of fitting
one, :mod:`rnnpipe.pipeline.data.hf_tokenizer`.)

Each arrow is a map over independent tasks on the given executor (a job array on Slurm). The
manifest is written last: a dataset without one is incomplete, whatever else is there. Re-running
on the same output skips finished units and shards (a shard is finished when its sha256 matches),
so it rewrites exactly the missing or damaged ones; the result is byte-identical however often it
was interrupted, and for a given config does not depend on the executor or number of workers.

A run holds an exclusive lock on its output (``.rnnpipe-prepare.lock``, :mod:`rnnpipe.pipeline.locking`):
a second prepare on it fails at once, naming the holder. ``.work/state.json`` is the first file a
run writes, so a ``.work`` without it holds nothing but what a kill left half-written.

RNNPIPE_TEST_PREPARE_DELAY (seconds slept once planning is done, with the lock held and the pool
started) exists for tests that need a prepare to be running.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Protocol

import numpy as np

from rnnpipe import __version__
from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.config import fingerprint, to_dict
from rnnpipe.pipeline.data.config import PrepareConfig, SourceKind, TokenizerKind
from rnnpipe.pipeline.data.hf_tokenizer import HF_TOKENIZER_FILE, check_hf_path, load_hf_tokenizer
from rnnpipe.pipeline.data.inputs import materialize, resolve_inputs
from rnnpipe.pipeline.data.manifest import (
    MANIFEST,
    check_sizes,
    dataset_fingerprint_keys,
    index_problem,
    read_manifest,
)
from rnnpipe.pipeline.data.shards import index_bytes, index_path, shard_path
from rnnpipe.pipeline.data.sources import (
    ENWIK8_SHA256,
    ENWIK8_SIZE,
    InspectTask,
    Plan,
    align_cut,
    inspect_input,
    make_units,
)
from rnnpipe.pipeline.data.tasks import (
    EncodeTask,
    FitTask,
    PackTask,
    UnitTask,
    encode_unit,
    extract_unit,
    fit_tokenizer,
    load_json,
    load_plan,
    make_tokenizer,
    pack_shard,
    shard_offsets,
)
from rnnpipe.pipeline.data.tokenizers import load_tokenizer_file
from rnnpipe.pipeline.errors import PipelineError
from rnnpipe.pipeline.locking import exclusive
from rnnpipe.pipeline.provenance import provenance

log = logging.getLogger(__name__)
PROVENANCE = "provenance.json"
LOCK = ".rnnpipe-prepare.lock"
# What overwrite=true removes. Not the lock: it is held while removing, and removing a lock file
# races the next holder.
_OUR_ENTRIES = ("train", "valid", "test", "tokenizer", MANIFEST, "config.yaml", PROVENANCE, ".work")


class TaskMapper(Protocol):
    def map(self, fn: Any, items: list[Any], *, name: str, weights: list[int] | None = None) -> list[Any]: ...


def prepare(cfg: PrepareConfig, executor: TaskMapper, config_yaml: str = "") -> dict[str, Any]:
    """Run the stage; returns the manifest. ``config_yaml`` (the whole resolved job config) is
    saved as ``config.yaml`` beside the shards. Holds the output's lock for the whole run. Raises
    :class:`PipelineError` on bad input, and at once when another prepare holds the output."""
    root = fsio.absolute(cfg.output)
    work = fsio.absolute(cfg.work_dir) if cfg.work_dir else fsio.join(root, ".work")
    values = to_dict(cfg)
    fp = fingerprint(dataset_fingerprint_keys(values))
    if cfg.tokenizer.kind is TokenizerKind.huggingface:
        # what can be told without loading it (that waits until the dataset is known to be
        # incomplete: re-running a finished one needs neither transformers nor the hub)
        check_hf_path(cfg.tokenizer.path)
    # A refused run touches nothing, not even the lock file (it records its holder): check first,
    # then again under the lock, where it counts.
    _check_output(root, work, fp, cfg.overwrite)
    with exclusive(root, LOCK, "prepare"):
        return _prepare(cfg, executor, config_yaml, root, work, values, fp)


def _prepare(
    cfg: PrepareConfig,
    executor: TaskMapper,
    config_yaml: str,
    root: str,
    work: str,
    values: dict[str, Any],
    fp: str,
) -> dict[str, Any]:
    for cache in (load_plan, load_json):  # a second run in this process must not see the first's files
        cache.cache_clear()
    old = _guard_output(root, work, fp, cfg.overwrite)
    if old is not None and _complete(root):
        if _add_indexes(root, work, old):
            return old
        log.info("%s already holds this dataset (every shard's sha256 matches); nothing to do", root)
        return old
    # state.json first: a .work without it is known to hold only what a kill left half-written.
    fsio.makedirs(work)
    fsio.write_text_atomic(fsio.join(work, "state.json"), json.dumps({"fingerprint": fp, "config": values}))

    tok_files: dict[str, bytes] | None = None
    tok_extra: dict[str, Any] = {}  # what the manifest's tokenizer entry records beyond the common keys
    if cfg.tokenizer.kind is TokenizerKind.huggingface:
        # before the plan: a tokenizer that cannot be used leaves no plan.json, so a re-run
        # with another tokenizer.path starts afresh instead of refusing an unfinished dataset
        tok_files, tok_extra = _pretrained(cfg, work)
    plan = _plan(cfg, work, executor)
    delay = float(os.environ.get("RNNPIPE_TEST_PREPARE_DELAY", "0"))
    if delay > 0:
        time.sleep(delay)
    log.info("plan: %d input file(s), %d unit(s), splits %s", len(plan.inputs), len(plan.units), plan.splits)
    units = list(range(len(plan.units)))
    weights = [u.weight for u in plan.units]

    extracted = False
    if cfg.tokenizer.kind is TokenizerKind.huggingface:
        pass  # loaded before the plan
    elif cfg.tokenizer.model:
        tok_files = load_tokenizer_file(
            cfg.tokenizer.kind.value, fsio.read_bytes(cfg.tokenizer.model)
        ).files()
    elif cfg.tokenizer.kind is not TokenizerKind.bytes:
        stats = executor.map(
            extract_unit, [UnitTask(work, u, cfg) for u in units], name="extract", weights=weights
        )
        _check_splits(plan, {s for st in stats for s, v in st["splits"].items() if v["pieces"]}, cfg)
        tok_files = _fit(cfg, work, stats, executor)
        extracted = True
    eos_token = tok_extra.get("eos_token")
    tok = make_tokenizer(cfg.tokenizer.kind, tok_files, eos_token)
    dtype = _dtype(cfg.shards.dtype, tok.vocab_size, cfg.tokenizer.kind.value)
    log.info("tokenizer: %s, vocabulary %d, dtype %s", tok.kind, tok.vocab_size, dtype)

    encoded = executor.map(
        encode_unit,
        [EncodeTask(work, u, cfg, tok_files, dtype, extracted, eos_token) for u in units],
        name="encode",
        weights=weights,
    )
    _check_splits(plan, {s for e in encoded for s, v in e["splits"].items() if v["tokens"]}, cfg)
    layout = _layout(cfg, plan, encoded, tok.kind, dtype)
    fsio.write_text_atomic(fsio.join(work, "layout.json"), json.dumps(layout))

    previous = {s["path"]: s for sp in (old or {}).get("splits", {}).values() for s in sp["shards"]}
    tasks = [
        PackTask(work, split, k, root, previous.get(shard_path(split, k)))
        for split in plan.splits
        for k in range(layout["splits"][split]["shards"])
    ]
    itemsize = {"uint8": 1, "uint16": 2, "uint32": 4}[dtype]
    per_shard = layout["samples_per_shard"] * layout["sample_tokens"]  # tokens in a full shard
    sizes = [
        max(1, min(per_shard, layout["splits"][t.split]["tokens"] - t.shard * per_shard)) * itemsize
        for t in tasks
    ]
    records = executor.map(pack_shard, tasks, name="pack", weights=sizes)

    for rel, data in tok.files().items():
        fsio.write_bytes_atomic(fsio.join(root, rel), data)
    if config_yaml:
        fsio.write_text_atomic(fsio.join(root, "config.yaml"), config_yaml)
    # Which code made it, where (the manifest itself stays a function of the config and inputs).
    prov = provenance(executor=type(executor).__name__)
    fsio.write_text_atomic(fsio.join(root, PROVENANCE), json.dumps(prov, indent=1) + "\n")
    manifest = _manifest(cfg, plan, encoded, layout, tasks, records, tok, fp, values)
    manifest["tokenizer"].update(tok_extra)
    # After every shard (a reader takes a shard modified after its split's index from its tar
    # headers), before the manifest that records them.
    for split, info in manifest["splits"].items():
        info["index"] = write_index(root, work, split, info["shards"])
    fsio.write_text_atomic(fsio.join(root, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    if not cfg.keep_work:
        fsio.remove(work, recursive=True)
    log.info(
        "wrote %s: %s",
        root,
        ", ".join(
            f"{s} {v['tokens']:,} tokens in {len(v['shards'])} shard(s)"
            for s, v in manifest["splits"].items()
        ),
    )
    return manifest


def write_index(root: str, work: str, split: str, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``split``'s sample index beside its shards (docs/data-format.md) from what the pack
    tasks recorded (or the shards' headers); returns its manifest entry {path, size, sha256}.
    ``shards`` are the split's manifest shard records, in order."""
    parts = []
    for k, shard in enumerate(shards):
        offsets = shard_offsets(work, root, split, k)
        if len(offsets) != shard["samples"] or int(offsets[:, 1].sum()) != shard["tokens"]:
            raise PipelineError(
                f"{fsio.join(root, shard['path'])}: {len(offsets)} samples recorded for the index, the "
                f"shard holds {shard['samples']}; run rnnpipe verify {root}"
            )
        parts.append(np.column_stack([np.full(len(offsets), k, np.int64), offsets]))
    data = index_bytes(np.concatenate(parts) if parts else np.zeros((0, 3), np.int64))
    rel = index_path(split)
    sha = fsio.write_bytes_atomic(fsio.join(root, rel), data)
    return {"path": rel, "size": len(data), "sha256": sha}


def _add_indexes(root: str, work: str, manifest: dict[str, Any]) -> bool:
    """Give a complete dataset the sample index of every split that lacks one (a dataset prepared
    before rnnpipe wrote them) or whose index is damaged, from the shards' headers, and record them
    in its manifest. The shards stay as they are, and so does the fingerprint. True when it wrote."""
    added = []
    for split, info in manifest["splits"].items():
        if index_problem(root, manifest, split) is not None:
            info["index"] = write_index(root, work, split, info["shards"])
            added.append(split)
    if not added:
        return False
    fsio.write_text_atomic(fsio.join(root, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    log.info(
        "%s already holds this dataset (every shard's sha256 matches); wrote the sample index of %s "
        "(the shards are unchanged)",
        root,
        ", ".join(added),
    )
    return True


def _fit(
    cfg: PrepareConfig, work: str, stats: list[dict[str, Any]], executor: TaskMapper
) -> dict[str, bytes]:
    """Fit the tokenizer once: its files are kept in the work dir for a re-run after a kill."""
    marker = fsio.join(work, "tokenizer", "fit.json")
    if fsio.exists(marker):
        names = json.loads(fsio.read_text(marker))["files"]
        log.info("tokenizer: reusing the one fitted by an earlier run (%s)", ", ".join(names))
        return {name: fsio.read_bytes(fsio.join(work, name)) for name in names}
    train_bytes = sum(st["splits"].get("train", {}).get("bytes", 0) for st in stats)
    (files,) = executor.map(
        fit_tokenizer,
        [FitTask(work, cfg, stats)],
        name="fit " + cfg.tokenizer.kind.value,
        weights=[max(1, train_bytes)],
    )
    for name, data in files.items():
        fsio.write_bytes_atomic(fsio.join(work, name), data)
    fsio.write_text_atomic(marker, json.dumps({"files": sorted(files)}))
    return files


def _pretrained(cfg: PrepareConfig, work: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """(files, manifest entry keys: eos_token, origin) of the pretrained tokenizer
    ``tokenizer.path`` names. Loaded once: a copy is kept in the work dir, so a re-run after a
    kill encodes the remaining units with the same tokenizer even if the path's files (or the
    hub's) changed meanwhile."""
    marker = fsio.join(work, "tokenizer", "pretrained.json")
    if fsio.exists(marker):
        extra = json.loads(fsio.read_text(marker))
        log.info("tokenizer: reusing the copy of %s an earlier run stored", cfg.tokenizer.path)
        return {HF_TOKENIZER_FILE: fsio.read_bytes(fsio.join(work, HF_TOKENIZER_FILE))}, extra
    tok, origin = load_hf_tokenizer(cfg.tokenizer.path)
    files = tok.files()
    for name, data in files.items():
        fsio.write_bytes_atomic(fsio.join(work, name), data)
    extra = {"eos_token": tok.eos_token, "origin": origin}
    fsio.write_text_atomic(marker, json.dumps(extra))
    return files, extra


def foreign_entries(root: str, work: str) -> list[str]:
    """The entries of ``root`` that make it a directory rnnpipe did not write (sorted; empty when
    it is absent, holds a manifest or ``.work/state.json``, or holds only what prepare writes
    first: its lock file and a ``.work`` with nothing but ``*.partial`` files in it)."""
    if not fsio.exists(root) or fsio.exists(fsio.join(root, MANIFEST)):
        return []
    if fsio.exists(fsio.join(work, "state.json")):
        return []
    fs, path = fsio.filesystem(root)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    own_work = work == fsio.join(root, ".work")
    return [n for n in names if n != LOCK and not (n == ".work" and own_work and _only_partials(work))]


def _only_partials(work: str) -> bool:
    """True where ``work`` holds no file but ``*.partial`` ones (a kill before state.json)."""
    fs, path = fsio.filesystem(work)
    return all(p.endswith(fsio.PARTIAL_SUFFIX) for p in fs.find(path))


def _refuse_foreign(root: str, work: str, foreign: list[str]) -> None:
    if foreign:
        raise PipelineError(
            f"output {root} is not empty and holds no rnnpipe dataset "
            f"({', '.join(foreign[:5])}...); choose an empty or new directory (overwrite=true "
            "removes only a dataset rnnpipe wrote: one with its manifest.json or .work/state.json)"
        )


def own_manifest(root: str, overwrite: bool) -> dict[str, Any] | None:
    """The output's manifest (None: there is none). One that fails validation is replaced with
    overwrite=true when it is rnnpipe's (its format says so); otherwise its error is raised."""
    url = fsio.join(root, MANIFEST)
    if not fsio.exists(url):
        return None
    try:
        return read_manifest(root)
    except PipelineError as e:
        try:
            ours = json.loads(fsio.read_text(url)).get("format") == "rnnpipe-shards"
        except (ValueError, AttributeError):
            ours = False
        if not (ours and overwrite):
            hint = "; overwrite=true replaces this damaged dataset" if ours else ""
            raise PipelineError(f"{e}{hint}") from None
        log.warning("%s: damaged manifest (%s); overwrite=true replaces it", url, e)
        return {"fingerprint": None, "config": {}}


def _check_output(root: str, work: str, fp: str, overwrite: bool) -> tuple[dict[str, Any] | None, bool, bool]:
    """(this config's manifest or None, another dataset is there, the work dir is stale), touching
    nothing: raises where the output holds something else, or (without ``overwrite``) another
    dataset. The work dir is stale when a kill left it without state.json, or when an earlier run
    of another config failed before planning."""
    _refuse_foreign(root, work, foreign_entries(root, work))
    manifest = own_manifest(root, overwrite)
    state_url = fsio.join(work, "state.json")
    state = json.loads(fsio.read_text(state_url)) if fsio.exists(state_url) else None
    stale = state is None and fsio.exists(work) and _only_partials(work)
    if state is not None and state.get("fingerprint") != fp and not fsio.exists(fsio.join(work, "plan.json")):
        state, stale = None, True
    other = (manifest is not None and manifest.get("fingerprint") != fp) or (
        state is not None and state.get("fingerprint") != fp
    )
    if other and not overwrite:
        was = (manifest or {}).get("config") or (state or {}).get("config") or {}
        what = (
            "a different dataset" if manifest is not None else "an unfinished prepare of a different config"
        )
        raise PipelineError(
            f"output {root} already holds {what} (made with "
            f"source.paths={was.get('source', {}).get('paths')}, tokenizer="
            f"{was.get('tokenizer', {}).get('kind')}); use another output or overwrite=true"
        )
    return (None if other else manifest), other, stale


def _guard_output(root: str, work: str, fp: str, overwrite: bool) -> dict[str, Any] | None:
    """Refuse an output holding a different dataset or something else; returns the matching
    manifest if one exists. ``overwrite`` replaces only a dataset rnnpipe wrote."""
    manifest, other, stale = _check_output(root, work, fp, overwrite)
    if stale:
        fsio.remove(work, recursive=True)  # nothing in it is worth keeping
    if not other:
        return manifest
    log.warning("overwrite=true: removing the dataset in %s", root)
    for name in _OUR_ENTRIES:
        fsio.remove(fsio.join(root, name), recursive=True)
    if not work.startswith(root):
        fsio.remove(work, recursive=True)
    return None


def _complete(root: str) -> bool:
    """Every shard and the tokenizer file in place with the sha256 the manifest records (sizes
    alone miss a flipped byte)."""
    return not check_sizes(root, hashes=True)


def _plan(cfg: PrepareConfig, work: str, executor: TaskMapper) -> Plan:
    url = fsio.join(work, "plan.json")
    if fsio.exists(url):
        return load_plan(work)
    files = resolve_inputs(cfg)
    wiki = cfg.source.kind is SourceKind.wikipedia
    materialize(files, cfg.source.cache_dir or fsio.join(work, "inputs"), keep_compressed=wiki)
    unit_bytes = max(1, int(cfg.source.unit_mb * 1e6))
    tasks = [InspectTask(i, f.path, wiki, unit_bytes) for i, f in enumerate(files)]
    infos = executor.map(
        inspect_input, tasks, name="plan", weights=[max(1, fsio.size(f.path)) for f in files]
    )
    budget = cfg.source.limit_bytes or None
    for f, info in zip(files, infos, strict=True):
        f.sha256, f.size, f.dump = info["sha256"], info["size"], info.get("dump")
        if cfg.source.kind is SourceKind.enwik8 and f.size == ENWIK8_SIZE and f.sha256 != ENWIK8_SHA256:
            raise PipelineError(
                f"{f.url} has enwik8's length but sha256 {f.sha256}, not the published "
                f"{ENWIK8_SHA256}: the download is corrupt"
            )
        if budget is not None and not wiki:
            align = (
                "byte"
                if cfg.tokenizer.kind is TokenizerKind.bytes
                else ("utf8" if cfg.source.kind is SourceKind.enwik8 else "line")
            )
            f.size = align_cut(f, min(f.size, budget), align)
            budget -= f.size
    files = [f for f in files if f.size > 0 or wiki]
    if not files:
        raise PipelineError("every input file is empty")
    units, splits, mode = make_units(cfg, files)
    plan = Plan(kind=cfg.source.kind.value, split_mode=mode, splits=splits, inputs=files, units=units)
    fsio.write_text_atomic(url, plan.to_json())
    load_plan.cache_clear()
    return plan


def _check_splits(plan: Plan, nonempty: set[str], cfg: PrepareConfig) -> None:
    for split in plan.splits:
        if split not in nonempty:
            hint = {
                "train": "the input holds no usable text",
                "valid": "raise source.valid_fraction, add data, or set it to 0 for no valid split",
                "test": "raise source.test_fraction, add data, or set it to 0 for no test split",
            }[split]
            raise PipelineError(
                f"split '{split}' is empty: no document of {', '.join(cfg.source.paths)} "
                f"was assigned to it ({hint})"
            )


def _dtype(requested: str, vocab_size: int, kind: str) -> str:
    fits = {"uint8": 1 << 8, "uint16": 1 << 16, "uint32": 1 << 32}
    if requested == "auto":
        return next(name for name, n in fits.items() if vocab_size <= n)
    if vocab_size > fits[requested]:
        raise PipelineError(
            f"the {kind} vocabulary has {vocab_size} ids, too many for shards.dtype={requested} "
            f"(at most {fits[requested]}); use shards.dtype=auto"
        )
    return requested


def _layout(
    cfg: PrepareConfig, plan: Plan, encoded: list[dict[str, Any]], tok_kind: str, dtype: str
) -> dict[str, Any]:
    itemsize = {"uint8": 1, "uint16": 2, "uint32": 4}[dtype]
    n = cfg.shards.sample_tokens
    per_shard = cfg.shards.samples_per_shard or max(1, int(cfg.shards.shard_mb * 1e6 // (n * itemsize)))
    splits = {}
    for split in plan.splits:
        units = [
            [u, e["splits"][split]["tokens"], e["splits"][split]["docs"]]
            for u, e in enumerate(encoded)
            if split in e["splits"]
        ]
        tokens = sum(u[1] for u in units)
        samples = -(-tokens // n)
        splits[split] = {
            "units": units,
            "tokens": tokens,
            "samples": samples,
            "shards": -(-samples // per_shard),
        }
    return {
        "dtype": dtype,
        "sample_tokens": n,
        "samples_per_shard": per_shard,
        "tokenizer": tok_kind,
        "splits": splits,
    }


def _manifest(cfg, plan, encoded, layout, tasks, records, tok, fp, values) -> dict[str, Any]:
    source_stats: dict[str, int] = {}
    for e in encoded:
        for k, v in e["source"].items():
            source_stats[k] = source_stats.get(k, 0) + v
    splits: dict[str, Any] = {}
    for split in plan.splits:
        shards = [r for t, r in zip(tasks, records, strict=True) if t.split == split]
        per_unit = [e["splits"][split] for e in encoded if split in e["splits"]]
        splits[split] = {
            "tokens": sum(u["tokens"] for u in per_unit),
            "bytes": sum(u["bytes"] for u in per_unit),
            "documents": sum(u["docs"] for u in per_unit),
            "samples": sum(s["samples"] for s in shards),
            "shards": shards,
        }
    tok_files = tok.files()
    model_file = next(iter(tok_files), None)
    return {
        "format": "rnnpipe-shards",
        "version": 1,
        "rnnpipe": __version__,
        "fingerprint": fp,
        "source": {
            "kind": plan.kind,
            "split_mode": plan.split_mode,
            "stats": source_stats,
            "inputs": [
                {"url": f.url, "size": f.size, "sha256": f.sha256, **({"split": f.split} if f.split else {})}
                for f in plan.inputs
            ],
        },
        "tokenizer": {
            "kind": tok.kind,
            "vocab_size": tok.vocab_size,
            "model_file": model_file,
            "model_sha256": hashlib.sha256(tok_files[model_file]).hexdigest() if model_file else None,
            "special_ids": tok.special_ids(),
        },
        "dtype": layout["dtype"],
        "sample_tokens": layout["sample_tokens"],
        "samples_per_shard": layout["samples_per_shard"],
        "splits": splits,
        "config": values,
    }
