"""LRN and oLRN forward on CPU in C (kernels/csrc/lrn_forward.c), built on first use, else None.

The forward recurrence is nonlinear in the state, so T steps stay sequential; in PyTorch each
step is several dispatched ops on a [B, D] slice, and at B·D of a few thousand the dispatch, not
the arithmetic, is the cost. The C loop does a whole batch row in one call, its inner loop over D
vectorized (expf and tanhf from glibc's libmvec). Batch ranges run on ``torch.get_num_threads()``
threads (ctypes releases the GIL), so it takes the cores torch would have used.

Built with the system C compiler (``$CC``, else ``cc``; about a second, no torch headers) into
``$RNNPIPE_NATIVE_CACHE`` (default ``~/.cache/rnnpipe/native``), keyed by the source, the compiler
and this CPU's flags (the build is ``-march=native``), and written atomically, so that ranks
starting together and nodes sharing a home directory each load a whole, matching library. No
compiler, a failed build or ``RNNPIPE_NATIVE=0``: :func:`forward` returns None and callers use the
PyTorch loop (logged once).

The library is code, and its constructors run when it loads. So it is loaded only from a cache
directory owned by this user and writable by no one else (any other: one warning naming it, and
the PyTorch loop), only when it is owned by this user too, and only when its sha256 matches the
one recorded beside it at build time (``lrn_forward-KEY.so.sha256``, a ``sha256sum`` line). A
library that fails that check (truncated, replaced, built by an rnnpipe that kept no record) is
built again before anything maps it, and one that lacks the expected functions is unloaded and
built again; if the rebuilt one still fails, the PyTorch loop runs. Never a crash.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("rnnpipe.kernels")

SOURCE = Path(__file__).with_name("csrc") / "lrn_forward.c"
_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-fno-math-errno"]
_PARALLEL_ELEMS = 1 << 16  # below B·T·D this many, one thread (a thread hand-off costs ~50 µs)
_FUNCS = {torch.float32: "lrn_forward_f32", torch.float64: "lrn_forward_f64"}
_CTYPES = {torch.float32: ctypes.c_float, torch.float64: ctypes.c_double}
_NOT_BUILT, _NO_RECORD = "not built yet", "no sha256 recorded"


def cache_dir() -> Path:
    """Where built libraries are cached: ``$RNNPIPE_NATIVE_CACHE``, else ``~/.cache/rnnpipe/native``."""
    return Path(os.environ.get("RNNPIPE_NATIVE_CACHE") or Path.home() / ".cache" / "rnnpipe" / "native")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path(cc: str) -> Path:
    """The cached library's path for SOURCE built by the compiler ``cc`` on this CPU (built or not):
    ``cache_dir()/lrn_forward-KEY.so``, KEY a sha256 prefix of the source, ``cc --version``, the
    flags and the CPU's flags. Runs ``cc --version`` (milliseconds)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        b"\0".join(x.encode() for x in (SOURCE.read_text(), version, " ".join(_FLAGS), _cpu_flags()))
    ).hexdigest()[:16]
    return cache_dir() / f"lrn_forward-{key}.so"


def record_of(path: Path) -> Path:
    """The file beside the library at ``path`` that holds its sha256 (a ``sha256sum`` line)."""
    return path.with_name(path.name + ".sha256")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def unsafe(path: Path) -> str | None:
    """Why code at ``path`` (a directory or a file) must not be loaded, or None: it must be owned by
    this user and writable by neither its group nor others (follows symlinks)."""
    st = os.stat(path)
    if st.st_uid != os.getuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = " and ".join(
            w for bit, w in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "others")) if st.st_mode & bit
        )
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _build(cc: str, out: Path) -> str | None:
    """Compile SOURCE into ``out`` (with libmvec, then without) and record its sha256 beside it
    (:func:`record_of`), both written atomically; None, or why it failed."""
    tmp = Path(tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)[1])
    why = ""
    try:
        for extra in (["-lmvec", "-lm"], ["-DRNNPIPE_NO_MVEC", "-lm"]):
            cmd = [cc, *_FLAGS, str(SOURCE), "-o", str(tmp), *extra]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                os.chmod(tmp, 0o700)  # (the linker's mode follows the umask: 0o775 under umask 002)
                _write_atomic(record_of(out), f"{_sha256(tmp)}  {out.name}\n")
                os.replace(tmp, out)  # atomic: a rank never loads a half-written library
                return None
            why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return why
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename (mode 0o600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unload(lib: ctypes.CDLL) -> None:
    """dlclose ``lib``, so that loading its path again maps the file now there (the dynamic
    loader hands back an open library of the same path instead)."""
    try:
        import _ctypes

        _ctypes.dlclose(lib._handle)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):
        pass


def _load(path: Path) -> tuple[ctypes.CDLL | None, str]:
    """(the library at ``path``, "") when it passes every check, else (None, why it does not):
    missing, not this user's or writable by others, no sha256 recorded, a sha256 that differs
    from the record (checked before the file is mapped), or a function of _FUNCS missing."""
    if not path.exists():
        return None, _NOT_BUILT
    record = record_of(path)
    try:
        recorded = record.read_text().split()[0]
    except (OSError, IndexError):
        return None, f"{_NO_RECORD} in {record.name}"
    why = unsafe(path) or unsafe(record)
    if why is not None:
        return None, why
    if (sha := _sha256(path)) != recorded:
        return None, f"its sha256 {sha[:16]}… differs from the {recorded[:16]}… recorded when it was built"
    lib = ctypes.CDLL(str(path))
    missing = [name for name in _FUNCS.values() if not hasattr(lib, name)]
    if missing:
        _unload(lib)
        return None, f"it lacks {', '.join(missing)}"
    return lib, ""


def _checked_or_built(cc: str) -> ctypes.CDLL | None:
    """The cached library when it passes :func:`_load`'s checks, else built again and checked;
    None (the PyTorch loop) when the cache is not private or the build fails its checks."""
    path = library_path(cc)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (why := unsafe(path.parent)) is not None:
        log.warning(
            "the native build cache %s %s, so a library in it could be anyone's code: not loading it, "
            "LRN/oLRN on CPU use the PyTorch loop. Make it private (chmod go-w %s, owned by you) or "
            "set RNNPIPE_NATIVE_CACHE to a directory of your own",
            path.parent,
            why,
            path.parent,
        )
        return None
    lib, why = _load(path)
    if lib is not None:
        return lib
    if why != _NOT_BUILT:  # (one built before the records: said quietly)
        log.log(
            logging.INFO if why.startswith(_NO_RECORD) else logging.WARNING,
            "%s: %s; building it again",
            path,
            why,
        )
    if (failed := _build(cc, path)) is not None:
        log.warning("building %s failed (%s): LRN/oLRN on CPU use the PyTorch loop", SOURCE.name, failed)
        return None
    lib, why = _load(path)
    if lib is None:
        log.warning("%s, just built: %s; LRN/oLRN on CPU use the PyTorch loop", path, why)
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled library (built now if this source, compiler and CPU have none yet, or if the
    cached one fails its checks), or None: no compiler, ``RNNPIPE_NATIVE=0``, a cache directory
    others can write, or a build that failed."""
    if os.environ.get("RNNPIPE_NATIVE", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        log.info("no C compiler (%s): LRN/oLRN on CPU use the PyTorch loop", os.environ.get("CC", "cc"))
        return None
    try:
        lib = _checked_or_built(cc)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("the C forward (%s) failed (%s): LRN/oLRN on CPU use the PyTorch loop", SOURCE.name, e)
        return None
    if lib is None:
        return None
    for dtype, name in _FUNCS.items():
        ptr = ctypes.POINTER(_CTYPES[dtype])
        getattr(lib, name).argtypes = [ptr, ptr, ptr, ptr, ctypes.POINTER(ctypes.c_int64), ptr, ptr] + [
            ctypes.c_int64
        ] * 3
        getattr(lib, name).restype = None
    return lib


@functools.cache
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(n, thread_name_prefix="rnnpipe-lrn")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the threads


def forward(q: Tensor, k: Tensor, v: Tensor, o: Tensor | None, h0: Tensor | None) -> Tensor | None:
    """h_BTD of LRN (``o`` None) or oLRN, as :func:`rnnpipe.kernels.cpu_rnn.lrn_family_fwd` computes it, or
    None where this path does not apply: no library, not CPU, not float32/float64 throughout, or
    a D that is not contiguous. q, k, v, o [B, T, D]; h0 [B, D] or None."""
    xs = (q, k, v) if o is None else (q, k, v, o)
    dtype = q.dtype
    if dtype not in _FUNCS or any(x.device.type != "cpu" or x.dtype != dtype or x.stride(2) != 1 for x in xs):
        return None
    if h0 is not None and (h0.device.type != "cpu" or h0.dtype != dtype):
        return None
    lib = library()
    if lib is None:
        return None
    B, T, D = q.shape
    out = torch.empty(B, T, D, dtype=dtype)
    h0 = h0.contiguous() if h0 is not None else None
    strides = (ctypes.c_int64 * 8)(*(s for x in (q, k, v, o if o is not None else q) for s in x.stride()[:2]))
    ptr = ctypes.POINTER(_CTYPES[dtype])
    fn = getattr(lib, _FUNCS[dtype])

    def rows(b0: int, b1: int) -> None:
        def at(x: Tensor | None, row_stride: int):
            return None if x is None else ctypes.cast(x.data_ptr() + b0 * row_stride * x.element_size(), ptr)

        fn(
            at(q, q.stride(0)), at(k, k.stride(0)), at(v, v.stride(0)),
            at(o, o.stride(0) if o is not None else 0), strides,
            at(h0, D), at(out, T * D), b1 - b0, T, D,
        )  # fmt: skip

    n = min(torch.get_num_threads(), B) if B * T * D >= _PARALLEL_ELEMS else 1
    if n <= 1:
        rows(0, B)
    else:
        cuts = [B * j // n for j in range(n + 1)]
        for f in [_pool(n).submit(rows, cuts[j], cuts[j + 1]) for j in range(n)]:
            f.result()
    return out
