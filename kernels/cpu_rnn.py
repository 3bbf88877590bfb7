"""LRN, oLRN and SRU on CPU: a lean forward loop, and a backward made of linear scans.

Forward: the recurrences are nonlinear in the state, so T sequential steps remain. LRN's and
oLRN's run in C where it could be built (:mod:`rnnpipe.kernels.cpu_native`); otherwise, and for SRU, each
step is 3–6 fused ``out=`` ops into preallocated [B, D] buffers and its slice of the output (no per-step
allocation), under ``torch.inference_mode`` (less dispatch work per op; the outputs themselves
are allocated outside it, so autograd can save them). LRN's two gates are one op:
σ([q_t, k_t] + [−1, 1] ⊙ h) = [f, i] over a [B, 2, D] view (the projection's q and k are adjacent
columns, so that view is free; otherwise one stack). SRU's reset gate and output do not feed
back, so they are computed after the loop, vectorized.

Backward: dL/dh_{t−1} = dh_{t−1} + M_t ⊙ dL/dh_t, where M_t (the Jacobian's diagonal) depends only
on forward values. So blocks of time steps (about 512 KiB per intermediate) run from last to
first: each computes its M and the element-wise factors of its gradients in one go, solves its
carry as a reverse linear scan (:func:`rnnpipe.kernels.cpu_scan.scan_into`) from what the later block
left, and writes its gradients while its intermediates are still in cache. Nothing is computed
twice, the intermediates are reused buffers (no fresh full-size temporaries: once past glibc's
mmap threshold those are new zeroed pages on every call), and the only full-size allocations
are the gradients themselves.

Shapes: inputs [B, T, D] (any batch and time strides with D contiguous), states [B, D], vf/vr [D].
Computes in float32 (float64 stays float64); outputs in the input dtype.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from rnnpipe.kernels import cpu_native
from rnnpipe.kernels.cpu_scan import compute_dtype, scan_into, scratch

_BLOCK_ELEMS = 1 << 17  # elements per block of the element-wise passes: 512 KiB in float32


def _blocks_reversed(B: int, T: int, D: int) -> Iterator[tuple[int, int]]:
    """Time ranges [t0, t1) of about _BLOCK_ELEMS elements each, the last first."""
    step = max(1, _BLOCK_ELEMS // max(1, B * D))
    for t0 in reversed(range(0, T, step)):
        yield t0, min(T, t0 + step)


def _scratch(like: Tensor, dtype: torch.dtype, count: int) -> list[Tensor]:
    """``count`` reused [B, Tb, D] block buffers (see :func:`rnnpipe.kernels.cpu_scan.scratch`)."""
    B, T, D = like.shape
    Tb = min(T, max(1, _BLOCK_ELEMS // max(1, B * D)))
    return [scratch(f"block{i}", (B, Tb, D), dtype, like.device) for i in range(count)]


def _prev(h: Tensor, s: Tensor | None, t0: int, t1: int, buf: Tensor) -> Tensor:
    """h_{t−1} for t in [t0, t1): a view of ``h``, except that the first block starts from s (or 0)."""
    if t0 > 0:
        return h[:, t0 - 1 : t1 - 1]
    if s is None:
        buf[:, 0].zero_()
    else:
        buf[:, 0].copy_(s)
    buf[:, 1:].copy_(h[:, : t1 - 1])
    return buf


def _pair(q: Tensor, k: Tensor) -> Tensor:
    """[q_t, k_t] as one [B, T, 2, D] tensor: a view when k's columns follow q's in one storage."""
    B, T, D = q.shape
    adjacent = (
        q.dtype == k.dtype
        and q.stride() == k.stride()
        and q.stride(2) == 1
        and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        and k.storage_offset() - q.storage_offset() == D
    )
    if adjacent:
        return q.as_strided((B, T, 2, D), (q.stride(0), q.stride(1), D, 1), q.storage_offset())
    return torch.stack([q, k], 2)


def _out(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _carry_into(g: Tensor, dh_last: Tensor, carry: Tensor | None) -> None:
    """g's last step: dh there plus what the later block carries back (nothing for the last block)."""
    if carry is None:
        g[:, -1].copy_(dh_last)
    else:
        torch.add(dh_last, carry, out=g[:, -1])


# ------------------------------------------------------------------------------------ LRN and oLRN


@torch.no_grad()
def lrn_family_fwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor | None, h0: Tensor | None) -> Tensor:
    """h_BTD of LRN (``o`` None: h_t = tanh(c_t)) or oLRN (h_t = σ(o_t − c_t) ⊙ c_t), where
    c_t = i_t ⊙ v_t + f_t ⊙ h_{t−1}, i_t = σ(k_t + h_{t−1}), f_t = σ(q_t − h_{t−1})."""
    native = cpu_native.forward(q, k, v, o, h0)  # the loop in C, where it is built
    if native is not None:
        return native
    B, T, D = q.shape
    cd = compute_dtype(q)
    out = torch.empty(B, T, D, dtype=cd, device=q.device)
    # Every per-step tensor is [B, 1, D] (or [B, 2, D]): one layout, so each op writes straight
    # into its destination (the output's step, or a half of a pair) and no step needs a squeeze.
    # oLRN's output is one glu over z = [c_t, o_t − c_t]: c_t ⊙ σ(o_t − c_t) in one op, not three.
    with torch.inference_mode():
        sign = torch.tensor([-1.0, 1.0], dtype=cd, device=q.device).view(2, 1)
        qk_t = _pair(q, k).unbind(1)
        v_t = v.unsqueeze(2).unbind(1)
        o_t = o.unsqueeze(2).unbind(1) if o is not None else None
        out_t = out.unsqueeze(2).unbind(1)  # h_t as [B, 1, D]
        gates = q.new_empty(B, 2, D, dtype=cd)  # [f, i]
        z = q.new_empty(B, 2, D, dtype=cd)  # [c, o − c] (oLRN); c alone in z[:, :1] (LRN)
        f, i, c, oc = gates[:, :1], gates[:, 1:], z[:, :1], z[:, 1:]
        h = q.new_zeros(B, 1, D, dtype=cd) if h0 is None else h0.to(cd).unsqueeze(1)
        for t in range(T):
            torch.addcmul(qk_t[t], sign, h, out=gates).sigmoid_()  # σ([q_t − h, k_t + h])
            torch.mul(f, h, out=c)
            torch.addcmul(c, i, v_t[t], out=c)
            if o_t is None:
                torch.tanh(c, out=out_t[t])
            else:
                torch.sub(o_t[t], c, out=oc)
                torch._C._nn.glu(z, 1, out=out_t[t])  # z[:, :1] ⊙ σ(z[:, 1:])
            h = out_t[t]
    return _out(out, q.dtype)


@torch.no_grad()
def lrn_family_bwd(q, k, v, o, h, h0, dh, into: Tensor | None = None):
    """Gradients of :func:`lrn_family_fwd`: (dq, dk, dv, dh0) for LRN, (dq, dk, dv, do, dh0) for oLRN.

    With i, f, c recomputed from h_{t−1}: W = dh_t/dc_t is 1 − h_t² (LRN) or og − c·og(1 − og)
    with og = σ(o_t − c) (oLRN); Ki = v·i(1 − i), Qf = h_{t−1}·f(1 − f). The carry g = dL/dh_t obeys
    g_{t−1} = dh_{t−1} + M_t ⊙ g_t with M_t = W·(f + Ki − Qf); then dc = g·W, dk = dc·Ki,
    dq = dc·Qf, dv = dc·i (and do = g·c·og(1 − og)).

    ``into`` (optional, [B, T, 3·D] or [B, T, 4·D] in the compute dtype): the gradients are written
    into its column blocks (q, k, v, o in order) and returned as views of it: the gradient of a
    packed projection without a ``cat``.
    """
    B, T, D = q.shape
    cd = compute_dtype(q)
    gated = o is not None
    if into is None:  # separate tensors: a custom op's outputs may not alias each other
        dq, dk, dv, *rest = (torch.empty(B, T, D, dtype=cd, device=q.device) for _ in range(3 + gated))
    else:
        dq, dk, dv, *rest = into.unflatten(2, (-1, D)).unbind(2)
    do = rest[0] if gated else None
    bufs = _scratch(q, cd, 9)
    with torch.inference_mode():
        one = torch.ones((), dtype=cd, device=q.device)
        carry = None  # M_{t1} ⊙ g_{t1}: what the block after this one adds to g_{t1−1}
        for t0, t1 in _blocks_reversed(B, T, D):
            Ig, F, W, A, Ki, Qf, P, M, g = (b[:, : t1 - t0] for b in bufs)
            hp = _prev(h, h0, t0, t1, P)
            qb, kb, vb = q[:, t0:t1], k[:, t0:t1], v[:, t0:t1]
            torch.add(kb, hp, out=Ig).sigmoid_()
            torch.sub(qb, hp, out=F).sigmoid_()
            if gated:
                torch.mul(F, hp, out=A).addcmul_(Ig, vb)  # c
                torch.sub(o[:, t0:t1], A, out=W).sigmoid_()  # og
                A.mul_(W).addcmul_(A, W, value=-1.0)  # c·og(1 − og)
                W.sub_(A)
            else:
                torch.addcmul(one, h[:, t0:t1], h[:, t0:t1], value=-1.0, out=W)
            torch.addcmul(Ig, Ig, Ig, value=-1.0, out=Ki).mul_(vb)
            torch.addcmul(F, F, F, value=-1.0, out=Qf).mul_(hp)
            torch.add(F, Ki, out=M).sub_(Qf).mul_(W)
            _carry_into(g, dh[:, t1 - 1], carry)
            if t1 - t0 > 1:
                scan_into(M[:, 1:], dh[:, t0 : t1 - 1], g[:, -1], g[:, :-1], reverse=True)
            carry = M[:, 0] * g[:, 0]  # M_{t0} ⊙ g_{t0}; for t0 = 0 that is dL/dh0
            if gated:
                torch.mul(g, A, out=do[:, t0:t1])
            W.mul_(g)  # dc
            torch.mul(W, Qf, out=dq[:, t0:t1])
            torch.mul(W, Ki, out=dk[:, t0:t1])
            torch.mul(W, Ig, out=dv[:, t0:t1])
    dh0 = None if h0 is None else carry.to(h0.dtype, copy=True)  # a normal tensor, not an inference one
    grads = [_out(dq, q.dtype), _out(dk, k.dtype), _out(dv, v.dtype)]
    return (*grads, dh0) if not gated else (*grads, _out(do, o.dtype), dh0)


def lrn_packed_fwd(p: Tensor, h0: Tensor | None, gated: bool) -> Tensor:
    """:func:`lrn_family_fwd` on p_BT(nD) = [q | k | v (| o)] (n = 4 when ``gated``, else 3): h_BTD."""
    q, k, v, *o = p.chunk(4 if gated else 3, dim=-1)
    return lrn_family_fwd(q, k, v, o[0] if gated else None, h0)


def lrn_packed_bwd(p: Tensor, h: Tensor, h0: Tensor | None, dh: Tensor, gated: bool):
    """(dp_BT(nD), dh0_BD or None) of :func:`lrn_packed_fwd`: all gradients in one tensor."""
    q, k, v, *o = p.chunk(4 if gated else 3, dim=-1)
    dp = torch.empty(p.shape, dtype=compute_dtype(p), device=p.device)
    *_, dh0 = lrn_family_bwd(q, k, v, o[0] if gated else None, h, h0, dh, into=dp)
    return _out(dp, p.dtype), dh0


# ---------------------------------------------------------------------------------------------- SRU


@torch.no_grad()
def sru_fwd(u, fp, rp, x, vf, vr, c0) -> tuple[Tensor, Tensor]:
    """(h_BTD, c_BTD) of SRU: f_t = σ(fp_t + vf ⊙ c_{t−1}), c_t = f_t ⊙ c_{t−1} + (1 − f_t) ⊙ u_t
    (the loop: 3 ops a step), then r_t = σ(rp_t + vr ⊙ c_{t−1}), h_t = x_t + r_t ⊙ (c_t − x_t)."""
    B, T, D = u.shape
    cd = compute_dtype(u)
    cs = torch.empty(B, T, D, dtype=cd, device=u.device)
    h = torch.empty(B, T, D, dtype=cd, device=u.device)
    P, Y = _scratch(u, cd, 2)
    with torch.inference_mode():
        vf_, vr_ = vf.to(cd), vr.to(cd)
        f = u.new_empty(B, D, dtype=cd)
        c = u.new_zeros(B, D, dtype=cd) if c0 is None else c0.to(cd)
        u_t, fp_t, cs_t = u.unbind(1), fp.unbind(1), cs.unbind(1)
        d = u.new_empty(B, D, dtype=cd)
        for t in range(T):
            torch.addcmul(fp_t[t], vf_, c, out=f).sigmoid_()
            if u.dtype == cd:
                torch.lerp(u_t[t], c, f, out=cs_t[t])  # u + f ⊙ (c − u)
            else:  # lerp takes one dtype only
                torch.addcmul(u_t[t], f, torch.sub(c, u_t[t], out=d), out=cs_t[t])
            c = cs_t[t]
        for t0, t1 in _blocks_reversed(B, T, D):
            n = t1 - t0
            r = h[:, t0:t1]
            torch.addcmul(rp[:, t0:t1], vr_, _prev(cs, c0, t0, t1, P[:, :n]), out=r).sigmoid_()
            torch.sub(cs[:, t0:t1], x[:, t0:t1], out=Y[:, :n]).mul_(r)
            torch.add(x[:, t0:t1], Y[:, :n], out=r)
    return _out(h, u.dtype), _out(cs, u.dtype)


@torch.no_grad()
def sru_bwd(u, fp, rp, x, vf, vr, c0, c, dh, dc):
    """(du, dfp, drp, dx, dvf, dvr, dc0) of :func:`sru_fwd` from dh = dL/dh and dc = dL/dc [B, T, D]
    (an empty dc stands for zeros: no full-size zero tensor when only h is used).

    G_t = dL/dc_t in total = dc_t + dh_t·r_t + vr·R_{t+1} + A_{t+1}·G_{t+1}: a reverse linear scan,
    with R_t = dh_t·(c_t − x_t)·r_t(1 − r_t) (= drp) and A_t = f_t + (c_{t−1} − u_t)·f_t(1 − f_t)·vf.
    Then du = G·(1 − f), dfp = G·(c_{t−1} − u)·f(1 − f), dx = dh·(1 − r), dvf = Σ dfp·c_{t−1},
    dvr = Σ drp·c_{t−1}, dc0 = vr·R_0 + A_0·G_0. Blocks run last to first as in LRN's backward.
    """
    B, T, D = u.shape
    cd = compute_dtype(u)
    du, dfp, drp, dx = (torch.empty(B, T, D, dtype=cd, device=u.device) for _ in range(4))
    dvf, dvr = (torch.zeros(D, dtype=cd, device=u.device) for _ in range(2))
    bufs = _scratch(u, cd, 8)
    with torch.inference_mode():
        vf_, vr_ = vf.to(cd), vr.to(cd)
        carry = None  # A_{t1}·G_{t1} + vr·R_{t1}: what the block after this one adds to G_{t1−1}
        for t0, t1 in _blocks_reversed(B, T, D):
            F, Rg, P, Y, Z, A, E, G = (b[:, : t1 - t0] for b in bufs)
            cp = _prev(c, c0, t0, t1, P)
            dhb, R = dh[:, t0:t1], drp[:, t0:t1]
            torch.addcmul(fp[:, t0:t1], vf_, cp, out=F).sigmoid_()
            torch.addcmul(rp[:, t0:t1], vr_, cp, out=Rg).sigmoid_()
            if dc.numel():
                torch.addcmul(dc[:, t0:t1], dhb, Rg, out=E)
            else:
                torch.mul(dhb, Rg, out=E)
            torch.addcmul(Rg, Rg, Rg, value=-1.0, out=Z).mul_(dhb)
            torch.sub(c[:, t0:t1], x[:, t0:t1], out=Y)
            torch.mul(Y, Z, out=R)
            E[:, :-1].addcmul_(R[:, 1:], vr_)
            torch.addcmul(F, F, F, value=-1.0, out=Z)  # f(1 − f)
            torch.sub(cp, u[:, t0:t1], out=Y)
            torch.mul(Y, Z, out=A).mul_(vf_).add_(F)
            _carry_into(G, E[:, -1], carry)
            if t1 - t0 > 1:
                scan_into(A[:, 1:], E[:, :-1], G[:, -1], G[:, :-1], reverse=True)
            carry = torch.addcmul(A[:, 0] * G[:, 0], R[:, 0], vr_)
            torch.addcmul(G, G, F, value=-1.0, out=du[:, t0:t1])
            dfpb = torch.mul(Z, Y, out=dfp[:, t0:t1]).mul_(G)
            dvf.add_(torch.mul(dfpb, cp, out=Z).sum((0, 1)))
            dvr.add_(torch.mul(R, cp, out=Y).sum((0, 1)))
            torch.addcmul(dhb, dhb, Rg, value=-1.0, out=dx[:, t0:t1])
    dc0 = None if c0 is None else carry.to(c0.dtype, copy=True)
    return (
        _out(du, u.dtype),
        _out(dfp, fp.dtype),
        _out(drp, rp.dtype),
        _out(dx, x.dtype),
        _out(dvf, vf.dtype),
        _out(dvr, vr.dtype),
        dc0,
    )
