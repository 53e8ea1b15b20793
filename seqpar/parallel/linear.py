"""Sequence parallelism for the linear family: one state exchange per call.

Every linear mixer maps the state entering a stretch of tokens affinely,
``S_out = M S_in + C`` (docs/design.md), with ``M`` diagonal (``'diag'`` engine: a scalar or a
K-vector per head) or K x K (``'delta'`` engine) and ``C`` the state the stretch builds
from zero. Each rank, per chunk of its shard (one chunk, or two with zigzag):

1. runs the single-device engine from a zero state, giving the outputs' state-free part
   and ``C`` (documents that start inside the chunk run with their own initial state);
2. computes ``M`` (``exp`` of the summed log decay, or the engine run with ``v = 0`` from
   the identity), which is 0 when a sequence starts inside the chunk (the chain resets);
3. exchanges ``(M, C)`` with the other ranks (``'scan'``: a pipelined ring in global
   chunk order, out through the first chunks and back through the second ones under
   zigzag; ``'allgather'``: one all-gather, each rank folds its prefix) to get the state
   ``S_in`` entering each of its chunks;
4. adds the state-dependent part to the outputs of the chunk's first sequence:
   ``scale (q_t exp(G_t)) S_in`` in closed form (diag), or the engine run with ``v = 0``
   and initial state ``S_in`` (delta; exact by linearity).

The exchange is an autograd Function whose backward is the reverse scan with transposed
transitions (the adjoint of ``S_in`` travels from the last chunk to the first); no
tokens are ever gathered. States and transitions are float32.
"""
from __future__ import annotations

import torch

from ..ops._validate import check_cu_seqlens, check_state
from ..ops.linear._run import run_delta, run_diag
from ._geometry import Geometry, chunk_pieces
from ._util import Anchor, dtype_code, offsets_digest


# ---- the affine maps (M of shape (..., K, 1 or K) or (..., 1, 1); S of shape (..., K, V)) ----

def _apply(kind: str, M, S, transpose: bool = False):
    if kind == "diag":
        return M * S
    return (M.transpose(-1, -2) if transpose else M) @ S


def _grad_m(kind: str, M, lam, S):
    """Gradient of ``<lam, M S>`` with respect to M."""
    if kind == "delta":
        return lam @ S.transpose(-1, -2)
    d = (lam * S).sum(-1, keepdim=True)
    return d.sum(-2, keepdim=True) if M.shape[-2] == 1 else d


# ---- the exchange ----

def _chain(sp, geo: Geometry, step, like: torch.Tensor, reverse: bool, op: str) -> list:
    """Pass a value along the global chunk chain, point to point.

    ``step(i, x_in, sl)`` maps the value entering this rank's ``i``-th chunk to the value
    leaving it, restricted to the last-dim slice ``sl``. Chunks are visited in global
    order (``reverse``: backwards); the first chunk of the chain receives zeros. The
    value is cut into ``sp.pieces`` pieces along its last dim: piece j is sent as soon as
    it is folded, while piece j+1 is still arriving or being folded. Returns the value
    entering each local chunk, in local order.
    """
    n = geo.n_chunks
    d = -1 if reverse else 1
    width = like.shape[-1]
    bounds = torch.linspace(0, width, min(sp.pieces, width) + 1).round().long().tolist()
    slices = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
    order = sorted(range(len(geo.chunks)), key=lambda i: geo.chunks[i], reverse=reverse)
    x_in = [None] * len(geo.chunks)
    carry, sends = None, []
    for i in order:
        c = geo.chunks[i]
        prev, nxt = c - d, c + d
        if not 0 <= prev < n:
            x_in[i] = torch.zeros_like(like)
        elif geo.owner(prev) == sp.rank:
            x_in[i] = carry
        else:
            bufs = [like.new_empty(*like.shape[:-1], s.stop - s.start) for s in slices]
            reqs = [sp._irecv(b, geo.owner(prev), j) for j, b in enumerate(bufs)]
        if not 0 <= nxt < n:
            if x_in[i] is None:
                for r in reqs:
                    r.wait()
                x_in[i] = torch.cat(bufs, -1)
            continue
        outs = []
        for j, s in enumerate(slices):
            if x_in[i] is None:
                reqs[j].wait()
                piece = bufs[j]
            else:
                piece = x_in[i][..., s]
            out = step(i, piece, s)
            outs.append(out)
            if geo.owner(nxt) != sp.rank:
                sends.append(sp._isend(out, geo.owner(nxt), j, op))
        if x_in[i] is None:
            x_in[i] = torch.cat(bufs, -1)
        carry = torch.cat(outs, -1)
    for s in sends:
        s.wait()
    return x_in


def _gather_chunks(sp, geo: Geometry, xs: list, op: str) -> list:
    """One all-gather of per-local-chunk stacks ``xs[j] (n_local, ...)`` (float32, flattened
    into one buffer); returns, for each j, the global list by chunk."""
    flat = torch.cat([x.reshape(x.shape[0], -1) for x in xs], 1)
    sizes = [x[0].numel() for x in xs]
    out = [[None] * geo.n_chunks for _ in xs]
    for r, buf in enumerate(sp._all_gather(flat, op)):
        for i, c in enumerate(geo.chunks_of(r)):
            for j, part in enumerate(buf[i].split(sizes)):
                out[j][c] = part.view(xs[j].shape[1:])
    return out


def _fold(kind: str, Ms: list, Cs: list, upto: int, reverse: bool) -> list:
    """Serial fold of the chain: entering values of chunks, forward from chunk 0 up to
    ``upto`` (inclusive), or backward from the last chunk down to ``upto``."""
    n = len(Ms)
    x = torch.zeros_like(Cs[0])
    out = [None] * n
    idx = range(n - 1, upto - 1, -1) if reverse else range(upto + 1)
    for c in idx:
        out[c] = x
        x = _apply(kind, Ms[c], x, transpose=reverse) + Cs[c]
    return out


class _StateExchange(torch.autograd.Function):
    """``S_in`` of each local chunk from every chunk's ``(M, C)``.

    Forward: ``S_in(c+1) = M_c S_in(c) + C_c``, ``S_in(0) = 0``. Backward, with ``d_c`` the
    gradient of this rank's use of ``S_in(c)``: ``lam_c = d_c + M_c^T lam_{c+1}`` from the
    last chunk down, ``dC_c = lam_{c+1}``, ``dM_c = lam_{c+1} S_in(c)^T``.
    """

    @staticmethod
    def forward(ctx, sp, geo, kind, M, C):
        # M: (n_local, B, H, K, 1 or K) or (n_local, B, H, 1, 1); C: (n_local, B, H, K, V).
        if sp.linear_strategy == "scan":
            S_in = _chain(sp, geo, lambda i, x, s: _apply(kind, M[i], x) + C[i][..., s],
                          C[0], reverse=False, op="linear")
            M_all = None
        else:
            M_all, C_all = _gather_chunks(sp, geo, [M, C], "linear")
            S_all = _fold(kind, M_all, C_all, max(geo.chunks), reverse=False)
            S_in = [S_all[c] for c in geo.chunks]
        S_in = torch.stack(S_in)
        ctx.sp, ctx.geo, ctx.kind, ctx.M_all = sp, geo, kind, M_all
        ctx.save_for_backward(M, S_in)
        return S_in

    @staticmethod
    def backward(ctx, dS_in):
        sp, geo, kind = ctx.sp, ctx.geo, ctx.kind
        M, S_in = ctx.saved_tensors
        dS_in = dS_in.contiguous()
        if sp.linear_strategy == "scan":
            lam = _chain(sp, geo, lambda i, x, s: _apply(kind, M[i], x, transpose=True) + dS_in[i][..., s],
                         dS_in[0], reverse=True, op="linear.backward")
        else:
            d_all, = _gather_chunks(sp, geo, [dS_in], "linear.backward")
            lam_all = _fold(kind, ctx.M_all, d_all, min(geo.chunks), reverse=True)
            lam = [lam_all[c] for c in geo.chunks]
        lam = torch.stack(lam)  # lam[i] = adjoint of the state leaving local chunk i
        return None, None, None, _grad_m(kind, M, lam, S_in), lam


# ---- per-chunk work ----

def _head_operator(kind, q, k, g, beta, *, scale, chunk_size, backend):
    """How the state entering a stretch of one sequence reaches its outputs and its end.

    Returns ``R`` (B, T, H, K) float32 and ``M`` such that the stretch's outputs gain
    ``R_t S_in`` and its final state gains ``M S_in`` (``M``: (B, H, K or 1, 1) diagonal
    or (B, H, K, K)). Diag: ``R_t = scale q_t exp(G_t)``, ``M = exp(G_T)`` in closed form.
    Delta: one engine run with ``v = 0`` of width K from the identity state: by linearity
    its outputs are ``R`` and its final state is ``M`` (one extra pass of width K, after
    which applying any incoming state is a matmul).
    """
    B, T, H, K = k.shape
    if kind == "delta":
        eye = torch.eye(K, device=k.device).expand(B, H, K, K).contiguous()
        R, M = run_delta(q, k, k.new_zeros(B, T, H, K), g, beta, scale=scale, initial_state=eye,
                         output_final_state=True, offsets=None, chunk_size=chunk_size,
                         backend=backend)
        return R.float(), M
    if g is None:
        return scale * q.float(), q.new_ones(B, H, 1, 1, dtype=torch.float32)
    G = g.cumsum(1)
    G = G[..., None] if g.dim() == 3 else G  # (B, T, H, 1 or K)
    return scale * q.float() * G.exp(), G[:, -1, :, :, None].exp()


def sp_linear(sp, kind, q, k, v, g, beta, *, scale, initial_state, output_final_state,
              cu_seqlens, chunk_size, backend):
    """Sequence-parallel linear-family op (called by the public ops with ``sp=``).

    Each rank passes its shard of q, k (B, T/P, H, K), v (B, T/P, H, V), g, beta and the
    same global ``cu_seqlens`` (B == 1; documents may cross shard boundaries) on every
    rank.

    initial_state: the same (N, H, K, V) tensor (or None) on every rank, N = B or the
        number of documents. Row n enters where sequence / document n starts: on rank 0
        without packing, on the rank holding the document's first token when packed.
        Its gradient on each rank is that rank's share: sum it over the SP group (as
        for any replicated input).
    Returns:
        o: this rank's shard of the outputs, (B, T/P, H, V) in v's dtype.
        final state (if ``output_final_state``), float32:
        * not packed: (B, H, K, V), the state after this rank's last token, so the rank
          holding the last token of the sequence (rank P-1 contiguous, rank 0 zigzag)
          returns the single-device final state;
        * packed: (N, H, K, V), the final state of each document that ends on this
          rank and zeros for the others, so the sum over ranks is the single-device
          result.
    """
    B, Tl, H, K = q.shape
    V = v.shape[-1]
    g_dims = -1 if g is None else g.dim()
    def validate():
        geo = sp.geometry(Tl)
        offsets = check_cu_seqlens(cu_seqlens, B, geo.total, q.device)
        N = B if offsets is None else len(offsets) - 1
        check_state("initial_state", initial_state, (N, H, K, V), q.device)
        return geo, offsets, N

    desc = {"delta rule": kind == "delta", "B": B, "T/P": Tl, "H": H, "K": K, "V": V,
            "gate dims": g_dims, "q dtype": dtype_code(q),
            "initial_state dtype": dtype_code(initial_state), **offsets_digest(cu_seqlens)}
    geo, offsets, N = sp._agree("q", desc, validate)
    if initial_state is not None:
        initial_state = initial_state.float()
    run = run_diag if kind == "diag" else run_delta
    common = dict(scale=scale, chunk_size=chunk_size, backend=backend)

    def sl(x, a, b):
        return None if x is None else x[:, a:b]

    plans, o_loc, Ms, Cs = [], [], [], []
    for i in range(len(geo.chunks)):
        pieces = chunk_pieces(geo, i, offsets)
        a, b = geo.local_span(i)
        xs = [sl(x, a, b) for x in (q, k, v, g, beta)]
        args = xs[:4] if kind == "diag" else xs
        if offsets is None:
            init = None if pieces[0].head else initial_state
            o, fin = run(*args, initial_state=init, output_final_state=True, offsets=None, **common)
        else:
            local = [p.local - a for p in pieces] + [b - a]
            init = None
            if initial_state is not None:
                init = torch.stack([torch.zeros_like(initial_state[0]) if p.head else initial_state[p.doc]
                                    for p in pieces])
            o, fin = run(*args, initial_state=init, output_final_state=True, offsets=local, **common)
        head = None
        if pieces[0].head:
            p = pieces[0]
            hx = [sl(x, p.local, p.local + p.end - p.start) for x in (q, k, g, beta)]
            head = _head_operator(kind, *hx, **common)
        if head is not None and len(pieces) == 1:
            M = head[1]
        else:  # a sequence starts inside the chunk: the chain resets
            M = torch.zeros(B, H, K if kind == "delta" or g_dims == 4 else 1,
                            K if kind == "delta" else 1, device=q.device)
        plans.append((pieces, fin, head))
        o_loc.append(o)
        Ms.append(M)
        Cs.append(fin[-1:] if offsets is not None else fin)

    S_in = _StateExchange.apply(sp, geo, kind, torch.stack(Ms), torch.stack(Cs))

    outs, finals = [], {}
    for i, ((pieces, fin, head), o) in enumerate(zip(plans, o_loc)):
        if head is None:
            outs.append(o)
            continue
        R, M_head = head
        h = pieces[0].end - pieces[0].start
        o_dep = torch.einsum("bthk,bhkv->bthv", R, S_in[i])
        outs.append(torch.cat([(o[:, :h].float() + o_dep).to(o.dtype), o[:, h:]], 1))
        S_dep = _apply(kind, M_head, S_in[i])
        # The head sequence's state at the end of its piece: its own part plus S_in's.
        finals[i] = (fin if offsets is None else fin[:1]) + S_dep
    # Anchor before cat / clone: outputs of a custom Function that are views of its
    # input could not be modified in place by the caller.
    outs[0] = Anchor.apply(outs[0], S_in)
    o = torch.cat(outs, 1)
    if not output_final_state:
        return o, None
    S = _final_states(geo, plans, finals, offsets, N, (H, K, V), q.device)
    return o, Anchor.apply(S, S_in).clone()


def _final_states(geo, plans, head_finals, offsets, N, hkv, device):
    """Assemble the returned final state from the pieces' final states (see
    :func:`sp_linear`)."""
    if offsets is None:
        last = len(plans) - 1
        return head_finals.get(last, plans[last][1])
    rows = {}
    for i, (pieces, fin, _) in enumerate(plans):
        for j, p in enumerate(pieces):
            if p.ends:
                rows[p.doc] = head_finals[i][0] if (j == 0 and p.head) else fin[j]
    zero = torch.zeros(hkv, device=device)
    return torch.stack([rows.get(n, zero) for n in range(N)])
