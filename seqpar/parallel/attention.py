"""Sequence parallelism for softmax attention.

Strategies (``sp.attn_strategy``):

* ``'ring'``: the key/value shards circulate around the ring (rank r sends to r+1), each
  rank attends its queries to every shard it sees and merges the partial outputs by
  log-sum-exp in float32; sending the next shard overlaps computing with the current
  one. Backward by ring as well: the key/value shards circulate again together with
  their gradient accumulators, each rank adding its share computed by the flash
  backward formula from the final (o, lse); after P hops every accumulator is home.
  Per rank and call: forward ``(P-1) (|k| + |v|)`` bytes, backward ``(P-1) (|k| + |v|)``
  plus ``P (|k| + |v|)`` float32 gradient bytes. Zigzag balances the causal mask.
* ``'allgather'``: all-gather keys and values once, attend locally; backward
  reduce-scatters their gradients. ``(P-1) (|k| + |v|)`` forward and ``(P-1) (|k| +
  |v|)`` float32 backward; memory O(T) for K and V.
* ``'alltoall'`` (Ulysses): all-to-all from sequence shards to head shards, full-length
  attention on H/P heads, all-to-all back; needs H and the key/value heads divisible by P.

With packed documents (``cu_seqlens``), every block is cut at document boundaries so
that no query sees another document; blocks are chunk-aligned, so a query block and a
key block are either the same positions (causal mask) or disjoint (no mask, or skipped
when wholly in the future).
"""
from __future__ import annotations

import torch

from ..ops.softmax_attn import attn_block, attn_block_backward, merge_attn
from ..ops.softmax_attn import softmax_attn as local_softmax_attn
from ..ops.validate import check_cu_seqlens, fail
from ._geometry import Geometry
from ._reshard import channels_to_seq, seq_to_channels
from ._util import dtype_code, offsets_digest


def _blocks(geo: Geometry, src: int, causal: bool, offsets) -> list:
    """Sub-blocks ``(q slice, k slice, causal)`` of this rank's queries against rank
    ``src``'s keys (slices index the two shards)."""
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
                         for s, e in zip(offsets, offsets[1:])]
            out += [(slice(a + lq, b + lq), slice(c + lk, d + lk), diag)
                    for a, b, c, d in spans if a < b and c < d]
    return out


def _pack(k, v):
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unpack(buf, k_shape, v_shape):
    n = k_shape.numel()
    return buf[:n].view(k_shape), buf[n:].view(v_shape)


class _Partial:
    """Running (o, lse) of this rank's queries, float32, merged block by block."""

    def __init__(self, q, v, scale):
        B, T, H, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        self.q, self.scale = q, scale
        self.o = q.new_zeros(B, T, H, v.shape[-1], dtype=acc)
        self.lse = q.new_full((B, H, T), float("-inf"), dtype=acc)

    def add(self, k, v, blocks):
        for qs, ks, diag in blocks:
            o_b, lse_b = attn_block(self.q[:, qs], k[:, ks], v[:, ks], causal=diag, scale=self.scale)
            self.o[:, qs], self.lse[:, :, qs] = merge_attn(self.o[:, qs], self.lse[:, :, qs], o_b, lse_b)


def _grads(q, k, v, o, lse, do, dlse, blocks, scale, dq, dk, dv):
    """Add one key/value shard's share of the gradients (given the final o, lse) into
    ``dq``, ``dk``, ``dv``."""
    for qs, ks, diag in blocks:
        qb, kb, vb = q[:, qs], k[:, ks], v[:, ks]
        a, b, c = attn_block_backward(do[:, qs], qb, kb, vb, o[:, qs], lse[:, :, qs],
                                      causal=diag, scale=scale)
        dq[:, qs] += a
        dk[:, ks] += b
        dv[:, ks] += c
        if dlse is None:
            continue
        # d lse_i / d s_ij = P_ij: dq_i += scale dlse_i sum_j P_ij k_j (attention with
        # values k, renormalized to the final lse), dk_j += scale sum_i P_ij dlse_i q_i
        # (that attention's value gradient for the output gradient dlse q).
        dl = dlse[:, :, qs]
        o_k, lse_k = attn_block(qb, kb, kb, causal=diag, scale=scale)
        w = (dl * (lse_k - lse[:, :, qs]).exp()).transpose(1, 2)[..., None]
        dq[:, qs] += scale * w * o_k
        g = (dl.transpose(1, 2)[..., None] * qb.to(dl.dtype)).to(qb.dtype)
        _, _, dk_l = attn_block_backward(g, qb, kb, kb, torch.zeros_like(g), lse[:, :, qs],
                                         causal=diag, scale=scale)
        dk[:, ks] += scale * dk_l


class _KVAttention(torch.autograd.Function):
    """Ring or all-gather attention of this rank's queries over every rank's keys."""

    @staticmethod
    def forward(ctx, sp, geo, causal, scale, offsets, q, k, v):
        P, r = sp.world, sp.rank
        part = _Partial(q, v, scale)
        kv = _pack(k, v)
        gathered = None
        if sp.attn_strategy == "allgather":
            gathered = sp.comm.all_gather(kv, "softmax_attn")
            for src in range(P):
                part.add(*_unpack(gathered[src], k.shape, v.shape), _blocks(geo, src, causal, offsets))
        else:
            for i in range(P):
                src = (r - i) % P
                if i < P - 1:
                    nxt = torch.empty_like(kv)
                    work = sp.comm.send_recv([(kv, (r + 1) % P)], [(nxt, (r - 1) % P)],
                                             "softmax_attn")
                part.add(*_unpack(kv, k.shape, v.shape), _blocks(geo, src, causal, offsets))
                if i < P - 1:
                    work.wait()
                    kv = nxt
        ctx.sp, ctx.geo, ctx.causal, ctx.scale, ctx.offsets = sp, geo, causal, scale, offsets
        ctx.gathered = gathered
        ctx.save_for_backward(q, k, v, part.o, part.lse)
        ctx.set_materialize_grads(False)
        return part.o, part.lse

    @staticmethod
    def backward(ctx, do, dlse):
        sp, geo = ctx.sp, ctx.geo
        q, k, v, o, lse = ctx.saved_tensors
        P, r = sp.world, sp.rank
        if do is None:
            do = torch.zeros_like(o)
        acc = o.dtype
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)

        def share(src, kv, dkv):
            ks, vs = _unpack(kv, k.shape, v.shape)
            dks, dvs = _unpack(dkv, k.shape, v.shape)
            _grads(q, ks, vs, o, lse, do, dlse, _blocks(geo, src, ctx.causal, ctx.offsets),
                   ctx.scale, dq, dks, dvs)

        n = k.numel() + v.numel()
        if ctx.gathered is not None:
            dkv_all = [torch.zeros(n, dtype=acc, device=q.device) for _ in range(P)]
            for src in range(P):
                share(src, ctx.gathered[src], dkv_all[src])
            dkv = sp.comm.reduce_scatter(dkv_all, "softmax_attn.backward")
        else:
            kv, dkv = _pack(k, v), torch.zeros(n, dtype=acc, device=q.device)
            for i in range(P):
                src = (r - i) % P
                works = []
                if i < P - 1:
                    kv_next = torch.empty_like(kv)
                    works.append(sp.comm.send_recv([(kv, (r + 1) % P)], [(kv_next, (r - 1) % P)],
                                                   "softmax_attn.backward"))
                share(src, kv, dkv)
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
        return (None, None, None, None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))


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
