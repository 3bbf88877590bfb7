"""The recurrences as ``torch.library`` custom ops, with autograd, dispatched to a backend.

Dispatch: Triton for CUDA tensors, the PyTorch reference otherwise; ``RNNPIPE_KERNELS=reference``
or ``=triton`` forces one (Triton on CPU needs ``TRITON_INTERPRET=1`` set before Triton is
imported: the interpreter, for tests). Registered as custom ops with fake (meta) implementations,
so ``torch.compile`` traces through them as single nodes.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

from rnnpipe.kernels import reference


class _TritonBackend:
    """The Triton kernels, imported on first use (Triton is optional off Linux and CUDA)."""

    def __init__(self) -> None:
        try:
            scan = importlib.import_module("rnnpipe.kernels.triton_scan")
            rnn = importlib.import_module("rnnpipe.kernels.triton_rnn")
        except ImportError as e:
            raise RuntimeError(f"the Triton kernels cannot be loaded: {e}") from e
        self.scan_fwd, self.scan_bwd = scan.scan_fwd, scan.scan_bwd
        self.lrn_fwd, self.lrn_bwd = rnn.lrn_fwd, rnn.lrn_bwd
        self.lrn_packed_fwd, self.lrn_packed_bwd = rnn.lrn_packed_fwd, rnn.lrn_packed_bwd
        self.olrn_fwd, self.olrn_bwd = rnn.olrn_fwd, rnn.olrn_bwd
        self.sru_fwd, self.sru_bwd = rnn.sru_fwd, rnn.sru_bwd


_triton: _TritonBackend | ModuleType | None = None


def backend(x: Tensor) -> ModuleType | _TritonBackend:
    """The implementation for tensors like ``x``: the reference module or the Triton backend."""
    global _triton
    choice = os.environ.get("RNNPIPE_KERNELS", "").strip().lower()
    if choice not in ("", "reference", "triton"):
        raise ValueError(f"RNNPIPE_KERNELS must be 'reference' or 'triton', not {choice!r}")
    if choice == "reference" or (choice == "" and not x.is_cuda):
        return reference
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "RNNPIPE_KERNELS=triton with CPU tensors needs TRITON_INTERPRET=1 set before import"
        )
    if x.dtype == torch.float64:
        raise TypeError("the Triton kernels take float32, bfloat16 or float16; float64 runs on the reference")
    if _triton is None:
        try:
            _triton = _TritonBackend()
        except RuntimeError:
            if choice == "triton":
                raise
            warnings.warn("Triton is unavailable: the recurrences run on the PyTorch reference", stacklevel=2)
            _triton = reference  # type: ignore[assignment]
    return _triton


def _opt(t: Tensor | None, like: Tensor) -> Tensor:
    """Custom ops return tensors only: an empty one stands for "no gradient"."""
    return like.new_empty(0) if t is None else t


def _none(t: Tensor) -> Tensor | None:
    return None if t.numel() == 0 else t


# ------------------------------------------------------------------------------------- linear scan


@torch.library.custom_op("rnnpipe::linear_scan", mutates_args=())
def linear_scan_op(a: Tensor, b: Tensor, h0: Tensor | None) -> Tensor:
    return backend(a).scan_fwd(a, b, h0).contiguous()


@linear_scan_op.register_fake
def _(a, b, h0):
    return torch.empty_like(a)


@torch.library.custom_op("rnnpipe::linear_scan_backward", mutates_args=())
def linear_scan_backward_op(
    a: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    da, db, dh0 = backend(a).scan_bwd(a, h, h0, dh)
    return da.contiguous(), db.contiguous(), _opt(dh0, a)


@linear_scan_backward_op.register_fake
def _(a, h, h0, dh):
    return (
        torch.empty_like(a),
        torch.empty_like(dh),
        torch.empty_like(h0) if h0 is not None else a.new_empty(0),
    )


def _scan_setup(ctx, inputs, output):
    a, _, h0 = inputs
    ctx.has_h0 = h0 is not None
    ctx.save_for_backward(a, output, h0)


def _scan_backward(ctx, dh):
    a, h, h0 = ctx.saved_tensors
    da, db, dh0 = linear_scan_backward_op(a, h, h0, dh.contiguous())
    return da, db, _none(dh0) if ctx.has_h0 else None


linear_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup)


# ------------------------------------------------------------------------------------ LRN and oLRN


@torch.library.custom_op("rnnpipe::lrn", mutates_args=())
def lrn_op(q: Tensor, k: Tensor, v: Tensor, h0: Tensor | None) -> Tensor:
    return backend(q).lrn_fwd(q, k, v, h0).contiguous()


@lrn_op.register_fake
def _(q, k, v, h0):
    return torch.empty_like(q)


@torch.library.custom_op("rnnpipe::lrn_backward", mutates_args=())
def lrn_backward_op(
    q: Tensor, k: Tensor, v: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, dh0 = backend(q).lrn_bwd(q, k, v, h, h0, dh)
    return dq, dk, dv, _opt(dh0, q)


@lrn_backward_op.register_fake
def _(q, k, v, h, h0, dh):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(h0) if h0 is not None else q.new_empty(0),
    )


def _lrn_setup(ctx, inputs, output):
    q, k, v, h0 = inputs
    ctx.has_h0 = h0 is not None
    ctx.save_for_backward(q, k, v, output, h0)


def _lrn_backward(ctx, dh):
    q, k, v, h, h0 = ctx.saved_tensors
    dq, dk, dv, dh0 = lrn_backward_op(q, k, v, h, h0, dh.contiguous())
    return dq, dk, dv, _none(dh0) if ctx.has_h0 else None


lrn_op.register_autograd(_lrn_backward, setup_context=_lrn_setup)


@torch.library.custom_op("rnnpipe::olrn", mutates_args=())
def olrn_op(q: Tensor, k: Tensor, v: Tensor, o: Tensor, h0: Tensor | None) -> Tensor:
    return backend(q).olrn_fwd(q, k, v, o, h0).contiguous()


@olrn_op.register_fake
def _(q, k, v, o, h0):
    return torch.empty_like(q)


@torch.library.custom_op("rnnpipe::olrn_backward", mutates_args=())
def olrn_backward_op(
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dq, dk, dv, do, dh0 = backend(q).olrn_bwd(q, k, v, o, h, h0, dh)
    return dq, dk, dv, do, _opt(dh0, q)


@olrn_backward_op.register_fake
def _(q, k, v, o, h, h0, dh):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(o),
        torch.empty_like(h0) if h0 is not None else q.new_empty(0),
    )


def _olrn_setup(ctx, inputs, output):
    q, k, v, o, h0 = inputs
    ctx.has_h0 = h0 is not None
    ctx.save_for_backward(q, k, v, o, output, h0)


def _olrn_backward(ctx, dh):
    q, k, v, o, h, h0 = ctx.saved_tensors
    dq, dk, dv, do, dh0 = olrn_backward_op(q, k, v, o, h, h0, dh.contiguous())
    return dq, dk, dv, do, _none(dh0) if ctx.has_h0 else None


olrn_op.register_autograd(_olrn_backward, setup_context=_olrn_setup)


# ------------------------------------------------------------- LRN and oLRN on one packed projection


@torch.library.custom_op("rnnpipe::lrn_packed", mutates_args=())
def lrn_packed_op(p: Tensor, h0: Tensor | None, gated: bool) -> Tensor:
    return backend(p).lrn_packed_fwd(p, h0, gated).contiguous()


@lrn_packed_op.register_fake
def _(p, h0, gated):
    B, T, n = p.shape
    return p.new_empty(B, T, n // (4 if gated else 3))


@torch.library.custom_op("rnnpipe::lrn_packed_backward", mutates_args=())
def lrn_packed_backward_op(
    p: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, gated: bool
) -> tuple[Tensor, Tensor]:
    dp, dh0 = backend(p).lrn_packed_bwd(p, h, h0, dh, gated)
    return dp, _opt(dh0, p)


@lrn_packed_backward_op.register_fake
def _(p, h, h0, dh, gated):
    return torch.empty_like(p), torch.empty_like(h0) if h0 is not None else p.new_empty(0)


def _packed_setup(ctx, inputs, output):
    p, h0, gated = inputs
    ctx.has_h0, ctx.gated = h0 is not None, gated
    ctx.save_for_backward(p, output, h0)


def _packed_backward(ctx, dh):
    p, h, h0 = ctx.saved_tensors
    dp, dh0 = lrn_packed_backward_op(p, h, h0, dh.contiguous(), ctx.gated)
    return dp, _none(dh0) if ctx.has_h0 else None, None


lrn_packed_op.register_autograd(_packed_backward, setup_context=_packed_setup)


def packed_source(xs: tuple[Tensor, ...]) -> Tensor | None:
    """The [B, T, n·D] tensor whose column blocks are exactly ``xs`` (n = len(xs)), or None.

    A mixer's ``proj(x).chunk(3, -1)`` gives such views. The packed ops then take that tensor
    itself, and their gradient is one tensor: no ``cat`` of n gradients (a fresh allocation and
    a copy of n·B·T·D elements; the Triton kernels write the gradients into the column blocks of
    one tensor, as they read q, k, v from the projection's). Not under ``torch.compile``, which
    fuses that.
    """
    if torch.compiler.is_compiling():
        return None
    # nn.Linear on [B, T, D] computes on the flattened [B·T, D] input, so its output is itself a
    # view and the chunks' _base is the [B·T, n·D] matmul result: any contiguous base of exactly
    # B·T·n·D elements, viewed as [B, T, n·D], is the projection.
    base = xs[0]._base
    B, T, D = xs[0].shape
    shape, strides = (B, T, len(xs) * D), (T * len(xs) * D, len(xs) * D, 1)
    if base is None or base.numel() != B * T * len(xs) * D or not base.is_contiguous():
        return None
    for j, x in enumerate(xs):
        offset = base.storage_offset() + j * D
        if x._base is not base or x.stride() != strides or x.storage_offset() != offset:
            return None
    return base if base.shape == shape else base.view(shape)


def lrn_family(q: Tensor, k: Tensor, v: Tensor, o: Tensor | None, h0: Tensor | None) -> Tensor:
    """h [B, T, D] of LRN (``o`` None) or oLRN: the packed op when q, k, v (, o) are the column
    blocks of one tensor (on either backend), else the plain op."""
    xs = (q, k, v) if o is None else (q, k, v, o)
    p = packed_source(xs)
    if p is not None:
        return lrn_packed_op(p, h0, o is not None)
    return lrn_op(q, k, v, h0) if o is None else olrn_op(q, k, v, o, h0)


# ---------------------------------------------------------------------------------------------- SRU


@torch.library.custom_op("rnnpipe::sru", mutates_args=())
def sru_op(
    u: Tensor, fp: Tensor, rp: Tensor, x: Tensor, vf: Tensor, vr: Tensor, c0: Tensor | None
) -> tuple[Tensor, Tensor]:
    h, c = backend(u).sru_fwd(u, fp, rp, x, vf, vr, c0)
    return h.contiguous(), c.contiguous()


@sru_op.register_fake
def _(u, fp, rp, x, vf, vr, c0):
    return torch.empty_like(u), torch.empty_like(u)


@torch.library.custom_op("rnnpipe::sru_backward", mutates_args=())
def sru_backward_op(
    u: Tensor,
    fp: Tensor,
    rp: Tensor,
    x: Tensor,
    vf: Tensor,
    vr: Tensor,
    c0: Tensor | None,
    c: Tensor,
    dh: Tensor,
    dc: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    du, dfp, drp, dx, dvf, dvr, dc0 = backend(u).sru_bwd(u, fp, rp, x, vf, vr, c0, c, dh, dc)
    return du, dfp, drp, dx, dvf, dvr, _opt(dc0, u)


@sru_backward_op.register_fake
def _(u, fp, rp, x, vf, vr, c0, c, dh, dc):
    like = [torch.empty_like(t) for t in (u, fp, rp, x, vf, vr)]
    return (*like, torch.empty_like(c0) if c0 is not None else u.new_empty(0))


def _sru_setup(ctx, inputs, output):
    u, fp, rp, x, vf, vr, c0 = inputs
    ctx.has_c0 = c0 is not None
    ctx.save_for_backward(u, fp, rp, x, vf, vr, c0, output[1])


def _sru_backward(ctx, dh, dc):
    u, fp, rp, x, vf, vr, c0, c = ctx.saved_tensors
    dh = torch.zeros_like(u) if dh is None else dh.contiguous()
    # dc is None in the usual case (only h is used): both backends take an empty tensor for zeros.
    dc = u.new_empty(0) if dc is None else dc.contiguous()
    du, dfp, drp, dx, dvf, dvr, dc0 = sru_backward_op(u, fp, rp, x, vf, vr, c0, c, dh, dc)
    return du, dfp, drp, dx, dvf, dvr, _none(dc0) if ctx.has_c0 else None


sru_op.register_autograd(_sru_backward, setup_context=_sru_setup)
