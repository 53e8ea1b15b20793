"""Sequence parallelism for convolutions.

* short_conv (width w): each chunk needs the w-1 inputs before it, which sit at the end
  of the previous chunk (on the previous rank, or on the same rank at the zigzag turn):
  a halo exchange of ``(w-1) C`` values per chunk and batch row; backward sends their
  gradient back. Requires ``w - 1 <= `` the chunk length.
* long_conv: all-to-all from sequence shards to channel shards (C % P == 0), the FFT
  convolution over the full length on C/P channels, all-to-all back.
"""
from __future__ import annotations

import torch

from ..ops.long_conv import long_conv as local_long_conv
from ..ops.short_conv import short_conv as local_short_conv
from ..ops.validate import check_cu_seqlens, check_tensor, fail
from ._geometry import chunk_pieces
from ._reshard import channels_to_seq, seq_to_channels
from ._util import dtype_code, offsets_digest


class _Halo(torch.autograd.Function):
    """``(x, halos)``: ``x`` passed through and, per local chunk, the ``width`` inputs
    before it (B, width, C) (zeros before the sequence start)."""

    @staticmethod
    def forward(ctx, sp, geo, width, x):
        n = geo.n_chunks
        sends, recvs, halos = [], [], []
        for i, c in enumerate(geo.chunks):
            b = geo.local_span(i)[1]
            if c + 1 < n and geo.owner(c + 1) != sp.rank:
                sends.append((x[:, b - width:b], geo.owner(c + 1)))
        for i, c in enumerate(geo.chunks):
            a = geo.local_span(i)[0]
            if c == 0:
                halos.append(x.new_zeros(x.shape[0], width, x.shape[2]))
            elif geo.owner(c - 1) == sp.rank:  # zigzag turn: the previous chunk is local
                halos.append(x[:, a - width:a].clone())
            else:
                buf = x.new_empty(x.shape[0], width, x.shape[2])
                recvs.append((buf, geo.owner(c - 1)))
                halos.append(buf)
        sp.comm.send_recv(sends, recvs, "short_conv").wait()
        ctx.sp, ctx.geo, ctx.width = sp, geo, width
        return x.view_as(x), torch.stack(halos)

    @staticmethod
    def backward(ctx, dx, dhalos):
        sp, geo, width = ctx.sp, ctx.geo, ctx.width
        n = geo.n_chunks
        dx = dx.clone()
        sends, recvs, got = [], [], []
        for i, c in enumerate(geo.chunks):
            a = geo.local_span(i)[0]
            if c == 0:
                continue
            if geo.owner(c - 1) == sp.rank:
                dx[:, a - width:a] += dhalos[i]
            else:
                sends.append((dhalos[i], geo.owner(c - 1)))
        for i, c in enumerate(geo.chunks):
            b = geo.local_span(i)[1]
            if c + 1 < n and geo.owner(c + 1) != sp.rank:
                buf = torch.empty_like(dhalos[i])
                recvs.append((buf, geo.owner(c + 1)))
                got.append((b, buf))
        sp.comm.send_recv(sends, recvs, "short_conv.backward").wait()
        for b, buf in got:
            dx[:, b - width:b] += buf
        return None, None, None, dx


def sp_short_conv(sp, x, weight, bias, *, activation, initial_state, output_final_state,
                  cu_seqlens):
    """Sequence-parallel short convolution (called by ``ops.short_conv(..., sp=sp)``).

    x: this rank's shard (B, T/P, C); weight (C, w), bias: replicated (sum their
    gradients over the group). cu_seqlens: the global packed offsets on every rank.
    initial_state: the same (N, C, w-1) tensor (or None) on every rank; row n is read
    where sequence / document n starts (and by the next chunk while the document is
    shorter than w - 1 there); sum its gradient over the group.
    Returns y (B, T/P, C) and, if ``output_final_state``, (not packed) (B, C, w-1): the
    last w-1 inputs up to this rank's last token, i.e. the single-device final state on
    the rank holding the last token (rank P-1 contiguous, rank 0 zigzag); (packed) (N, C, w-1) with the final
    state of each document that ends on this rank and zeros for the others.
    """
    B, Tl, C = x.shape
    w = weight.shape[1]
    width = w - 1

    def validate():
        geo = sp.geometry(Tl, "x")
        if width > geo.chunk_len:
            fail("weight", f"a width w with w - 1 <= {geo.chunk_len} tokens per chunk under SP "
                 "(the halo comes from the previous chunk only); use fewer ranks or longer "
                 "sequences", f"w = {w}")
        offsets = check_cu_seqlens(cu_seqlens, B, geo.total, x.device)
        N = B if offsets is None else len(offsets) - 1
        if initial_state is not None:
            check_tensor("initial_state", initial_state, shape=(N, C, width))
        return geo, offsets, N

    desc = {"B": B, "T/P": Tl, "C": C, "w": w, "x dtype": dtype_code(x),
            "initial_state dtype": dtype_code(initial_state), **offsets_digest(cu_seqlens)}
    geo, offsets, N = sp.agree("x", desc, validate)
    if width > 0:
        x, halos = _Halo.apply(sp, geo, width, x)
    else:
        halos = x.new_zeros(len(geo.chunks), B, 0, C)

    def init_row(d):
        if initial_state is None:
            return x.new_zeros(C, width)
        return initial_state[d].to(x.dtype)

    ys, finals = [], {}
    for i in range(len(geo.chunks)):
        a, b = geo.local_span(i)
        pieces = chunk_pieces(geo, i, offsets)
        if offsets is None:
            init = halos[i].transpose(1, 2) if pieces[0].head else initial_state
            y, fin = local_short_conv(x[:, a:b], weight, bias, activation, initial_state=init,
                                      output_final_state=True)
            finals["last"] = fin
        else:
            inits = []
            for p in pieces:
                if p.head:  # the document's inputs before this chunk, after its initial state
                    keep = min(width, p.start - offsets[p.doc])
                    inits.append(torch.cat([init_row(p.doc), halos[i][0, width - keep:].t()], 1)[:, -width:]
                                 if width else init_row(p.doc))
                else:
                    inits.append(init_row(p.doc))
            local = torch.tensor([p.local - a for p in pieces] + [b - a], dtype=torch.int32,
                                 device=x.device)
            y, fin = local_short_conv(x[:, a:b], weight, bias, activation,
                                      initial_state=torch.stack(inits), output_final_state=True,
                                      cu_seqlens=local)
            finals.update({p.doc: fin[j] for j, p in enumerate(pieces) if p.ends})
        ys.append(y)
    y = torch.cat(ys, 1)
    if not output_final_state:
        return y, None
    if offsets is None:
        return y, finals["last"]
    zero = x.new_zeros(C, width)
    return y, torch.stack([finals.get(d, zero) for d in range(N)])


def sp_long_conv(sp, x, kernel, *, cu_seqlens=None):
    """Sequence-parallel long convolution (called by ``ops.long_conv(..., sp=sp)``).

    x: this rank's shard (B, T/P, C) with C divisible by P; kernel (C, L), L <= T (the
    global length), the same on every rank: each rank uses, and gets the gradient of,
    its C/P rows (sum the kernel's gradient over the group). cu_seqlens: the global
    packed offsets (B == 1) on every rank, or None. After the all-to-all each rank holds
    the whole sequence of its channels, so packed documents are convolved as on one
    device. Returns y (B, T/P, C).
    """
    B, Tl, C = x.shape
    P = sp.world

    def validate():
        if C % P:
            fail("x", f"a channel count divisible by the SP world size {P} (long_conv reshards "
                 "channels by all-to-all)", f"{C} channels")
        geo = sp.geometry(Tl, "x")
        check_cu_seqlens(cu_seqlens, B, geo.total, x.device)
        return geo

    desc = {"B": B, "T/P": Tl, "C": C, "L": kernel.shape[1], "x dtype": dtype_code(x),
            "kernel dtype": dtype_code(kernel), **offsets_digest(cu_seqlens)}
    geo = sp.agree("x", desc, validate)
    cs = C // P
    xc = seq_to_channels(sp, geo, x, 2, "long_conv")
    y = local_long_conv(xc, kernel[sp.rank * cs:(sp.rank + 1) * cs], cu_seqlens=cu_seqlens)
    return channels_to_seq(sp, geo, y, 2, "long_conv")
