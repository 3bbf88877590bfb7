"""``rnnpipe export RUN_OR_CHECKPOINT OUT [--backward BWD]``: one fp32 safetensors file from any
ZeRO checkpoint; with ``--backward``, a backward LM's export (a ``data.direction=backward`` run, or
its export) beside it in ``OUT/backward/``: the two LMs of an ELMo pair in one directory.

OUT is replaced whole, in one step (:func:`replace_dir`: a reader sees the earlier export or the
new one, wherever a kill lands), keeping the files in it that the export did not write
(:func:`keep_users_files`); an export given to ``--backward`` is copied regular file by regular
file, without its code (:func:`~rnnpipe.pipeline.models.exported.copy_export`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import json
import logging
import os
import posixpath
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from rnnpipe.pipeline import fsio
from rnnpipe.pipeline.data.manifest import read_manifest
from rnnpipe.pipeline.errors import ConfigError, PipelineError
from rnnpipe.pipeline.models.exported import (
    BACKWARD,
    HEADER,
    WEIGHTS,
    check_regular,
    copy_export,
    export_direction,
    export_meta,
    is_export,
    walk,
)
from rnnpipe.pipeline.models.pretrained import save_pretrained
from rnnpipe.pipeline.provenance import provenance
from rnnpipe.pipeline.train import checkpoint

log = logging.getLogger("rnnpipe")


@dataclass
class Consolidated:
    """A checkpoint's model in one piece: fp32 weights, the run's config, the tokenizer."""

    checkpoint: Path
    state: dict[str, torch.Tensor]  # a LanguageModel's state dict, fp32, on the CPU
    config: dict[str, Any]  # the run's PretrainConfig as plain values (from the checkpoint's marker)
    header: dict[str, Any]  # the checkpoint's COMPLETE marker
    tokenizer: dict[str, Any]  # the dataset manifest's tokenizer entry
    tokenizer_files: dict[str, bytes]  # relative path -> content
    corpus: dict[str, Any] | None = None  # the dataset's source: its kind and its input files' names


def consolidate(source: str | Path) -> Consolidated:
    """The weights of a complete checkpoint (a run dir means its latest), gathered from any ZeRO stage."""
    source = Path(source)
    ckpt = checkpoint.find_latest(source) if (source / "checkpoints").is_dir() else source
    if ckpt is None or not checkpoint.is_complete(ckpt):
        raise PipelineError(f"{source} is neither a run with a complete checkpoint nor a complete checkpoint")
    # ZeRO 0-2 write mp_rank_00_model_states.pt, ZeRO-3 one per rank; rank 0's holds the client state.
    candidates = [ckpt / "mp_rank_00_model_states.pt", ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    states = next((c for c in candidates if c.exists()), None)
    if states is None:
        raise PipelineError(f"{ckpt} has no model-states file: not a DeepSpeed checkpoint")
    header = checkpoint.read_header(ckpt)
    cfg = header.get("config")
    if cfg is None:
        raise PipelineError(f"{ckpt} was not written by this rnnpipe pretrain (no config in its marker)")
    # A checkpoint is code: DeepSpeed's files are pickles. Say where they come from before loading.
    log.info("loading checkpoint %s (pickled files: load only checkpoints you trust)", ckpt)
    if any(ckpt.glob("*zero_pp_rank_*_optim_states.pt")):  # ZeRO 1, 2, 3: gather the fp32 partitions
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 prints its progress (stdout) and a progress bar (stderr): keep them off
        # rnnpipe's console unless asked (-v); a failure still raises, with its message
        with contextlib.ExitStack() as quiet:
            if not log.isEnabledFor(logging.DEBUG):
                quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
                quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:  # ZeRO 0: the module's weights are whole in the model-states file, read without unpickling code
        try:
            state = torch.load(states, map_location="cpu", weights_only=True)["module"]
        except Exception as e:  # the restricted unpickler refuses anything but tensors and plain values
            raise PipelineError(
                f"{states}: not loadable as plain tensors and values ({type(e).__name__}: {e}); "
                "rnnpipe does not unpickle it"
            ) from e
    manifest = read_manifest(cfg["data"]["path"])
    tokenizer = manifest["tokenizer"]
    files = {}
    if tokenizer.get("model_file"):
        root = fsio.absolute(cfg["data"]["path"])
        files[tokenizer["model_file"]] = fsio.read_bytes(fsio.join(root, tokenizer["model_file"]))
    state = {k: v.float() for k, v in state.items()}
    return Consolidated(ckpt, state, cfg, header, tokenizer, files, _corpus(manifest))


def _corpus(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the dataset was prepared from, by name: its source kind and its input files."""
    src = manifest.get("source") or {}
    names = [posixpath.basename(str(i.get("url", "")).rstrip("/")) for i in src.get("inputs") or []]
    return {"kind": src.get("kind"), "files": [n for n in names if n]}


# The figures of a run the export records (and its model card shows), at their latest step up to
# the exported one.
RUN_METRICS = ("train/tokens_seen", "valid/bpb", "test/bpb", "valid/loss", "test/loss")


def run_metrics(ckpt: Path, step: int) -> dict[str, dict[str, float]]:
    """``{tag: {"step", "value"}}`` from the run's ``metrics.jsonl`` (beside ``checkpoints/``) for
    :data:`RUN_METRICS`, each at its last step up to ``step``; ``{}`` when the run kept none."""
    file = ckpt.parent.parent / "metrics.jsonl"
    out: dict[str, dict[str, float]] = {}
    try:
        lines = file.read_text().splitlines() if ckpt.parent.name == "checkpoints" else []
    except OSError:
        return out
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written as we read
            continue
        at = record.get("step") if isinstance(record, dict) else None
        if not isinstance(at, int) or at > step:
            continue
        for tag in RUN_METRICS:
            if isinstance(record.get(tag), int | float) and at >= out.get(tag, {}).get("step", -1):
                out[tag] = {"step": at, "value": record[tag]}
    return out


def run_direction(cfg: dict[str, Any]) -> str:
    """A run's ``data.direction`` from its config (plain values): forward for a run from before it."""
    return str((cfg.get("data") or {}).get("direction") or "forward")


def _meta(c: Consolidated) -> dict[str, Any]:
    """What the weights were made from: the export's identity for the stages after it."""
    cfg, header = c.config, c.header
    return {
        "checkpoint": str(c.checkpoint),
        "step": header["step"],
        "data": cfg["data"]["path"],
        "direction": run_direction(cfg),  # which way the model reads text
        "dataset": header.get("dataset"),
        "fingerprint": header.get("fingerprint"),
        "train_steps": cfg["train"]["steps"],
        "world_size": header["world"],
        "provenance": header.get("provenance"),
        "exported_by": provenance(),
        "corpus": c.corpus,
        "metrics": run_metrics(c.checkpoint, header["step"]),
    }


def _write(c: Consolidated, out: Path) -> None:
    backbone = (c.header.get("hf_backbone") or {}).get("config")  # a huggingface-kind model's
    save_pretrained(out, c.state, c.config["model"], c.tokenizer, c.tokenizer_files, _meta(c), backbone)


TOKENIZER_KEYS = ("kind", "vocab_size", "model_sha256")  # what makes two tokenizers the same


def _backward_twin(backward: Path, forward: Consolidated, source: Path) -> Consolidated | Path:
    """The backward LM for ``--backward``: its run's consolidated checkpoint, or its export (a
    path); ConfigError naming it when it is not a backward LM, or not tokenized as ``forward``."""
    if is_export(backward):
        direction, tokenizer = export_direction(backward), export_meta(str(backward)).get("tokenizer") or {}
        twin: Consolidated | Path = backward
    else:
        try:
            c = consolidate(backward)
        except PipelineError as e:
            raise PipelineError(f"--backward {backward}: not an export, and {e}") from None
        direction, tokenizer, twin = run_direction(c.config), c.tokenizer, c
    if direction != BACKWARD:
        raise ConfigError(
            f"--backward {backward}: its model reads text {direction} (data.direction={direction}); "
            "it takes a run trained with data.direction=backward, or its export"
        )
    mine = [forward.tokenizer.get(k) for k in TOKENIZER_KEYS]
    theirs = [tokenizer.get(k) for k in TOKENIZER_KEYS]
    if mine != theirs:
        raise ConfigError(
            f"--backward {backward} is tokenized by {theirs[0]} (vocabulary {theirs[1]}, model file "
            f"sha256 {str(theirs[2])[:12]}), {source} by {mine[0]} (vocabulary {mine[1]}, "
            f"{str(mine[2])[:12]}): the two directions of a pair must share their tokenizer"
        )
    return twin


# Replacing OUT. The new export is written into OUT.partial-PID-HOST beside OUT, and the two are
# swapped in one step: renameat2(RENAME_EXCHANGE) (Linux 3.15+; ext4, xfs, btrfs, tmpfs), after
# which the partial name holds the old export, removed last. A kill anywhere leaves OUT whole, the
# old export or the new one, and at worst a partial directory that the next export removes. On a
# filesystem without the exchange (NFS, some FUSE mounts) OUT is renamed aside to OUT.old-PID-HOST
# and the new one renamed in: for the instant between the two renames OUT is absent, and an export
# killed in it leaves the old one aside, which the next export puts back.
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_NO_EXCHANGE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}
# What an export writes, for an export from before the record of its files (rnnpipe.json's
# "files"): the rest of such a directory is the user's.
_EXPORT_NAMES = re.compile(
    r"(model\.safetensors|config\.json|rnnpipe\.json|README\.md|generation_config\.json|"
    r"tokenizer(_config)?\.json|special_tokens_map\.json|(configuration|modeling)_rnnpipe\.py|"
    r"rnnpipe_\w+\.py|(tokenizer|backward)/.+)"
)
FILES_KEY = "files"  # rnnpipe.json's record of what the export wrote: path -> sha256, size
_AS_IT_WAS = "free space on its filesystem (or fix its permissions) and export again"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.uname().nodename) or "host"


def work_dir(out: Path, kind: str) -> Path:
    """``out.<kind>-PID-HOST``: this process's working name beside ``out`` (kind partial or old)."""
    return out.with_name(f"{out.name}.{kind}-{os.getpid()}-{_host()}")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (this process: no, its leftovers are stale)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def recover(out: Path) -> None:
    """Undo what a killed export on this host left beside ``out``: an old export it had set aside
    goes back where ``out`` is missing (else it is removed); its partial copies are removed.
    Another host's, and a live process's, are left alone."""
    pattern = re.compile(re.escape(out.name) + r"\.(partial|old)-(\d+)(?:-(.+))?")
    found: dict[str, list[Path]] = {"partial": [], "old": []}
    with contextlib.suppress(FileNotFoundError):
        for p in out.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and m[3] in (None, _host()) and not _alive(int(m[2])):
                found[m[1]].append(p)
    old = sorted(found["old"], key=lambda p: p.lstat().st_ctime_ns)
    if old and not os.path.lexists(out):
        os.rename(old.pop(), out)
        log.warning("%s: put back the export that a killed export had set aside", out)
    for p in found["partial"] + old:
        shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux's renameat2 with RENAME_EXCHANGE); OSError otherwise."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def replace_dir(new: Path, out: Path) -> None:
    """Put the directory ``new`` (beside ``out``) in ``out``'s place, whole, in one step where the
    filesystem can swap two directories; the old ``out`` is removed afterwards."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    try:
        _exchange(new, out)
        shutil.rmtree(new, ignore_errors=True)  # (it holds the old export now)
        return
    except OSError as e:
        if e.errno not in _NO_EXCHANGE:
            raise
    aside = work_dir(out, "old")
    os.rename(out, aside)
    try:
        os.rename(new, out)
    except OSError:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _split(rel: str) -> tuple[str, str]:
    """(the export directory ``rel`` belongs to, relative to OUT: "" or backward; its path there)."""
    if rel.startswith(f"{BACKWARD}/"):
        return BACKWARD, rel[len(BACKWARD) + 1 :]
    return "", rel


def _same_weights(st: os.stat_result, source: dict[str, Any]) -> bool:
    """Whether a weights file is the one its header's sha256 was recorded for (size and mtime)."""
    return (st.st_size, st.st_mtime_ns) == (source.get("weights_size"), source.get("weights_mtime_ns"))


def _record(root: Path) -> dict[str, dict[str, Any]]:
    """The files of the export in ``root`` (not its header, nor a ``backward/`` inside it):
    path -> sha256 and size (the weights' sha256 as their header records it, where it is theirs)."""
    source = (_json_object(root / HEADER) or {}).get("source") or {}
    record = {}
    for rel, e in walk(root):
        if rel == HEADER or _split(rel)[0] or not e.is_file(follow_symlinks=False):
            continue
        st = e.stat(follow_symlinks=False)
        sha = source.get("weights_sha256") if rel == WEIGHTS and _same_weights(st, source) else None
        record[rel] = {"sha256": sha or fsio.sha256_of(e.path)[0], "size": st.st_size}
    return record


def _ours(rel: str, entry: os.DirEntry, headers: dict[str, dict[str, Any]]) -> bool:
    """Whether ``rel`` is a file that the export wrote, unchanged since (``headers``: OUT's and
    its backward/'s; their records say, or for an export from before the record, its name)."""
    sub, name = _split(rel)
    header = headers[sub]
    record = header.get(FILES_KEY)
    if name == HEADER:
        return True
    if not isinstance(record, dict):
        return bool(_EXPORT_NAMES.fullmatch(rel))
    want = record.get(name)
    if not isinstance(want, dict) or not entry.is_file(follow_symlinks=False):
        return False
    st = entry.stat(follow_symlinks=False)
    if st.st_size != want.get("size"):
        return False
    if name == WEIGHTS and _same_weights(st, header.get("source") or {}):
        return want.get("sha256") == (header.get("source") or {}).get("weights_sha256")
    return fsio.sha256_of(entry.path)[0] == want.get("sha256")


def _json_object(file: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def keep_users_files(out: Path, tmp: Path) -> None:
    """Record in each export's header in ``tmp`` (and its ``backward/``) what it holds, then
    hard-link into ``tmp`` what ``out`` holds that the earlier export did not write, or that was
    changed since (the user's: a README, results): the earlier export keeps them until the swap.
    A name the new export writes too is refused (PipelineError naming it), but ``README.md``:
    the user's is kept, not the model card."""
    roots = [r for r in ("", BACKWARD) if (tmp / r / HEADER).is_file()]
    records = {r: _record(tmp / r) for r in roots}
    headers = {r: _json_object(out / r / HEADER) or {} for r in ("", BACKWARD)}
    for rel, e in walk(out) if os.path.isdir(out) else ():
        is_dir = e.is_dir(follow_symlinks=False)
        if (is_dir and os.listdir(e.path)) or _ours(rel, e, headers):
            continue  # (a directory's files are taken one by one)
        target = tmp / rel
        if is_dir and target.is_dir() and not target.is_symlink():
            continue
        conflict = PipelineError(
            f"{out / rel}: not written by the earlier export (or changed since), and the new export "
            f"writes {rel} too: move it out of {out}, then export again"
        )
        if os.path.lexists(target):
            if posixpath.basename(rel) != "README.md" or not target.is_file():
                raise conflict
            target.unlink()
            sub, name = _split(rel)
            records.get(sub, {}).pop(name, None)
            log.info("kept %s (yours) in place of the new model card", out / rel)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise conflict from None
        if is_dir:
            target.mkdir()
        elif e.is_symlink():
            os.symlink(os.readlink(e.path), target)
        else:
            try:
                os.link(e.path, target, follow_symlinks=False)
            except OSError:  # a filesystem without hard links
                shutil.copy2(e.path, target, follow_symlinks=False)
    for root, record in records.items():
        header = json.loads((tmp / root / HEADER).read_text())
        (tmp / root / HEADER).write_text(json.dumps({**header, FILES_KEY: record}, indent=1) + "\n")


def _check_space(out: Path, c: Consolidated, twin: Consolidated | Path | None) -> None:
    """PipelineError before any work when the filesystem of ``out`` has too little room for it."""
    states = [c.state] + ([twin.state] if isinstance(twin, Consolidated) else [])
    need = sum(t.numel() * 4 for s in states for t in s.values()) + (8 << 20)
    if isinstance(twin, Path):
        need += sum(e.stat(follow_symlinks=False).st_size for _, e in walk(twin) if e.is_file())
    at = out.parent
    while not at.exists() and at != at.parent:
        at = at.parent
    free = shutil.disk_usage(at).free
    if free < need:
        raise PipelineError(
            f"{out}: the export needs about {need / 2**20:,.0f} MiB and {at} has {free / 2**20:,.0f} MiB "
            "free: free space there or choose another directory (nothing was written)"
        )


def _reason(e: BaseException) -> str:
    """An OSError's or safetensors' error's reason, in a few words (safetensors wraps the OS's)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower() if e.errno == errno.ENOSPC else e.strerror
    found = re.search(r'message: "([^"]+)"', str(e))
    return (found[1] if found else (str(e).splitlines() or [type(e).__name__])[0][:200]).lower()


def export(source: str | Path, out: str | Path, backward: str | Path | None = None) -> Path:
    """Consolidate a checkpoint (a run dir means its latest) into ``out``; returns ``out``.

    ``backward``: a ``data.direction=backward`` run (its latest checkpoint) or checkpoint, or an
    export of one, written as a complete export into ``out/backward/`` (the forward export's own
    files are as without it); ``source`` must then be a forward run, and both share a tokenizer
    (ConfigError naming the path otherwise, before anything is written). An export is copied file
    by file, regular files only: a symbolic link in it is refused, naming it; its ``.py`` files
    (code) are not copied, this rnnpipe's own are written instead.

    Written into ``out.partial-PID-HOST`` beside ``out``, then swapped in whole
    (:func:`replace_dir`): a reader of ``out`` sees the earlier export or this one, never a mix,
    a missing or a half-deleted one, wherever a kill lands; what a killed export left beside
    ``out`` is cleaned up first. Files in ``out`` that the earlier export did not write (or that
    were changed since) are kept (:func:`keep_users_files`). Disk full: PipelineError, ``out``
    as it was."""
    source, out = Path(source), Path(out)
    if out.is_symlink():  # the swap replaces a directory, not a link to one
        out = out.resolve()
    recover(out)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out} is a file, not a directory: choose another OUT")
    if out.exists() and any(out.iterdir()) and not is_export(out):
        # (a Hugging Face model directory has a config.json too: it must be one of ours to be replaced)
        raise PipelineError(f"{out} holds files that are not an rnnpipe export: choose another directory")
    if backward is not None and os.path.lexists(Path(backward) / "config.json"):  # an export: read
        check_regular(Path(backward), f"--backward {backward}")  # nothing through a link, before work
    c = consolidate(source)
    twin = None
    if backward is not None:
        direction = run_direction(c.config)
        if direction != "forward":
            raise ConfigError(
                f"{source} is a data.direction={direction} run: with --backward, the first run is the "
                "forward LM (data.direction=forward) and the backward one comes after --backward"
            )
        twin = _backward_twin(Path(backward), c, source)
    _check_space(out, c, twin)
    tmp = work_dir(out, "partial")
    try:
        _write(c, tmp)
        if isinstance(twin, Consolidated):
            _write(twin, tmp / BACKWARD)
        elif twin is not None:
            copy_export(twin, tmp / BACKWARD)
        keep_users_files(out, tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError | SafetensorError):  # a full disk, a quota, a read-only directory
            raise PipelineError(
                f"{out}: the export was not written ({_reason(e)}); {out} is as it was: {_AS_IT_WAS}"
            ) from None
        raise
    try:
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PipelineError(
            f"{out}: the export could not be put in place ({_reason(e)}); {out} is as it was: {_AS_IT_WAS}"
        ) from None
    log.info("exported step %d of %s to %s (%d tensors)", c.header["step"], c.checkpoint, out, len(c.state))
    if twin is not None:
        log.info("and the backward LM %s to %s", backward, out / BACKWARD)
    return out
