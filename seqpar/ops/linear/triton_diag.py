"""Chunkwise Triton kernels for the diagonal family without a gate (linear attention) or
with one log decay per head and token (simple GLA, retention, mLSTM), forward and
backward; float32 states and accumulation.

Per chunk of ``BT`` tokens with cumulative log2 decay ``G_i`` (from the chunk start,
float32) and the state ``h_c`` entering chunk ``c``:

* ``o_i = scale * (sum_{j<=i} 2^(G_i - G_j) (q_i.k_j) v_j + 2^G_i q_i h_c)``;
* ``h_{c+1} = 2^G_C h_c + sum_j 2^(G_C - G_j) k_j^T v_j`` (sequential over chunks, one
  program per document, head and (K, V) tile).

Every exponent is ``G_i - G_j`` with ``j <= i``, or ``G_i``, ``G_C - G_j``, ``G_C``:
never positive, so no decay overflows however strong.

Backward: the reverse state pass gives ``dh_c`` (gradient of the state leaving chunk
``c``); then ``dv`` and ``(dq, dk)`` kernels. The gate gradient is assembled from terms
that carry no cancellation of undecayed quantities: with ``P_ij = dA_ij A_ij`` (strictly
below the diagonal), ``a_i = q_i.dq_i^inter``, ``b_j = k_j.dk_j^state`` and
``c = sum(2^G_C h_c * dh_c)``,
``dg_t = sum_{i>=t} (a_i + rowsum_i P - colsum_i P + [i = C] c) + sum_{j<t} b_j``.

The per-key gate (GLA) has its own kernels in ``triton_gla.py``; :func:`triton_diag`
hands it over.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    BK,
    BT,
    BV,
    BV_STATE,
    as_packed,
    chunk_gates,
    chunk_plan,
    dg_kernel,
    doc_span,
    dot_precision,
    dqk_kernel,
    gate_cumsum,
    load_tile,
    mma,
    packed_offsets,
    pair_kernel,
    state_dtype,
    store_tile,
)

NUM_WARPS = 4


@triton.jit
def _state_kernel(x, y, gc, h, s0, s_out, offs, coff, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                  REVERSE: tl.constexpr, HAS_S0: tl.constexpr, STORE_OUT: tl.constexpr,
                  STORE_H: tl.constexpr, PREC: tl.constexpr):
    """Sequential state pass of one document, head and (K, V) tile.

    Forward (REVERSE=False, x=k, y=v): stores the state entering each chunk into h.
    Backward (REVERSE=True, x=q, y=do): walks chunks last to first and stores the
    gradient of the state leaving each chunk into h. s0 is the initial state (or dht),
    s_out receives the final state (or dh0). Without STORE_H only s_out is written: the
    state-only passes of sequence parallelism.
    """
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n, i_h = i_nh // H, i_nh % H
    bos, T_doc, boc = doc_span(offs, coff, n)
    NC = tl.cdiv(T_doc, BT).to(tl.int32)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        b_h += load_tile(s0 + i_nh * K * V, i_k * BK, i_v * BV, V, 1, K, V, BK, BV).to(tl.float32)
    for i in range(NC):
        c = NC - 1 - i if REVERSE else i
        if STORE_H:
            store_tile(h + ((boc + c) * H + i_h) * K * V, b_h.to(h.dtype.element_ty), i_k * BK,
                       i_v * BV, V, 1, K, V, BK, BV)
        b_x = load_tile(x + (bos * H + i_h) * K, i_k * BK, c * BT, 1, H * K, K, T_doc, BK, BT)
        b_y = load_tile(y + (bos * H + i_h) * V, c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV)
        if USE_G:
            b_g, g_last = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
            b_h *= tl.exp2(g_last)
            # forward: k_j 2^(G_C - G_j); backward: q_i 2^G_i
            w = b_g if REVERSE else g_last - b_g
            b_x = (b_x * tl.exp2(w)[None, :]).to(b_y.dtype)
        if REVERSE:
            b_h += scale * mma(b_x, b_y, PREC)
        else:
            b_h += mma(b_x, b_y, PREC)
    if STORE_OUT:
        store_tile(s_out + i_nh * K * V, b_h, i_k * BK, i_v * BV, V, 1, K, V, BK, BV)


def _state_pass(x, y, gc, s0, plan, scale, reverse, store_out, K, V, store_h=True):
    H = x.shape[2]
    BV = BV_STATE
    h = x.new_empty(plan.n_chunks, H, K, V, dtype=state_dtype(x)) if store_h else None
    s_out = x.new_empty(plan.n_docs, H, K, V, dtype=torch.float32) if store_out else None
    grid = (triton.cdiv(K, BK), triton.cdiv(V, BV), plan.n_docs * H)
    _state_kernel[grid](x, y, gc, h, s0, s_out, plan.offsets, plan.chunk_offsets, scale,
                        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=gc is not None,
                        REVERSE=reverse, HAS_S0=s0 is not None, STORE_OUT=store_out,
                        STORE_H=store_h, PREC=dot_precision(x.dtype), num_warps=NUM_WARPS)
    return h, s_out


def _pair(a, b, y, h, gc, plan, scale, backward, K, V):
    H = a.shape[2]
    out = torch.empty_like(y)
    grid = (triton.cdiv(V, BV), plan.n_chunks, H)
    pair_kernel[grid](a, b, y, h, gc, out, plan.offsets, plan.chunk_index, scale,
                      H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=gc is not None,
                      BACKWARD=backward, PREC=dot_precision(a.dtype), num_warps=NUM_WARPS)
    return out


def diag_forward(q, k, v, g, h0, scale: float, offsets: list[int], gc=None):
    """Packed inputs q, k (1, TT, H, K), v (1, TT, H, V), g None or (1, TT, H) float32,
    h0 None or (N, H, K, V); ``gc``: g's :func:`gate_cumsum` if already computed.
    Returns o (1, TT, H, V) in v's dtype and the final state (N, H, K, V) float32."""
    K, V = q.shape[-1], v.shape[-1]
    plan = chunk_plan(offsets, q.device)
    if gc is None and g is not None:
        gc = gate_cumsum(g, plan, q.shape[2])
    h, ht = _state_pass(k, v, gc, h0, plan, scale, False, True, K, V)
    o = _pair(q, k, v, h, gc, plan, scale, False, K, V)
    return o, ht


def diag_backward(q, k, v, g, h0, do, dht, scale: float, offsets: list[int], gc=None):
    """Gradients of :func:`diag_forward` (``gc`` as there): dq, dk, dv like their inputs,
    dg (1, TT, H) float32 or None, dh0 (N, H, K, V) float32 or None."""
    _, TT, H, K = q.shape
    V = v.shape[-1]
    plan = chunk_plan(offsets, q.device)
    if gc is None and g is not None:
        gc = gate_cumsum(g, plan, H)
    h, _ = _state_pass(k, v, gc, h0, plan, scale, False, False, K, V)
    dh, dh0 = _state_pass(q, do, gc, dht, plan, scale, True, h0 is not None, K, V)
    dv = _pair(k, q, do, dh, gc, plan, scale, True, K, V)
    NK = triton.cdiv(K, BK)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    r_part = b_part = dg = None
    if g is not None:
        r_part = q.new_empty(NK, TT, H, dtype=torch.float32)
        b_part = torch.empty_like(r_part)
    dqk_kernel[(NK, plan.n_chunks, H)](q, k, v, do, h, dh, gc, dq, dk, r_part, b_part, None,
                                       None, plan.offsets, plan.chunk_index, scale, TT, H=H,
                                       K=K, V=V, BT=BT, BK=BK, BV=BV, USE_G=g is not None,
                                       DW=False, PREC=dot_precision(q.dtype),
                                       num_warps=NUM_WARPS)
    if g is not None:
        dg = torch.empty_like(g)
        dg_kernel[(plan.n_chunks, H)](r_part, b_part, dg, plan.offsets, plan.chunk_index,
                                      TT, H=H, BT=BT, NK=NK)
    return dq, dk, dv, dg, dh0


def diag_cumsum(g, offsets: list[int]):
    """The kernels' G: head log gates g (1, TT, H) float32 summed cumulatively within each
    chunk of the packed documents, in log2 units; same shape and dtype."""
    return gate_cumsum(g, chunk_plan(offsets, g.device), g.shape[2])


def diag_final_states(k, v, gc, h0, offsets: list[int]):
    """The state-only forward pass: final states (N, H, K, V) float32 of the packed
    documents of k (1, TT, H, K), v (1, TT, H, V), gc None or the gates'
    :func:`gate_cumsum` over chunks of these documents (1, TT, H) float32, from h0
    (N, H, K, V) or zeros; no per-chunk states, no outputs."""
    K, V = k.shape[-1], v.shape[-1]
    plan = chunk_plan(offsets, k.device)
    return _state_pass(k, v, gc, h0, plan, 1.0, False, True, K, V, store_h=False)[1]


def diag_initial_grads(q, do, gc, dht, scale: float, offsets: list[int]):
    """The state-only backward pass: the gradient (N, H, K, V) float32 of each packed
    document's initial state from the output gradient do (1, TT, H, V) and the final
    states' gradient dht (N, H, K, V) or None; gc as in :func:`diag_final_states`."""
    K, V = q.shape[-1], do.shape[-1]
    plan = chunk_plan(offsets, q.device)
    return _state_pass(q, do, gc, dht, plan, scale, True, True, K, V, store_h=False)[1]


# torch.library registration: compile traces these as single nodes (no graph break).
# Custom ops cannot return None, so absent gradients come back as empty tensors.
_EMPTY = (0,)


@torch.library.custom_op("seqpar::diag_fwd", mutates_args=())
def _diag_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                 h0: torch.Tensor | None, scale: float, offsets: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return diag_forward(q, k, v, g, h0, scale, offsets)


@_diag_fwd_op.register_fake
def _(q, k, v, g, h0, scale, offsets):
    N, H, K, V = len(offsets) - 1, q.shape[2], q.shape[3], v.shape[3]
    return torch.empty_like(v), q.new_empty(N, H, K, V, dtype=torch.float32)


@torch.library.custom_op("seqpar::diag_bwd", mutates_args=())
def _diag_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                 h0: torch.Tensor | None, do: torch.Tensor, dht: torch.Tensor | None,
                 scale: float, offsets: list[int]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dg, dh0 = diag_backward(q, k, v, g, h0, do, dht, scale, offsets)
    return (dq, dk, dv, q.new_empty(_EMPTY, dtype=torch.float32) if dg is None else dg,
            q.new_empty(_EMPTY, dtype=torch.float32) if dh0 is None else dh0)


@_diag_bwd_op.register_fake
def _(q, k, v, g, h0, do, dht, scale, offsets):
    empty = q.new_empty(_EMPTY, dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            empty if g is None else torch.empty_like(g),
            empty if h0 is None else torch.empty_like(h0, dtype=torch.float32))


def _setup(ctx, inputs, output):
    q, k, v, g, h0, scale, offsets = inputs
    ctx.save_for_backward(q, k, v, g, h0)
    ctx.scale, ctx.offsets = scale, offsets


def _backward(ctx, do, dht):
    q, k, v, g, h0 = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dh0 = _diag_bwd_op(q, k, v, g, h0, do.contiguous(),
                                       None if dht is None else dht.contiguous(),
                                       ctx.scale, ctx.offsets)
    return (dq, dk, dv, None if g is None else dg, None if h0 is None else dh0.to(h0.dtype),
            None, None)


torch.library.register_autograd("seqpar::diag_fwd", _backward, setup_context=_setup)


def triton_diag(q, k, v, g, *, scale: float, initial_state, output_final_state: bool, offsets):
    """Diagonal-transition engine on CUDA (or the Triton interpreter).

    q, k: (B, T, H, K); v: (B, T, H, V) float16/bfloat16/float32; g: None or (B, T, H)
    log decay, float32 (a key gate is :func:`.triton_gla.triton_gla`'s); initial_state:
    (N, H, K, V) or None; offsets: document offsets (list, B == 1) or None. Returns o
    (B, T, H, V) in v's dtype and the final state (N, H, K, V) float32 or None.
    """
    B, T = q.shape[:2]
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht = _diag_fwd_op(as_packed(q), as_packed(k), as_packed(v), as_packed(g), h0,
                         float(scale), packed_offsets(B, T, offsets))
    return o.reshape(v.shape), (ht if output_final_state else None)
