"""Sequence parallelism for softmax attention.

Strategies (``sp.attn_strategy``):

* ``'ring'``: the key/value shards circulate around the ring (rank r sends to r+1), each
  rank attends its queries to every shard it sees and merges the partial results by
  log-sum-exp; sending the next shard overlaps computing with the current one. Backward
  by ring as well: the key/value shards circulate again together with their float32
  gradient accumulators, each rank adding its share computed by the kernels' backward
  from the final (o, lse); after P hops every accumulator is home. Per rank and call:
  forward ``(P-1) (|k| + |v|)`` bytes, backward ``(P-1) (|k| + |v|)`` plus ``P (|k| +
  |v|)`` float32 gradient bytes. Zigzag balances the causal mask.
* ``'allgather'``: all-gather keys and values once, attend locally; backward
  reduce-scatters their gradients. ``(P-1) (|k| + |v|)`` forward and ``(P-1) (|k| +
  |v|)`` float32 backward; memory O(T) for K and V.
* ``'alltoall'`` (Ulysses): all-to-all from sequence shards to head shards, full-length
  attention on H/P heads, all-to-all back; needs H and the key/value heads divisible by P.

Blocks (ring and all-gather). A shard's chunks lie in increasing global order, so its
queries against its own keys are one causal block. Against another shard, the blocks are
chunk against chunk: the same positions (causal), wholly in the past (no mask) or wholly
in the future (skipped); unmasked blocks that share keys or queries and touch are joined,
so a zigzag ring step is one kernel call. With packed documents (``cu_seqlens``), every
block is cut at document boundaries so that no query sees another document. A query row
with two partial results is merged in one fused pass into the output dtype, with more in
float32; gradients likewise (:class:`_Grad`).
"""
from __future__ import annotations

import functools
import itertools

import torch

from ..ops.softmax_attn import attn_block_backward, attn_block_forward, merge_attn_into
from ..ops.softmax_attn import softmax_attn as local_softmax_attn
from ..ops.validate import check_cu_seqlens, fail
from ._geometry import Geometry
from ._reshard import channels_to_seq, seq_to_channels
from ._util import dtype_code, offsets_digest


def _blocks(geo: Geometry, src: int, causal: bool, offsets) -> list:
    """Blocks ``(q slice, k slice, causal)`` of this rank's queries against rank ``src``'s
    keys (slices index the two shards), as few and as large as the mask allows."""
    return _schedule(geo, src, causal, None if offsets is None else tuple(offsets))


@functools.lru_cache(maxsize=1024)
def _schedule(geo: Geometry, src: int, causal: bool, offsets: tuple[int, ...] | None) -> list:
    whole = slice(0, geo.local_len)
    if src == geo.rank and offsets is None:
        # A shard's chunks lie in increasing global order, so the causal mask inside the
        # shard is the global one restricted to it: one block.
        return [(whole, whole, causal)]
    out = []
    for i, cq in enumerate(geo.chunks):
        for j, ck in enumerate(geo.chunks_of(src)):
            if causal and ck > cq:
                continue
            diag = causal and ck == cq
            (qa, qb), (ka, kb) = geo.span(cq), geo.span(ck)
            lq, lk = geo.local_span(i)[0] - qa, geo.local_span(j)[0] - ka
            spans = [(qa, qb, ka, kb)]
            if offsets is not None:
                spans = [(max(qa, s), min(qb, e), max(ka, s), min(kb, e))
                         for s, e in itertools.pairwise(offsets)]
            out += [(a + lq, b + lq, c + lk, d + lk, diag)
                    for a, b, c, d in spans if a < b and c < d]
    return [(slice(a, b), slice(c, d), diag) for a, b, c, d, diag in _coalesce(out)]


def _coalesce(blocks: list) -> list:
    """Join unmasked blocks ``(q0, q1, k0, k1, causal)`` that share their keys and have
    adjacent queries, or share their queries and have adjacent keys, until none join:
    fewer, larger kernel calls for the same sums."""
    masked = [b for b in blocks if b[4]]
    free = [b for b in blocks if not b[4]]
    while True:
        n = len(free)
        for key, span in (((2, 3), (0, 1)), ((0, 1), (2, 3))):  # join along q, then along k
            free.sort(key=lambda b: (b[key[0]], b[key[1]], b[span[0]]))  # noqa: B023
            joined = []
            for b in free:
                last = joined[-1] if joined else None
                if (last is not None and (last[key[0]], last[key[1]]) == (b[key[0]], b[key[1]])
                        and last[span[1]] == b[span[0]]):
                    grown = list(last)
                    grown[span[1]] = b[span[1]]
                    joined[-1] = tuple(grown)
                else:
                    joined.append(b)
            free = joined
        if len(free) == n:
            return masked + free


def _pack(k, v):
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unpack(buf, k_shape, v_shape):
    n = k_shape.numel()
    return buf[:n].view(k_shape), buf[n:].view(v_shape)


def _stretches(spans: list[slice], n: int):
    """Cut rows ``[0, n)`` at every start and stop of ``spans``; yield each stretch
    ``(u, w)`` with the indices of the spans that cover it."""
    cuts = sorted({0, n, *(r.start for r in spans), *(r.stop for r in spans)})
    for u, w in itertools.pairwise(cuts):
        yield u, w, [i for i, r in enumerate(spans) if r.start <= u and w <= r.stop]


class _Partial:
    """This rank's (o, lse) from blocks' partial results, merged by log-sum-exp.

    Up to two partial results are kept as they come and merged at :meth:`result` in one
    pass per stretch of rows (:func:`merge_attn_into`), straight into the output dtype;
    a third switches to a running float32 (float64 for float64 input) merge in place.
    """

    def __init__(self, q, scale):
        self.q, self.scale = q, scale
        self.acc = torch.promote_types(q.dtype, torch.float32)
        # 16-bit inputs get their output in their dtype, the others in the accumulator's
        self.out_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else self.acc
        self.pieces, self.o, self.lse = [], None, None

    def add(self, k, v, blocks):
        for qs, ks, diag in blocks:
            o_b, lse_b = attn_block_forward(self.q[:, qs], k[:, ks], v[:, ks], causal=diag,
                                            scale=self.scale)
            if self.o is None and len(self.pieces) < 2:
                self.pieces.append((qs, o_b, lse_b))
                continue
            if self.o is None:
                B, T, H, _ = self.q.shape
                self.o = o_b.new_zeros(B, T, H, o_b.shape[-1], dtype=self.acc)
                self.lse = lse_b.new_full((B, H, T), float("-inf"), dtype=self.acc)
                for p in self.pieces:
                    self._merge(*p)
                self.pieces = []
            self._merge(qs, o_b, lse_b)

    def _merge(self, qs, o_b, lse_b):
        o, lse = self.o[:, qs], self.lse[:, :, qs]
        new = torch.logaddexp(lse, lse_b)
        o.mul_((lse - new).exp_().transpose(1, 2)[..., None])
        o.add_(o_b * (lse_b - new).exp_().transpose(1, 2)[..., None])
        lse.copy_(new)

    def result(self):
        """o (B, T, H, Dv) in the output dtype and lse (B, H, T) float32 (float64)."""
        if self.o is not None:
            return self.o.to(self.out_dtype), self.lse
        B, T, H, _ = self.q.shape
        if len(self.pieces) == 1 and self.pieces[0][0] == slice(0, T):
            _, o, lse = self.pieces[0]
            return o.to(self.out_dtype), lse.to(self.acc)
        Dv = self.pieces[0][1].shape[-1]
        o = self.q.new_empty(B, T, H, Dv, dtype=self.out_dtype)
        lse = self.q.new_empty(B, H, T, dtype=self.acc)
        for u, w, idx in _stretches([p[0] for p in self.pieces], T):
            cover = [(p_o[:, u - r.start:w - r.start], p_l[:, :, u - r.start:w - r.start])
                     for r, p_o, p_l in (self.pieces[i] for i in idx)]
            if len(cover) == 2:
                merge_attn_into(o[:, u:w], lse[:, :, u:w], *cover[0], *cover[1])
            elif cover:
                o[:, u:w].copy_(cover[0][0])
                lse[:, :, u:w].copy_(cover[0][1])
            else:  # no key visible: only where the mask leaves a row empty
                o[:, u:w].zero_()
                lse[:, :, u:w].fill_(float("-inf"))
        return o, lse


class _Accumulator:
    """A float32 (float64 for float64 input) sum over a (B, S, ...) buffer, filled block
    by block along dim 1: a block over rows nothing has written yet is copied in, later
    ones are added, and :meth:`done` zeroes the rows no block wrote, so no pass
    zero-fills the whole buffer first."""

    def __init__(self, buf: torch.Tensor, filled: bool = False):
        """``filled``: ``buf`` holds values already (a partial sum received from a peer)."""
        self.buf, self.written = buf, ([(0, buf.shape[1])] if filled else [])

    def add(self, rows: slice, x: torch.Tensor) -> None:
        a, b = rows.start, rows.stop
        if any(a < e and s < b for s, e in self.written):
            self.buf[:, rows] += x
        else:
            self.buf[:, rows].copy_(x)
        self.written.append((a, b))

    def done(self) -> torch.Tensor:
        end = 0
        for s, e in sorted(self.written) + [(self.buf.shape[1],) * 2]:
            if s > end:
                self.buf[:, end:s].zero_()
            end = max(end, e)
        return self.buf


class _Grad:
    """The gradient of a (B, S, ...) tensor from blocks' contributions along dim 1,
    landing in ``out`` (any dtype).

    Up to two contributions are kept as they come and summed at :meth:`done` in one
    pass per stretch of rows: a sum of two computed in float32 and rounded once into
    ``out`` is what accumulating in float32 gives. A third switches to a float32
    :class:`_Accumulator`. ``filled``: ``out`` already holds a partial sum (a ring's
    accumulator received from a peer), the first of the contributions.
    """

    def __init__(self, out: torch.Tensor, filled: bool = False):
        self.out = out
        self.pieces = [(slice(0, out.shape[1]), out)] if filled else []
        self.acc = None

    def add(self, rows: slice, x: torch.Tensor) -> None:
        if self.acc is None and len(self.pieces) < 2:
            self.pieces.append((rows, x))
            return
        if self.acc is None:
            wide = torch.promote_types(self.out.dtype, torch.float32)
            own = self.out.dtype == wide  # the accumulator can be ``out`` itself
            buf = self.out if own else torch.empty(self.out.shape, dtype=wide, device=x.device)
            self.acc = _Accumulator(buf)
            for r, p in self.pieces:
                if not (own and p is self.out):
                    self.acc.add(r, p)
                else:
                    self.acc.written.append((0, buf.shape[1]))
            self.pieces = []
        self.acc.add(rows, x)

    def done(self) -> torch.Tensor:
        if self.acc is not None:
            buf = self.acc.done()
            return buf if buf is self.out else self.out.copy_(buf)
        for u, w, idx in _stretches([r for r, _ in self.pieces], self.out.shape[1]):
            cover = [p[:, u - r.start:w - r.start] for r, p in (self.pieces[i] for i in idx)]
            dst = self.out[:, u:w]
            if not cover:
                dst.zero_()
            elif len(cover) == 1:
                if cover[0].data_ptr() != dst.data_ptr():
                    dst.copy_(cover[0])
            else:
                torch.add(*cover, out=dst)
        return self.out


def _grads(q, k, v, o, lse, do, dlse, blocks, scale, dq: _Grad, dk: _Grad, dv: _Grad):
    """Add one key/value shard's share of the gradients (given the final o, lse) into
    the accumulators."""
    for qs, ks, diag in blocks:
        a, b, c = attn_block_backward(do[:, qs], q[:, qs], k[:, ks], v[:, ks], o[:, qs],
                                      lse[:, :, qs], causal=diag, scale=scale,
                                      dlse=None if dlse is None else dlse[:, :, qs], cast=False)
        dq.add(qs, a)
        dk.add(ks, b)
        dv.add(ks, c)


class _KVAttention(torch.autograd.Function):
    """Ring or all-gather attention of this rank's queries over every rank's keys."""

    @staticmethod
    def forward(ctx, sp, geo, causal, scale, offsets, q, k, v):
        P, r = sp.world, sp.rank
        part = _Partial(q, scale)
        gathered = None
        # Sources in ring order, this rank's own keys first, for both strategies.
        if sp.attn_strategy == "allgather":
            gathered = sp.comm.all_gather(_pack(k, v), "softmax_attn")
            for i in range(P):
                src = (r - i) % P
                part.add(*_unpack(gathered[src], k.shape, v.shape), _blocks(geo, src, causal, offsets))
        else:
            kv = (k.contiguous(), v.contiguous())
            for i in range(P):
                src = (r - i) % P
                if i < P - 1:
                    nxt = tuple(torch.empty_like(x) for x in kv)
                    work = sp.comm.send_recv([(x, (r + 1) % P) for x in kv],
                                             [(x, (r - 1) % P) for x in nxt], "softmax_attn")
                part.add(*kv, _blocks(geo, src, causal, offsets))
                if i < P - 1:
                    work.wait()
                    kv = nxt
        # The output in q's dtype is what the caller gets and what the kernels' backward
        # reads; float32 and float64 inputs keep their accumulator's.
        o, lse = part.result()
        ctx.sp, ctx.geo, ctx.causal, ctx.scale, ctx.offsets = sp, geo, causal, scale, offsets
        ctx.gathered = gathered
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        sp, geo = ctx.sp, ctx.geo
        q, k, v, o, lse = ctx.saved_tensors
        P, r = sp.world, sp.rank
        if do is None:
            do = torch.zeros_like(o)
        acc = lse.dtype
        dq = _Grad(torch.empty_like(q, memory_format=torch.contiguous_format))

        def share(src, ks, vs, dkv, filled):
            dk, dv = (_Grad(x, filled) for x in _unpack(dkv, k.shape, v.shape))
            _grads(q, ks, vs, o, lse, do, dlse, _blocks(geo, src, ctx.causal, ctx.offsets),
                   ctx.scale, dq, dk, dv)
            dk.done()
            dv.done()

        n = k.numel() + v.numel()
        if ctx.gathered is not None:
            dkv_all = [torch.empty(n, dtype=acc, device=q.device) for _ in range(P)]
            for src in range(P):
                share(src, *_unpack(ctx.gathered[src], k.shape, v.shape), dkv_all[src], False)
            dkv = sp.comm.reduce_scatter(dkv_all, "softmax_attn.backward")
        else:
            kv, dkv = (k.contiguous(), v.contiguous()), torch.empty(n, dtype=acc, device=q.device)
            for i in range(P):
                src = (r - i) % P
                works = []
                if i < P - 1:
                    kv_next = tuple(torch.empty_like(x) for x in kv)
                    works.append(sp.comm.send_recv([(x, (r + 1) % P) for x in kv],
                                                   [(x, (r - 1) % P) for x in kv_next],
                                                   "softmax_attn.backward"))
                # the accumulator starts empty here and arrives filled from the peer after
                share(src, *kv, dkv, i > 0)
                if P > 1:  # the accumulator travels on; after the last step it is home
                    dkv_next = torch.empty_like(dkv)
                    works.append(sp.comm.send_recv([(dkv, (r + 1) % P)], [(dkv_next, (r - 1) % P)],
                                                   "softmax_attn.backward"))
                for w in works:
                    w.wait()
                if P > 1:
                    dkv = dkv_next
                if i < P - 1:
                    kv = kv_next
        dk, dv = _unpack(dkv, k.shape, v.shape)
        return (None, None, None, None, None, dq.done(), dk.to(k.dtype), dv.to(v.dtype))


def _ulysses(sp, geo, q, k, v, causal, scale, cu_seqlens):
    qh, kh, vh = (seq_to_channels(sp, geo, x, 2, "softmax_attn") for x in (q, k, v))
    o, lse = local_softmax_attn(qh, kh, vh, causal=causal, scale=scale, cu_seqlens=cu_seqlens)
    o = channels_to_seq(sp, geo, o, 2, "softmax_attn")
    lse = channels_to_seq(sp, geo, lse.transpose(1, 2), 2, "softmax_attn").transpose(1, 2)
    return o, lse


def sp_softmax_attn(sp, q, k, v, *, causal, scale, cu_seqlens):
    """Sequence-parallel softmax attention (called by ``ops.softmax_attn(..., sp=sp)``).

    q: this rank's shard (B, T/P, H, D); k, v: the shards of the same positions
    (B, T/P, Hkv, D) / (B, T/P, Hkv, Dv); cu_seqlens: the global packed offsets, the same
    on every rank. Returns this rank's shard of o (B, T/P, H, Dv) in q's dtype and lse
    (B, H, T/P) float32, equal to the single-device result.
    """
    B, Tl, H, D = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]

    def validate():
        if S != Tl:
            fail("k", f"the keys of this rank's own positions (S == T/P = {Tl}) under SP: "
                 "self-attention over the sharded sequence", f"S = {S}")
        if sp.attn_strategy == "alltoall":
            for name, heads in (("q", H), ("k", Hkv)):
                if heads % sp.world:
                    fail(name, f"a head count divisible by the SP world size {sp.world} for "
                         "attn_strategy='alltoall' (Ulysses shards heads); use 'ring' or "
                         "'allgather'", f"{heads} heads")
        geo = sp.geometry(Tl)
        return geo, check_cu_seqlens(cu_seqlens, B, geo.total, q.device)

    desc = {"B": B, "T/P": Tl, "H": H, "D": D, "S": S, "Hkv": Hkv, "Dv": Dv, "causal": causal,
            "q dtype": dtype_code(q), **offsets_digest(cu_seqlens)}
    geo, offsets = sp.agree("q", desc, validate)
    if sp.attn_strategy == "alltoall":
        o, lse = _ulysses(sp, geo, q, k, v, causal, scale, cu_seqlens)
    else:
        o, lse = _KVAttention.apply(sp, geo, causal, scale, offsets, q, k, v)
    return o.to(q.dtype), lse
