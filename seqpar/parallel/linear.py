"""Sequence parallelism for the linear family: the engines' own kernels, one state exchange
per direction.

Every linear mixer maps the state entering a stretch of tokens affinely, ``S -> M S + C``
(docs/design.md). A rank's shard is one or two chunks of the global sequence; cut at
document starts and batch rows, it is a set of independent sequences (:class:`Plan`).
Each call, with ``p = engine.begin(...)`` (:class:`~seqpar.ops.linear.engine.StatePass`):

forward
  1. ``p.final`` / ``p.transition``: a state-only pass gives, per chunk, the state it
     builds from zero (``C``) and its transition (``M``; 0 when a document starts
     inside the chunk: the chain resets);
  2. the exchange (``'scan'``: a pipelined ring in global chunk order, out through the
     first chunks and back through the second ones under zigzag; ``'allgather'``: one
     all-gather, each rank folds its prefix) gives the state ``S_in`` entering each chunk;
  3. ``p.finish``: the engine's forward with ``S_in`` as the initial state of the
     sequence continuing into each chunk: exact outputs and final states.

backward
  1. ``p.initial_grads``: a state-only reverse pass gives the gradient of each chunk's
     entering state from this rank's output gradients alone;
  2. the reverse exchange, with transposed transitions, gives the gradient of the state
     leaving each chunk (what the later chunks did with it);
  3. ``p.backward``: the engine's backward with that gradient added to the final-state
     gradient: exact gradients of every input.

The work beyond the single-device op is one state-only pass per direction; no tokens
cross ranks and nothing of activation size is computed outside the engine's kernels.
"""
from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

import torch

from ..ops.linear.engine import Sequences, apply, to_device
from ..ops.validate import check_cu_seqlens, check_state
from ._geometry import Geometry, chunk_pieces
from ._util import dtype_code, offsets_digest

# ---- where the sequences are ----

@dataclass(frozen=True)
class Plan:
    """The sequences of one rank's shard and how they link to the global chain.

    ``seqs``: spans of every row (one per chunk without packing; per document piece
    with packing, B == 1). Per local chunk i: ``head[i]`` (its first sequence continues
    one that began before the chunk), ``whole[i]`` (that sequence covers the whole
    chunk, so the chunk passes an entering state on), ``head_span[i]`` / ``tail_span[i]``
    (span indices of the chunk's first and last sequences). ``inits``: (span, user row)
    of sequences that start a document or row (user row = document, or -1: the batch row);
    ``finals``: (span, user row) of the final states returned to the user.
    """
    seqs: Sequences
    head: tuple[bool, ...]
    whole: tuple[bool, ...]
    head_span: tuple[int, ...]
    tail_span: tuple[int, ...]
    inits: tuple[tuple[int, int], ...]
    finals: tuple[tuple[int, int], ...]
    n_users: int

    def index(self, device) -> PlanIndex:
        """The plan's index tensors on ``device`` (built once per plan and device)."""
        cache = self.__dict__.setdefault("_index", {})  # frozen fields; a memo beside them
        if device not in cache:
            cache[device] = _plan_index(self, torch.device(device))
        return cache[device]


@dataclass(frozen=True)
class PlanIndex:
    """A :class:`Plan` as index tensors (long unless said), row-major over (chunk or
    pair, batch row): ``heads`` / ``tails`` (n_local R,) the sequence of each local
    chunk's head / tail; ``whole`` / ``head`` (n_local, 1, 1, 1, 1) float32 flags;
    ``head_at`` positions in ``heads`` of the chunks that have a head and ``head_rows``
    their sequences; ``init_rows`` / ``init_src`` sequences starting a document and the
    user rows of their initial states; ``final_rows`` / ``final_dst`` likewise for the
    final states handed to the user.

    The flags say where an index is the identity, so the op skips the gather or scatter
    (the common case: one sequence per chunk and row): ``heads_id`` / ``tails_id``;
    ``all_whole`` / ``all_head`` (every flag is 1); ``heads_fill`` (every sequence is the
    head of a chunk, in order); ``inits_id`` / ``finals_id`` (sequences and user rows
    coincide)."""
    heads: torch.Tensor
    tails: torch.Tensor
    whole: torch.Tensor
    head: torch.Tensor
    head_at: torch.Tensor
    head_rows: torch.Tensor
    init_rows: torch.Tensor
    init_src: torch.Tensor
    final_rows: torch.Tensor
    final_dst: torch.Tensor
    heads_id: bool
    tails_id: bool
    all_whole: bool
    all_head: bool
    heads_fill: bool
    inits_id: bool
    finals_id: bool


def _plan_index(plan: Plan, device: torch.device) -> PlanIndex:
    B, n = plan.seqs.B, len(plan.seqs.spans)
    count = plan.seqs.count

    def rows(spans):
        return [r * n + j for j in spans for r in range(B)]

    def users(pairs):
        return [u if u >= 0 else r for _, u in pairs for r in range(B)]

    def t(x, dtype=torch.long):
        return to_device(x, dtype, device)

    def ident(x, size=count):
        return list(x) == list(range(size))

    n_local = len(plan.head)
    at = [i * B + r for i in range(n_local) if plan.head[i] for r in range(B)]
    heads, tails = rows(plan.head_span), rows(plan.tail_span)
    head_rows = [heads[i] for i in at]
    init_rows, init_src = rows([j for j, _ in plan.inits]), users(plan.inits)
    final_rows, final_dst = rows([j for j, _ in plan.finals]), users(plan.finals)
    same = count == plan.n_users
    return PlanIndex(
        heads=t(heads), tails=t(tails),
        whole=t(plan.whole, torch.float32).view(-1, 1, 1, 1, 1),
        head=t(plan.head, torch.float32).view(-1, 1, 1, 1, 1),
        head_at=t(at), head_rows=t(head_rows), init_rows=t(init_rows), init_src=t(init_src),
        final_rows=t(final_rows), final_dst=t(final_dst),
        heads_id=ident(heads), tails_id=ident(tails), all_whole=all(plan.whole),
        all_head=all(plan.head), heads_fill=ident(at, n_local * B) and ident(head_rows),
        inits_id=same and ident(init_rows) and ident(init_src),
        finals_id=same and ident(final_rows) and ident(final_dst))


@functools.lru_cache(maxsize=256)
def make_plan(geo: Geometry, B: int, offsets: tuple[int, ...] | None) -> Plan:
    """The :class:`Plan` of this rank's shard (cached: built once per shape and
    ``cu_seqlens``)."""
    spans, head, whole, head_span, tail_span, inits, finals = [], [], [], [], [], [], []
    last_local = len(geo.chunks) - 1
    for i in range(len(geo.chunks)):
        pieces = chunk_pieces(geo, i, None if offsets is None else list(offsets))
        first = len(spans)
        for p in pieces:
            j = len(spans)
            spans.append((p.local, p.local + p.end - p.start))
            if not p.head:
                inits.append((j, -1 if p.doc is None else p.doc))
            if offsets is None:
                if i == last_local:
                    finals.append((j, -1))
            elif p.ends:
                finals.append((j, p.doc))
        head.append(pieces[0].head)
        whole.append(pieces[0].head and len(pieces) == 1)
        head_span.append(first)
        tail_span.append(len(spans) - 1)
    n_users = B if offsets is None else len(offsets) - 1
    return Plan(Sequences(B, geo.local_len, tuple(spans)), tuple(head), tuple(whole),
                tuple(head_span), tuple(tail_span), tuple(inits), tuple(finals), n_users)


# ---- the exchange ----

def _chain(sp, geo: Geometry, step, like: torch.Tensor, reverse: bool, op: str) -> list:
    """Pass a value along the global chunk chain, point to point.

    ``step(i, x_in, sl)`` maps the value entering this rank's ``i``-th chunk to the value
    leaving it, restricted to the last-dim slice ``sl`` (``x_in`` None: zeros). Chunks are visited in global
    order (``reverse``: backwards); the first chunk of the chain receives zeros. The
    value is cut into ``sp.pieces`` pieces along its last dim: piece j is sent as soon as
    it is folded, while piece j+1 is still arriving or being folded. Returns the value
    entering each local chunk, in local order.
    """
    n = geo.n_chunks
    d = -1 if reverse else 1
    width = like.shape[-1]
    cuts = [round(j * width / min(sp.pieces, width)) for j in range(min(sp.pieces, width) + 1)]
    slices = [slice(a, b) for a, b in zip(cuts, cuts[1:])]
    order = sorted(range(len(geo.chunks)), key=lambda i: geo.chunks[i], reverse=reverse)
    comm = sp.comm
    x_in = [None] * len(geo.chunks)
    carry, sends = None, []
    for i in order:
        c = geo.chunks[i]
        prev, nxt = c - d, c + d
        works = bufs = None
        start = not 0 <= prev < n  # the chain starts here: zeros enter
        if start:
            x_in[i] = torch.zeros_like(like)
        elif geo.owner(prev) == sp.rank:
            x_in[i] = carry
        else:
            bufs = [like.new_empty(*like.shape[:-1], s.stop - s.start) for s in slices]
            works = [comm.send_recv([], [(b, geo.owner(prev))], op) for b in bufs]
        if not 0 <= nxt < n:
            if x_in[i] is None:
                for w in works:
                    w.wait()
                x_in[i] = _joined(bufs)
            continue
        outs = []
        for j, s in enumerate(slices):
            if x_in[i] is None:
                works[j].wait()
                piece = bufs[j]
            else:
                piece = None if start else x_in[i][..., s]
            out = step(i, piece, s)
            outs.append(out)
            if geo.owner(nxt) != sp.rank:
                sends.append(comm.send_recv([(out, geo.owner(nxt))], [], op))
        if x_in[i] is None:
            x_in[i] = _joined(bufs)
        carry = _joined(outs)
    for w in sends:
        w.wait()
    return x_in


def _joined(parts: list) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def _stacked(parts: list) -> torch.Tensor:
    return parts[0].unsqueeze(0) if len(parts) == 1 else torch.stack(parts)


def _gather_chunks(sp, geo: Geometry, xs: list, op: str) -> list:
    """One all-gather of per-local-chunk stacks ``xs[j] (n_local, ...)`` (float32, flattened
    into one buffer); returns, for each j, every chunk's value stacked in global chunk
    order, (n_chunks, ...) (views of the gathered buffer where the layout allows)."""
    flat = torch.cat([x.reshape(x.shape[0], -1) for x in xs], 1)
    g = sp.comm.all_gather(flat, op)  # (world, n_local, F): rank r's chunks in shard order
    if geo.layout == "zigzag":  # rank r holds chunks r and 2P-1-r
        g = torch.cat([g[:, 0], g[:, 1].flip(0)])
    else:
        g = g.flatten(0, 1)
    sizes = [x[0].numel() for x in xs]
    return [part.view(-1, *x.shape[1:]) for part, x in zip(g.split(sizes, 1), xs)]


def _fold(M: torch.Tensor, C: torch.Tensor, order, transpose: bool) -> torch.Tensor:
    """The chain over stacked transitions M (n, ...) and values C (n, ...), visiting the
    chunks in ``order``: ``X_0 = 0``, ``X_{j+1} = M_c X_j + C_c`` for the j-th chunk c
    (``transpose``: ``M_c^T``). Returns X (len(order) + 1, ...): one fused multiply-add
    per chunk, written in place."""
    X = C.new_empty(len(order) + 1, *C.shape[1:])
    X[0].zero_()
    matrix = M.shape[-1] != 1
    for j, c in enumerate(order):
        if matrix:
            Mc = M[c].transpose(-1, -2) if transpose else M[c]
            torch.baddbmm(C[c].flatten(0, -3), Mc.flatten(0, -3), X[j].flatten(0, -3),
                          out=X[j + 1].flatten(0, -3))
        else:
            torch.addcmul(C[c], M[c], X[j], out=X[j + 1])
    return X


def exchange(sp, geo: Geometry, M: torch.Tensor, C: torch.Tensor):
    """``S_in`` of each local chunk, (n_local, ...) like C, from every chunk's ``(M, C)``:
    ``S_in(c+1) = M_c S_in(c) + C_c``, ``S_in(0) = 0``. Also returns every chunk's M
    stacked (``'allgather'``; None for ``'scan'``) for :func:`exchange_backward`."""
    if sp.linear_strategy == "scan":
        S_in = _chain(sp, geo, lambda i, x, s: C[i][..., s] if x is None else
                      apply(M[i], x) + C[i][..., s], C[0], reverse=False, op="linear")
        return _stacked(S_in), None
    M_all, C_all = _gather_chunks(sp, geo, [M, C], "linear")
    # S_in(c) = X[c]; chunks after this rank's last do not reach it
    X = _fold(M_all, C_all, range(max(geo.chunks)), False)
    return torch.stack([X[c] for c in geo.chunks]), M_all


def exchange_backward(sp, geo: Geometry, M: torch.Tensor, M_all, d: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`exchange`: from ``d`` (n_local, ...), the gradient of this
    rank's use of each chunk's ``S_in``, the gradient ``lam`` of the state leaving each
    local chunk: ``lam_c = d_{c+1} + M_{c+1}^T lam_{c+1}``, zero after the last chunk."""
    if sp.linear_strategy == "scan":
        lam = _chain(sp, geo, lambda i, x, s: d[i][..., s] if x is None else
                     apply(M[i], x, transpose=True) + d[i][..., s], d[0], reverse=True,
                     op="linear.backward")
        return _stacked(lam)
    d_all, = _gather_chunks(sp, geo, [d], "linear.backward")
    # from the last chunk down, lam_{c-1} = M_c^T lam_c + d_c: lam_c = X[n - 1 - c];
    # chunks before this rank's first take nothing from it
    n = geo.n_chunks
    X = _fold(M_all, d_all, range(n - 1, min(geo.chunks), -1), True)
    return torch.stack([X[n - 1 - c] for c in geo.chunks])


# ---- the op ----

class _LinearSP(torch.autograd.Function):
    """Outputs and final states of this rank's shard; see the module docstring."""

    @staticmethod
    def forward(ctx, sp, geo, plan, engine, opts, init, *xs):
        ctx.set_materialize_grads(False)
        p = engine.begin(xs, plan.seqs, **opts)
        ix = plan.index(xs[0].device)
        H, K = xs[0].shape[2:]
        state = (H, K, engine.state_width(xs[2].shape[-1]))
        h0 = None
        if init is not None:
            if ix.inits_id:
                h0 = init
            else:
                h0 = init.new_zeros(plan.seqs.count, *init.shape[1:])
                if plan.inits:
                    h0.index_copy_(0, ix.init_rows, init.index_select(0, ix.init_src))
        n_local = len(geo.chunks)
        # The last chunk of the chain passes nothing on: a rank holding no other chunk
        # skips the state-only pass (its (M, C) travel as zeros, which nobody reads).
        if any(c + 1 < geo.n_chunks for c in geo.chunks):
            with torch.no_grad():
                F = p.final(h0)
                Mall = p.transition()
            C = _rows(F, ix.tails, ix.tails_id).view(n_local, -1, *F.shape[1:])
            M = _rows(Mall, ix.heads, ix.heads_id).view(n_local, -1, *Mall.shape[1:])
            if not ix.all_whole:
                M = M * ix.whole
        else:
            C = xs[0].new_zeros(n_local, plan.seqs.B, *state, dtype=torch.float32)
            M = C.new_zeros(n_local, plan.seqs.B, state[0], *engine.transition_shape(xs))
        S_in, ctx.M_all = exchange(sp, geo, M, C)
        if any(plan.head):
            if ix.heads_fill:  # every sequence continues into a chunk: S_in is h0
                h0 = S_in.flatten(0, 1)
            else:
                h0 = C.new_zeros(plan.seqs.count, *state) if h0 is None else h0
                h0 = h0.index_copy(0, ix.head_rows,
                                   S_in.flatten(0, 1).index_select(0, ix.head_at))
        o, fin = p.finish(h0)
        ctx.p, ctx.sp, ctx.geo, ctx.plan, ctx.M = p, sp, geo, plan, M
        ctx.has_init = init is not None
        ctx.o_meta, ctx.state = (o.shape, o.dtype), state
        if ix.finals_id:
            return o, fin
        out = fin.new_zeros(plan.n_users, *fin.shape[1:])
        if plan.finals:
            out.index_copy_(0, ix.final_dst, fin.index_select(0, ix.final_rows))
        return o, out

    @staticmethod
    def backward(ctx, do, dfin):
        p, plan, geo = ctx.p, ctx.plan, ctx.geo
        dev = ctx.M.device
        ix = plan.index(dev)
        if do is None:
            do = torch.zeros(ctx.o_meta[0], dtype=ctx.o_meta[1], device=dev)
        dht = None
        if dfin is not None and plan.finals:
            if ix.finals_id:
                dht = dfin.contiguous()
            else:
                dht = dfin.new_zeros(plan.seqs.count, *dfin.shape[1:])
                dht.index_copy_(0, ix.final_rows, dfin.index_select(0, ix.final_dst))
        n_local = len(geo.chunks)
        # The first chunk of the chain passes nothing back (as in the forward).
        if any(c > 0 for c in geo.chunks):
            d0 = p.initial_grads(do, dht)
            d = _rows(d0, ix.heads, ix.heads_id).view(n_local, -1, *d0.shape[1:])
            if not ix.all_head:
                d = d * ix.head
        else:
            d = ctx.M.new_zeros(n_local, plan.seqs.B, *ctx.state)
        lam = exchange_backward(ctx.sp, geo, ctx.M, ctx.M_all, d).flatten(0, 1)
        if ix.tails_id:
            dht = lam if dht is None else dht + lam
        else:
            dht = (d.new_zeros(plan.seqs.count, *ctx.state) if dht is None else dht).index_add(
                0, ix.tails, lam)
        dxs, dh0 = p.backward(do, dht)
        dinit = None
        if ctx.has_init and dh0 is not None:
            if ix.inits_id:
                dinit = dh0
            else:
                dinit = dh0.new_zeros(plan.n_users, *dh0.shape[1:])
                if plan.inits:
                    dinit.index_add_(0, ix.init_src, dh0.index_select(0, ix.init_rows))
        ctx.p = None
        return (None, None, None, None, None, dinit, *dxs)


def _rows(x: torch.Tensor, index: torch.Tensor, identity: bool) -> torch.Tensor:
    return x if identity else x.index_select(0, index)


def sp_linear(sp, engine, xs: tuple, *, scale, initial_state, output_final_state, cu_seqlens,
              chunk_size, backend):
    """Sequence-parallel linear-family op (called by the public ops with ``sp=``).

    Each rank passes its shard of the engine's inputs ``xs`` (q, k (B, T/P, H, K), v
    (B, T/P, H, V), gates) and the same global ``cu_seqlens`` (B == 1; documents may
    cross shard boundaries) on every rank.

    initial_state: the same (N, H, K, Vs) tensor (or None) on every rank, N = B or the
        number of documents. Row n enters where sequence / document n starts: on rank 0
        without packing, on the rank holding the document's first token when packed.
        Its gradient on each rank is that rank's share: sum it over the SP group (as
        for any replicated input).
    Returns:
        o: this rank's shard of the outputs, (B, T/P, H, V) in v's dtype.
        final state (if ``output_final_state``), float32:
        * not packed: (B, H, K, Vs), the state after this rank's last token, so the rank
          holding the last token of the sequence (rank P-1 contiguous, rank 0 zigzag)
          returns the single-device final state;
        * packed: (N, H, K, Vs), the final state of each document that ends on this
          rank and zeros for the others, so the sum over ranks is the single-device
          result.
    """
    q, v = xs[0], xs[2]
    B, Tl, H, K = q.shape
    Vs = engine.state_width(v.shape[-1])

    def validate():
        geo = sp.geometry(Tl)
        offsets = check_cu_seqlens(cu_seqlens, B, geo.total, q.device)
        N = B if offsets is None else len(offsets) - 1
        check_state("initial_state", initial_state, (N, H, K, Vs), q.device)
        return geo, offsets

    gates = [x for x in xs[3:] if x is not None]
    desc = {"engine": zlib.crc32(engine.name.encode()), "B": B, "T/P": Tl, "H": H,
            "K": K, "Vs": Vs, "gates": sum(x.dim() for x in gates) + 10 * len(gates),
            "q dtype": dtype_code(q), "initial_state dtype": dtype_code(initial_state),
            **offsets_digest(cu_seqlens)}
    geo, offsets = sp.agree("q", desc, validate)
    plan = make_plan(geo, B, None if offsets is None else tuple(offsets))
    init = None if initial_state is None else initial_state.float()
    opts = dict(scale=scale, chunk_size=chunk_size, backend=backend)
    o, fin = _LinearSP.apply(sp, geo, plan, engine, opts, init, *xs)
    return o, (fin if output_final_state else None)
