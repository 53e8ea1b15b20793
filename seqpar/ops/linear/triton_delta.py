"""Delta-rule engine behind ``backend='triton'`` (DeltaNet, Gated DeltaNet): the WY form
of :mod:`.chunk_delta` as Triton kernels reading the packed stream ``(1, TT, H, D)``
directly through the chunk plan of :mod:`.triton_common` (rows past a document's end
load as zeros, which are inert: beta = 0 writes nothing, k = 0 reads nothing).

Per chunk (``BT`` tokens, never straddling a document) with cumulative log2 gate ``G``
(:func:`.triton_common.gate_cumsum`; ``e^x`` below is ``2^x`` of log2-scaled exponents), scale s:

* ``_wy_a_kernel``: ``A_ij = beta_i (k_i.k_j) e^(G_i - G_j)`` for ``j < i``;
  :func:`unit_lower_inverse` gives ``N = (I + A)^{-1}``;
* ``_wy_wu_kernel``: ``W = N (beta k e^G)``, ``U = N (beta v)``;
* ``_fwd_kernel`` (sequential over chunks; one program per document, head and V tile;
  the state enters as ``S_c``): ``v'_c = U_c - W_c S_c``,
  ``S_{c+1} = e^G_C S_c + (k e^(G_C - G))^T v'_c``; stores ``S_c`` and ``v'``;
* :func:`.triton_common.pair_kernel` on ``(q, k, v')``: ``o = P v' + s q e^G S_c`` with
  ``P = s (q k^T) e^(G_i - G_j)``, ``j <= i`` (the diagonal family's output kernel, as
  the delta rule's output is linear attention over ``v'``).

Backward, with ``dS`` the gradient of the state leaving a chunk:

* ``_dv_local_kernel`` (parallel): ``P^T do``, the state-free part of ``dv'``;
* ``_bwd_kernel`` (reverse, sequential): ``dv' = P^T do + k e^(G_C - G) dS``,
  ``dS <- e^G_C dS + s (q e^G)^T do - W^T dv'``;
* :func:`.triton_common.dqk_kernel` on ``(q, k, v', do, S_c, dS)``: dq complete, the parts
  of dk and of the gate gradient that come through ``P``, ``q e^G``, ``k e^(G_C - G)``
  and ``e^G_C``, and ``dW = -dv' S_c^T`` (the state tiles are loaded there anyway);
* ``_wy_bwd_kernel``: the rest through ``W``, ``U`` and ``A``. With ``dY = N^T dv'``
  (the gradient of ``beta v``) and ``dX = N^T dW`` (of ``beta k e^G``), the gradient
  of A is ``dA = -(dX W^T + dY U^T) = -dY v'^T`` (strictly lower), which needs
  neither W nor U;
* :func:`.triton_common.dg_kernel`: ``dg_t`` from the per-row terms, each a product of decayed
  quantities (every exponent <= 0, nothing undecayed cancels).

This is flash-linear-attention's split of the backward (dW beside dq and dk, the WY
gradients from dW and dv'): dW is formed where the state tiles are loaded anyway, so the
WY backward never reloads the states per key tile.

Precision: every product has operands in the inputs' dtype and float32 accumulation,
and every stored intermediate but A is in the inputs' dtype: N (a copy; computed in float32),
W, U, the per-chunk states and their gradients, v', dv' and its state-free part, dW and
dk's first part (for 16-bit inputs: half the bytes, and the kernels outside the
sequential passes are bound by their memory traffic); the carried state, A and every
accumulator are float32. Float32 inputs keep float32 throughout (three-pass tf32
products, :func:`dot_precision`). ``v' = U - W S`` cancels once the state has learned
the values, so 16-bit rounding of its operands shows relatively larger in ``v'`` than
elsewhere; the bf16 tolerance of the tests (2e-2) covers it with room to spare (the
worst bf16 errors are in docs/kernels.md).
"""
from __future__ import annotations

import copy
import functools

import torch
import triton
import triton.language as tl

from ..validate import fail
from .triton_common import (
    BK,
    BT,
    BV,
    BV_STATE,
    as_packed,
    chunk_gates,
    chunk_plan,
    dg_kernel,
    doc_bounds,
    doc_span,
    dot_precision,
    dqk_kernel,
    gate_cumsum,
    load_tile,
    mma,
    packed_offsets,
    pair_kernel,
    store_tile,
)

NUM_WARPS = 4
MAX_DIM = 128  # K and V: the state tile spans all of K, and one K tile is at most 128 wide


def _k_tile(K: int) -> int:
    # Two fixed sizes: small heads are masked inside 64 (as the diagonal kernels do).
    return 64 if K <= 64 else 128


@triton.jit
def _wy_a_kernel(k, beta, gc, a, offs, cidx, H: tl.constexpr, K: tl.constexpr,
                 BT: tl.constexpr, BK: tl.constexpr, USE_G: tl.constexpr, PREC: tl.constexpr):
    """A of one chunk and head (strictly lower, float32) into a (NT, H, BT, BT)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    b_a = mma(load_tile(k + (bos * H + i_h) * K, c * BT, 0, H * K, 1, T_doc, K, BT, BK),
              load_tile(k + (bos * H + i_h) * K, 0, c * BT, 1, H * K, K, T_doc, BK, BT), PREC)
    o = tl.arange(0, BT)
    t = c * BT + o
    b_beta = tl.load(beta + (bos + t) * H + i_h, mask=t < T_doc, other=0.).to(tl.float32)
    lower = o[:, None] > o[None, :]
    if USE_G:
        b_g, _ = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
        b_a *= tl.exp2(tl.where(lower, b_g[:, None] - b_g[None, :], 0.))
    b_a = tl.where(lower, b_a * b_beta[:, None], 0.)
    tl.store(a + (i_t * H + i_h).to(tl.int64) * BT * BT + o[:, None] * BT + o[None, :], b_a)


@triton.jit
def _wy_apply(b_n, x, out, b_row, bos, c, T_doc, i_h, i_c, H: tl.constexpr, D: tl.constexpr,
              BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
    """``out = N (b_row x)`` for one chunk of x (packed, D wide) into out (NT, H, BT, D),
    D tile by D tile; b_n is N in x's dtype."""
    for i_d in range(tl.cdiv(D, BD)):
        b_x = load_tile(x + (bos * H + i_h) * D, c * BT, i_d * BD, H * D, 1, T_doc, D, BT, BD)
        b_x = (b_x.to(tl.float32) * b_row[:, None]).to(b_x.dtype)
        store_tile(out + i_c * BT * D, mma(b_n, b_x, PREC).to(out.dtype.element_ty), 0, i_d * BD,
                   D, 1, BT, D, BT, BD)


@triton.jit
def _wy_wu_kernel(k, v, beta, gc, ai, an, w, u, offs, cidx, H: tl.constexpr, K: tl.constexpr,
                  V: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, USE_G: tl.constexpr,
                  STORE_N: tl.constexpr, PREC: tl.constexpr):
    """``W = N (beta k e^G)`` into w (NT, H, BT, K) and ``U = N (beta v)`` into
    u (NT, H, BT, V) for one chunk and head, N from ai (NT, H, BT, BT) float32; with
    STORE_N, N in the inputs' dtype into an (same shape) for the backward."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    i_c = (i_t * H + i_h).to(tl.int64)
    o = tl.arange(0, BT)
    t = c * BT + o
    b_n = tl.load(ai + i_c * BT * BT + o[:, None] * BT + o[None, :]).to(k.dtype.element_ty)
    if STORE_N:
        tl.store(an + i_c * BT * BT + o[:, None] * BT + o[None, :], b_n)
    b_beta = tl.load(beta + (bos + t) * H + i_h, mask=t < T_doc, other=0.).to(tl.float32)
    _wy_apply(b_n, v, u, b_beta, bos, c, T_doc, i_h, i_c, H, V, BT, BD, PREC)
    if USE_G:
        b_g, _ = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
        b_beta *= tl.exp2(b_g)
    _wy_apply(b_n, k, w, b_beta, bos, c, T_doc, i_h, i_c, H, K, BT, BD, PREC)


@triton.jit
def _fwd_kernel(k, w, u, gc, h0, h, vn, ht, offs, coff,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                HAS_H0: tl.constexpr, PREC: tl.constexpr):
    """Forward state pass of one document, head and V tile: the state entering each
    chunk into h (NT, H, K, V), v' into vn (packed, v's dtype), the final state into
    ht."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    n, i_h = i_nh // H, i_nh % H
    bos, T_doc, boc = doc_span(offs, coff, n)
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_s += load_tile(h0 + i_nh.to(tl.int64) * K * V, 0, i_v * BV, V, 1, K, V, BK, BV)
    for c in range(tl.cdiv(T_doc, BT).to(tl.int32)):
        i_c = (boc + c) * H + i_h
        store_tile(h + i_c * K * V, b_s.to(h.dtype.element_ty), 0, i_v * BV, V, 1, K, V, BK, BV)
        b_w = load_tile(w + i_c * BT * K, 0, 0, K, 1, BT, K, BT, BK)
        b_v = load_tile(u + i_c * BT * V, 0, i_v * BV, V, 1, BT, V, BT, BV).to(tl.float32)
        b_v -= mma(b_w, b_s.to(b_w.dtype), PREC)
        store_tile(vn + (bos * H + i_h) * V, b_v.to(vn.dtype.element_ty), c * BT, i_v * BV, H * V,
                   1, T_doc, V, BT, BV)
        b_kT = load_tile(k + (bos * H + i_h) * K, 0, c * BT, 1, H * K, K, T_doc, BK, BT)
        # decays scale the small (BT, BV) operand, not the (BK, BT) one: fewer registers
        if USE_G:
            b_g, g_last = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
            b_s *= tl.exp2(g_last)
            b_v *= tl.exp2(g_last - b_g)[:, None]
        b_s += mma(b_kT, b_v.to(b_kT.dtype), PREC)
    store_tile(ht + i_nh.to(tl.int64) * K * V, b_s, 0, i_v * BV, V, 1, K, V, BK, BV)


@triton.jit
def _chain_kernel(k, w, u, gc, h0, ht, mt, offs, coff,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                  HAS_H0: tl.constexpr, PREC: tl.constexpr):
    """The state-only forward pass of sequence parallelism, one document and head per
    program column. Programs ``i_v < cdiv(V, BV)`` carry the state from h0 (or zero)
    with the pseudo-values ``U - W S`` and store the final state (a V tile) into ht
    (N, H, K, V); the others carry the K x K transition from the identity with ``-W M``
    alone and store it (a tile of its columns) into mt (N, H, K, K). By linearity the
    document maps any entering state S to ``mt S + ht``."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    n, i_h = i_nh // H, i_nh % H
    bos, T_doc, boc = doc_span(offs, coff, n)
    NV: tl.constexpr = (V + BV - 1) // BV
    trans = i_v >= NV
    keep = i_v < NV
    width = tl.where(trans, K, V)
    kk = tl.arange(0, BK)
    cols = (i_v - trans.to(tl.int32) * NV) * BV + tl.arange(0, BV)
    rows = tl.arange(0, BT)
    m_s = (kk[:, None] < K) & (cols[None, :] < width)
    b_s = tl.where(kk[:, None] == cols[None, :], 1., 0.) * trans.to(tl.float32)
    if HAS_H0:
        b_s += tl.load(h0 + i_nh.to(tl.int64) * K * V + kk[:, None] * V + cols[None, :],
                       mask=m_s & keep, other=0.)
    for c in range(tl.cdiv(T_doc, BT).to(tl.int32)):
        i_c = (boc + c) * H + i_h
        b_w = load_tile(w + i_c * BT * K, 0, 0, K, 1, BT, K, BT, BK)
        b_v = tl.load(u + i_c.to(tl.int64) * BT * V + rows[:, None] * V + cols[None, :],
                      mask=(cols[None, :] < V) & keep, other=0.).to(tl.float32)
        b_v -= mma(b_w, b_s.to(b_w.dtype), PREC)
        b_kT = load_tile(k + (bos * H + i_h) * K, 0, c * BT, 1, H * K, K, T_doc, BK, BT)
        if USE_G:
            b_g, g_last = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
            b_s *= tl.exp2(g_last)
            b_v *= tl.exp2(g_last - b_g)[:, None]
        b_s += mma(b_kT, b_v.to(b_kT.dtype), PREC)
    if trans:
        tl.store(mt + i_nh.to(tl.int64) * K * K + kk[:, None] * K + cols[None, :], b_s, mask=m_s)
    else:
        tl.store(ht + i_nh.to(tl.int64) * K * V + kk[:, None] * V + cols[None, :], b_s, mask=m_s)


@triton.jit
def _dv_local_kernel(q, k, do, gc, dvl, offs, cidx, scale, H: tl.constexpr, K: tl.constexpr,
                     V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     USE_G: tl.constexpr, PREC: tl.constexpr):
    """``P^T do`` of one chunk and head into dvl (packed, do's dtype): the part of dv' that
    needs no state, off the sequential pass. P is formed once and applied V tile by V
    tile (per V tile it repeated its K-long products V / BV times)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    b_pT = tl.zeros([BT, BT], dtype=tl.float32)  # [j, i] = k_j.q_i
    for i_k in range(tl.cdiv(K, BK)):
        b_pT += mma(load_tile(k + (bos * H + i_h) * K, c * BT, i_k * BK, H * K, 1, T_doc, K, BT,
                              BK),
                    load_tile(q + (bos * H + i_h) * K, i_k * BK, c * BT, 1, H * K, K, T_doc, BK,
                              BT), PREC)
    o = tl.arange(0, BT)
    anti = o[:, None] <= o[None, :]
    if USE_G:
        b_g, _ = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
        b_pT *= tl.exp2(tl.where(anti, b_g[None, :] - b_g[:, None], 0.))
    b_pT = tl.where(anti, b_pT * scale, 0.).to(do.dtype.element_ty)
    for i_v in range(tl.cdiv(V, BV)):
        b_do = load_tile(do + (bos * H + i_h) * V, c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV)
        store_tile(dvl + (bos * H + i_h) * V, mma(b_pT, b_do, PREC).to(dvl.dtype.element_ty),
                   c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV)


@triton.jit
def _bwd_kernel(q, k, w, gc, do, dht, dvl, dvn, dsl, dh0, offs, coff, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                HAS_DHT: tl.constexpr, STORE: tl.constexpr, PREC: tl.constexpr):
    """Reverse state pass of one document, head and V tile, last chunk first: the
    gradient of the state leaving each chunk into dsl (NT, H, K, V), the gradient of v'
    into dvn (packed, v's dtype) from its state-free part in dvl (packed, v's dtype) and
    the gradient of the initial state into dh0. Without STORE only dh0 is written (the
    state-only pass of sequence parallelism)."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    n, i_h = i_nh // H, i_nh % H
    bos, T_doc, boc = doc_span(offs, coff, n)
    NC = tl.cdiv(T_doc, BT).to(tl.int32)
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_ds += load_tile(dht + i_nh.to(tl.int64) * K * V, 0, i_v * BV, V, 1, K, V, BK, BV)
    for i in range(NC):
        c = NC - 1 - i
        i_c = (boc + c) * H + i_h
        if STORE:
            store_tile(dsl + i_c * K * V, b_ds.to(dsl.dtype.element_ty), 0, i_v * BV, V, 1, K, V,
                       BK, BV)
        b_k = load_tile(k + (bos * H + i_h) * K, c * BT, 0, H * K, 1, T_doc, K, BT, BK)
        b_kds = mma(b_k, b_ds.to(b_k.dtype), PREC)
        b_do = load_tile(do + (bos * H + i_h) * V, c * BT, i_v * BV, H * V, 1, T_doc, V, BT,
                         BV).to(tl.float32) * scale
        # decays scale the small (BT, BV) operands and results, not the (BT, BK) ones
        if USE_G:
            b_g, g_last = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
            b_kds *= tl.exp2(g_last - b_g)[:, None]
            b_ds *= tl.exp2(g_last)
            b_do *= tl.exp2(b_g)[:, None]
        b_dv = (load_tile(dvl + (bos * H + i_h) * V, c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV)
                + b_kds).to(dvl.dtype.element_ty)
        if STORE:
            store_tile(dvn + (bos * H + i_h) * V, b_dv, c * BT, i_v * BV, H * V, 1, T_doc, V, BT,
                       BV)
        b_qT = load_tile(q + (bos * H + i_h) * K, 0, c * BT, 1, H * K, K, T_doc, BK, BT)
        b_wT = load_tile(w + i_c * BT * K, 0, 0, 1, K, K, BT, BK, BT)
        b_ds += mma(b_qT, b_do.to(b_qT.dtype), PREC) - mma(b_wT, b_dv, PREC)
    store_tile(dh0 + i_nh.to(tl.int64) * K * V, b_ds, 0, i_v * BV, V, 1, K, V, BK, BV)


@triton.jit
def _wy_bwd_kernel(k, v, beta, gc, an, vn, dvn, dw, dk_part, dk, dv, dbeta, r_out, b_out,
                   offs, cidx, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                   BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                   USE_G: tl.constexpr, PREC: tl.constexpr):
    """Gradients through W, U and A of one chunk and head from ``dU = dv'`` (dvn),
    ``dW = -dv' S^T`` (dw, from ``dqk_kernel``) and N (an, the inputs' dtype): dv,
    dbeta, dk (dk_part plus the terms through ``beta k e^G`` and A) and this kernel's
    share of the gate terms (r into r_out; b_out gets zeros). ``dY = N^T dv'`` and ``dX = N^T dW`` are the gradients
    of ``beta v`` and ``beta k e^G``; ``M = dA e^(G_i - G_j)`` enters dk as
    ``(M + M^T) (beta k)`` with beta on M's rows."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    i_c = (i_t * H + i_h).to(tl.int64)
    o = tl.arange(0, BT)
    t = c * BT + o
    m = t < T_doc
    DT = k.dtype.element_ty
    b_nT = tl.load(an + i_c * BT * BT + o[None, :] * BT + o[:, None]).to(DT)
    b_beta = tl.load(beta + (bos + t) * H + i_h, mask=m, other=0.).to(tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_db = tl.zeros([BT], dtype=tl.float32)
    base_v = (bos * H + i_h) * V
    base_k = (bos * H + i_h) * K
    for i_v in range(tl.cdiv(V, BV)):
        b_dy = mma(b_nT, load_tile(dvn + base_v, c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV),
                   PREC)
        b_v = load_tile(v + base_v, c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV).to(tl.float32)
        b_db += tl.sum(b_dy * b_v, axis=1)
        store_tile(dv + base_v, (b_dy * b_beta[:, None]).to(dv.dtype.element_ty), c * BT, i_v * BV,
                   H * V, 1, T_doc, V, BT, BV)
        b_dA -= mma(b_dy.to(DT),
                    load_tile(vn + base_v, i_v * BV, c * BT, 1, H * V, V, T_doc, BV, BT), PREC)
    b_kk = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_kk += mma(load_tile(k + base_k, c * BT, i_k * BK, H * K, 1, T_doc, K, BT, BK),
                    load_tile(k + base_k, i_k * BK, c * BT, 1, H * K, K, T_doc, BK, BT), PREC)
    lower = o[:, None] > o[None, :]
    if USE_G:
        b_g, _ = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
        b_e = tl.exp2(b_g)
        b_m = tl.where(lower, b_dA * tl.exp2(tl.where(lower, b_g[:, None] - b_g[None, :], 0.)), 0.)
    else:
        b_e = tl.full([BT], 1., tl.float32)
        b_m = tl.where(lower, b_dA, 0.)
    b_mkk = b_m * b_kk
    b_db += tl.sum(b_mkk, axis=1)
    # the gate enters A as G_i - G_j: rows of dA * A minus its columns (k k^T is symmetric)
    b_mkk *= b_beta[:, None]
    b_r = tl.sum(b_mkk, axis=1) - tl.sum(b_mkk, axis=0)
    b_m *= b_beta[:, None]
    b_ms = (b_m + tl.trans(b_m)).to(DT)
    for i_k in range(tl.cdiv(K, BK)):
        b_dx = mma(b_nT, load_tile(dw + base_k, c * BT, i_k * BK, H * K, 1, T_doc, K, BT, BK),
                   PREC)
        b_k = load_tile(k + base_k, c * BT, i_k * BK, H * K, 1, T_doc, K, BT, BK)
        b_xk = tl.sum(b_dx * b_k.to(tl.float32), axis=1) * b_e  # dX_i . k_i e^G_i
        b_db += b_xk
        b_r += b_beta * b_xk
        b_dk = (load_tile(dk_part + base_k, c * BT, i_k * BK, H * K, 1, T_doc, K, BT, BK)
                + (b_beta * b_e)[:, None] * b_dx)
        b_dk += mma(b_ms, b_k, PREC)
        store_tile(dk + base_k, b_dk.to(dk.dtype.element_ty), c * BT, i_k * BK, H * K, 1, T_doc, K,
                   BT, BK)
    tl.store(dbeta + (bos + t) * H + i_h, b_db.to(dbeta.dtype.element_ty), mask=m)
    if USE_G:
        tl.store(r_out + (bos + t) * H + i_h, b_r, mask=m)
        tl.store(b_out + (bos + t) * H + i_h, tl.zeros([BT], dtype=tl.float32), mask=m)


@triton.jit
def _block(a, i, j, BT: tl.constexpr, BC: tl.constexpr):
    """Block (i, j) of a BT x BT row-major matrix cut into BC x BC blocks."""
    o = tl.arange(0, BC)
    return tl.load(a + (i * BC + o)[:, None] * BT + j * BC + o[None, :])


@triton.jit
def _put(out, x, i, j, BT: tl.constexpr, BC: tl.constexpr):
    o = tl.arange(0, BC)
    tl.store(out + (i * BC + o)[:, None] * BT + j * BC + o[None, :], x.to(out.dtype.element_ty))


@triton.jit
def _diag_inverse(a, i, BT: tl.constexpr, BC: tl.constexpr):
    """``(I + L)^{-1}`` of diagonal block i (L strictly lower) by forward substitution:
    row r of ``M = (I + L)^{-1} - I`` is ``-L_r - sum_{j<r} L_rj M_j``. Rows are read
    from memory because a register tile cannot be indexed by a loop variable."""
    o = tl.arange(0, BC)
    b_m = tl.where(o[:, None] > o[None, :], -_block(a, i, i, BT, BC), 0.)
    for r in range(2, BC):
        b_r = tl.load(a + (i * BC + r) * BT + i * BC + o)
        b_r = tl.where(o < r, -b_r, 0.)
        b_r += tl.sum(b_r[:, None] * b_m, 0)
        b_m = tl.where((o == r)[:, None], b_r[None, :], b_m)
    return b_m + tl.where(o[:, None] == o[None, :], 1., 0.)


@triton.jit
def _inverse_kernel(a, out, BT: tl.constexpr, PREC: tl.constexpr):
    """``(I + A)^{-1}`` of one BT x BT strictly lower A (BT = 64) as 4 x 4 blocks of 16:
    diagonal blocks by forward substitution, then block row i below the diagonal as
    ``N_ij = -N_ii sum_{j<=m<i} A_im N_mj`` (blocked forward substitution); blocks
    above the diagonal are written as zeros here, which spares the caller a memset
    pass over the whole output."""
    BC: tl.constexpr = BT // 4
    i_b = tl.program_id(0).to(tl.int64)
    a += i_b * BT * BT
    out += i_b * BT * BT
    n11 = _diag_inverse(a, 0, BT, BC)
    n22 = _diag_inverse(a, 1, BT, BC)
    n33 = _diag_inverse(a, 2, BT, BC)
    n44 = _diag_inverse(a, 3, BT, BC)
    a21, a31, a32 = _block(a, 1, 0, BT, BC), _block(a, 2, 0, BT, BC), _block(a, 2, 1, BT, BC)
    a41, a42, a43 = _block(a, 3, 0, BT, BC), _block(a, 3, 1, BT, BC), _block(a, 3, 2, BT, BC)
    n21 = -mma(mma(n22, a21, PREC), n11, PREC)
    n32 = -mma(mma(n33, a32, PREC), n22, PREC)
    n31 = -mma(n33, mma(a31, n11, PREC) + mma(a32, n21, PREC), PREC)
    n43 = -mma(mma(n44, a43, PREC), n33, PREC)
    n42 = -mma(n44, mma(a42, n22, PREC) + mma(a43, n32, PREC), PREC)
    n41 = -mma(n44, mma(a41, n11, PREC) + mma(a42, n21, PREC) + mma(a43, n31, PREC), PREC)
    _put(out, n11, 0, 0, BT, BC)
    _put(out, n22, 1, 1, BT, BC)
    _put(out, n33, 2, 2, BT, BC)
    _put(out, n44, 3, 3, BT, BC)
    _put(out, n21, 1, 0, BT, BC)
    _put(out, n31, 2, 0, BT, BC)
    _put(out, n32, 2, 1, BT, BC)
    _put(out, n41, 3, 0, BT, BC)
    _put(out, n42, 3, 1, BT, BC)
    _put(out, n43, 3, 2, BT, BC)
    zero = tl.zeros([BC, BC], dtype=tl.float32)
    for i in tl.static_range(3):
        for j in tl.static_range(i + 1, 4):
            _put(out, zero, i, j, BT, BC)


@torch.library.custom_op("seqpar::unit_lower_inverse", mutates_args=())
def unit_lower_inverse(a: torch.Tensor) -> torch.Tensor:
    """``(I + A)^{-1}`` for strictly lower float32 ``A`` of shape (..., BT, BT), BT = 64:
    one Triton program per matrix, replacing two batched triangular solves by one
    inversion and two matmuls. Backward: ``dA = -(N^T dN N^T)`` strictly below the
    diagonal."""
    a = a.contiguous()
    out = torch.empty_like(a)
    _inverse_kernel[(a.numel() // (BT * BT),)](a, out, BT=BT, PREC=dot_precision(torch.float32),
                                               **INVERSE_META)
    return out


@unit_lower_inverse.register_fake
def _(a):
    return torch.empty_like(a)


def _inverse_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _inverse_backward(ctx, dn):
    n = ctx.saved_tensors[0]
    nt = n.transpose(-1, -2)
    return -(nt @ dn @ nt).tril(-1)


torch.library.register_autograd("seqpar::unit_lower_inverse", _inverse_backward,
                                setup_context=_inverse_setup)


def _dqk_meta(dtype: torch.dtype, use_g: bool) -> dict:
    """Launch settings of :func:`.triton_common.dqk_kernel` here: 8 warps with the gate terms
    (at 4 they spill kilobytes of registers on sm_90), 4 without; float32 inputs at 2
    stages, as 3 would need more shared memory than sm_90 has."""
    return dict(num_warps=8 if use_g else 4, num_stages=2 if dtype == torch.float32 else 3)


def _n_chunks(offsets: list[int]) -> int:
    return sum(triton.cdiv(e - s, BT) for s, e in zip(offsets, offsets[1:]))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _state_meta(dtype: torch.dtype, idle_sms: bool) -> dict:
    """Launch settings of the sequential passes; ``idle_sms``: their grid has fewer
    programs than the GPU has SMs. Their loads do not depend on the carried state, so
    stages prefetch the next chunks' tiles while this chunk's products run: 3 where the
    grid leaves SMs idle and each program's latency is the time, 2 where programs queue
    for SMs. Float32 inputs run unpipelined: their (BT, 128) tiles at 2-3 stages need more
    shared memory than sm_90 has. Warps and stages are chosen by timing on an H100
    (tools/tune_delta.py times the alternatives), not by register spills: 4 warps,
    although 8 spill fewer registers on sm_90."""
    stages = 1 if dtype == torch.float32 else 3 if idle_sms else 2
    return dict(BT=BT, BV=BV_STATE, num_warps=NUM_WARPS, num_stages=stages)


def _state_grid(V: int, n_docs: int, H: int, dtype: torch.dtype, device: torch.device):
    """(grid, launch settings) of the sequential passes: one program per V tile, document
    and head."""
    programs = triton.cdiv(V, BV_STATE) * n_docs * H
    meta = _state_meta(dtype, device.type == "cuda" and programs < _sm_count(device))
    return (triton.cdiv(V, meta["BV"]), n_docs * H), meta


# Launch settings of the WY kernels, chosen by timing on an H100 (tools/tune_delta.py
# times the alternatives): the WY backward at 4 warps, although it spills registers on
# sm_90 there and not at 8, and one pipeline stage, as two gain little and are not known
# to be safe at K = 64; the inverse at 1 warp, as each program inverts one 64 x 64 matrix
# by a serial forward substitution; _dv_local_kernel at 8 warps, at which it spills
# nothing at K = 64.
WY_BWD_META = dict(BK=BV_STATE, BV=BV_STATE, num_warps=4, num_stages=1)
DV_LOCAL_META = dict(BK=BK, BV=BV, num_warps=8)
INVERSE_META = dict(num_warps=1)


class DeltaPrep:
    """The state-independent part of the delta rule's forward on a packed stream: the
    chunk plan, cumulative log2 gates gc (1, TT, H) float32 or None, N = (I + A)^{-1}
    (``ai`` float32 and ``an`` in the inputs' dtype, (NT, H, BT, BT)), W (NT, H, BT, K) and
    U (NT, H, BT, V) in the inputs' dtype."""

    def __init__(self, k, v, g, beta, offsets: list[int]):
        _, TT, H, K = k.shape
        V = v.shape[-1]
        self.offsets = offsets
        self.plan = plan = chunk_plan(offsets, k.device)
        NT, use_g, bk, prec = plan.n_chunks, g is not None, _k_tile(K), dot_precision(v.dtype)
        self.gc = gate_cumsum(g, plan, H) if use_g else None
        a = torch.empty(NT, H, BT, BT, device=k.device, dtype=torch.float32)
        _wy_a_kernel[(NT, H)](k, beta, self.gc, a, plan.offsets, plan.chunk_index, H=H, K=K,
                              BT=BT, BK=bk, USE_G=use_g, PREC=prec, num_warps=NUM_WARPS)
        self.ai = unit_lower_inverse(a)
        # the backward's copy of N in the inputs' dtype, which every product using N takes
        self.an = self.ai if k.dtype == torch.float32 else k.new_empty(NT, H, BT, BT)
        self.w, self.u = k.new_empty(NT, H, BT, K), v.new_empty(NT, H, BT, V)
        _wy_wu_kernel[(NT, H)](k, v, beta, self.gc, self.ai, self.an, self.w, self.u,
                               plan.offsets, plan.chunk_index, H=H, K=K, V=V, BT=BT,
                               BD=BV_STATE, USE_G=use_g, STORE_N=self.an is not self.ai,
                               PREC=prec, num_warps=NUM_WARPS)

    def regrouped(self, offsets: list[int]) -> DeltaPrep:
        """The same factors under ``offsets`` that cut the sequences at chunk boundaries
        (into segments): the chunks and their order are unchanged, so the factors are
        shared, not recomputed."""
        out = copy.copy(self)
        out.offsets = offsets
        out.plan = chunk_plan(offsets, self.plan.offsets.device)
        if out.plan.n_chunks != self.plan.n_chunks:
            fail("offsets", f"cuts at chunk boundaries of the sequences (the same "
                 f"{self.plan.n_chunks} chunks)", f"{out.plan.n_chunks} chunks")
        return out


def delta_chain(prep: DeltaPrep, k, h0, V: int):
    """The state-only forward pass (:func:`_chain_kernel`) on a :class:`DeltaPrep` of k
    (1, TT, H, K): the final states ht (N, H, K, V) float32 from h0 (N, H, K, V) or zero,
    and the transitions mt (N, H, K, K) float32, so each document maps an entering S to
    ``mt S + ht``."""
    H, K = k.shape[2], k.shape[3]
    N = prep.plan.n_docs
    ht = torch.empty(N, H, K, V, device=k.device, dtype=torch.float32)
    mt = torch.empty(N, H, K, K, device=k.device, dtype=torch.float32)
    grid, meta = _state_grid(V + K, N, H, k.dtype, k.device)
    _chain_kernel[(triton.cdiv(V, meta["BV"]) + triton.cdiv(K, meta["BV"]), N * H)](
        k, prep.w, prep.u, prep.gc, h0, ht, mt, prep.plan.offsets, prep.plan.chunk_offsets,
        H=H, K=K, V=V, BK=_k_tile(K), USE_G=prep.gc is not None, HAS_H0=h0 is not None,
        PREC=dot_precision(k.dtype), **meta)
    return ht, mt


def delta_finish(q, k, v, prep: DeltaPrep, h0, scale: float):
    """The state pass and outputs on a :class:`DeltaPrep`: o (1, TT, H, V) in v's dtype,
    final states (N, H, K, V) float32, entering states h (NT, H, K, V) and v' (1, TT, H, V)
    in the inputs' dtype."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    plan, use_g, prec = prep.plan, prep.gc is not None, dot_precision(v.dtype)
    h, vn = k.new_empty(plan.n_chunks, H, K, V), torch.empty_like(v)
    ht = torch.empty(plan.n_docs, H, K, V, device=q.device, dtype=torch.float32)
    grid, meta = _state_grid(V, plan.n_docs, H, v.dtype, v.device)
    _fwd_kernel[grid](
        k, prep.w, prep.u, prep.gc, h0, h, vn, ht, plan.offsets, plan.chunk_offsets, H=H, K=K,
        V=V, BK=_k_tile(K), USE_G=use_g, HAS_H0=h0 is not None, PREC=prec, **meta)
    o = torch.empty_like(v)
    pair_kernel[(triton.cdiv(V, BV), plan.n_chunks, H)](q, k, vn, h, prep.gc, o, plan.offsets,
                                                        plan.chunk_index,
                                                        scale, H=H, K=K, V=V, BT=BT, BK=BK,
                                                        BV=BV, USE_G=use_g, BACKWARD=False,
                                                        PREC=prec, num_warps=NUM_WARPS)
    return o, ht, h, vn


def delta_forward(q, k, v, g, beta, h0, scale: float, offsets: list[int]):
    """Packed inputs q, k (1, TT, H, K), v (1, TT, H, V), g None or (1, TT, H) float32,
    beta (1, TT, H), h0 None or (N, H, K, V) float32. Returns o (1, TT, H, V) in v's
    dtype, the final states (N, H, K, V) float32 and, for the backward, N (NT, H, BT, BT),
    W (NT, H, BT, K) and the entering states (NT, H, K, V) in k's dtype, and v'
    (1, TT, H, V) in v's dtype."""
    prep = DeltaPrep(k, v, g, beta, offsets)
    o, ht, h, vn = delta_finish(q, k, v, prep, h0, scale)
    return o, ht, prep.an, prep.w, h, vn


def _dv_local(q, k, do, gc, plan, scale):
    H, K, V = q.shape[2], q.shape[3], do.shape[3]
    dvl = torch.empty_like(do)
    _dv_local_kernel[(plan.n_chunks, H)](q, k, do, gc, dvl, plan.offsets, plan.chunk_index,
                                         scale, H=H, K=K, V=V, BT=BT, USE_G=gc is not None,
                                         PREC=dot_precision(do.dtype), **DV_LOCAL_META)
    return dvl


def delta_initial_grads(q, k, v, prep: DeltaPrep, do, dht, scale: float):
    """The state-only backward pass on a :class:`DeltaPrep`: the gradient (N, H, K, V)
    float32 of each document's initial state from do (1, TT, H, V) and dht (N, H, K, V)
    or None, and the state-free part of dv' (reusable by :func:`delta_backward`)."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    plan = prep.plan
    dvl = _dv_local(q, k, do, prep.gc, plan, scale)
    dh0 = torch.empty(plan.n_docs, H, K, V, device=q.device, dtype=torch.float32)
    grid, meta = _state_grid(V, plan.n_docs, H, v.dtype, v.device)
    _bwd_kernel[grid](
        q, k, prep.w, prep.gc, do, dht, dvl, None, None, dh0, plan.offsets, plan.chunk_offsets,
        scale, H=H, K=K, V=V, BK=_k_tile(K), USE_G=prep.gc is not None,
        HAS_DHT=dht is not None, STORE=False, PREC=dot_precision(v.dtype), **meta)
    return dh0, dvl


def delta_backward(q, k, v, g, beta, ai, w, h, vn, do, dht, scale: float, offsets: list[int],
                   gc=None, dvl=None):
    """Gradients of :func:`delta_forward` (its saved N, W, states and v' passed back):
    dq, dk, dv, dbeta like their inputs, dg (1, TT, H) float32 or None, dh0 (N, H, K, V)
    float32. ``gc`` and ``dvl`` (from :func:`delta_initial_grads`) skip recomputing
    them."""
    _, TT, H, K = q.shape
    V = v.shape[-1]
    plan = chunk_plan(offsets, q.device)
    NT, use_g, bk, prec = plan.n_chunks, g is not None, _k_tile(K), dot_precision(v.dtype)
    if use_g and gc is None:
        gc = gate_cumsum(g, plan, H)
    f32 = dict(device=q.device, dtype=torch.float32)
    if dvl is None:
        dvl = _dv_local(q, k, do, gc, plan, scale)
    dsl, dvn = k.new_empty(NT, H, K, V), torch.empty_like(v)
    dh0 = torch.empty(plan.n_docs, H, K, V, **f32)
    grid, meta = _state_grid(V, plan.n_docs, H, v.dtype, v.device)
    _bwd_kernel[grid](
        q, k, w, gc, do, dht, dvl, dvn, dsl, dh0, plan.offsets, plan.chunk_offsets, scale, H=H,
        K=K, V=V, BK=bk, USE_G=use_g, HAS_DHT=dht is not None, STORE=True, PREC=prec, **meta)
    NK = triton.cdiv(K, BK)
    dq, dk_part, dw = torch.empty_like(q), torch.empty_like(k), torch.empty_like(k)
    # gate terms: one slot per K tile of dqk_kernel, the last for _wy_bwd_kernel
    r_part = b_part = None
    if use_g:
        r_part, b_part = torch.empty(NK + 1, TT, H, **f32), torch.empty(NK + 1, TT, H, **f32)
    dqk_kernel[(NK, NT, H)](q, k, vn, do, h, dsl, gc, dq, dk_part, r_part, b_part, dvn, dw,
                            plan.offsets, plan.chunk_index, scale, TT, H=H, K=K, V=V, BT=BT,
                            BK=BK, BV=BV, USE_G=use_g, DW=True, PREC=prec,
                            **_dqk_meta(q.dtype, use_g))
    dk, dv, dbeta = torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta)
    _wy_bwd_kernel[(NT, H)](k, v, beta, gc, ai, vn, dvn, dw, dk_part, dk, dv, dbeta,
                            r_part[NK] if use_g else None, b_part[NK] if use_g else None,
                            plan.offsets, plan.chunk_index, H=H, K=K, V=V, BT=BT, USE_G=use_g,
                            PREC=prec, **WY_BWD_META)
    dg = None
    if use_g:
        dg = torch.empty_like(g)
        dg_kernel[(NT, H)](r_part, b_part, dg, plan.offsets, plan.chunk_index, TT, H=H, BT=BT,
                           NK=NK + 1)
    return dq, dk, dv, dg, dbeta, dh0


# torch.library registration: compile traces these as single nodes (no graph break).
# Custom ops cannot return None, so an absent gate gradient comes back as an empty tensor
# and the backward returns dh0 even without an initial state.
_EMPTY = (0,)


@torch.library.custom_op("seqpar::delta_fwd", mutates_args=())
def _delta_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                  beta: torch.Tensor, h0: torch.Tensor | None, scale: float, offsets: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor]:
    return delta_forward(q, k, v, g, beta, h0, scale, offsets)


@_delta_fwd_op.register_fake
def _(q, k, v, g, beta, h0, scale, offsets):
    H, K, V, NT = q.shape[2], q.shape[3], v.shape[3], _n_chunks(offsets)
    f32 = dict(dtype=torch.float32)
    return (torch.empty_like(v), q.new_empty(len(offsets) - 1, H, K, V, **f32),
            k.new_empty(NT, H, BT, BT), k.new_empty(NT, H, BT, K),
            k.new_empty(NT, H, K, V), torch.empty_like(v))


@torch.library.custom_op("seqpar::delta_bwd", mutates_args=())
def _delta_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor | None,
                  beta: torch.Tensor, ai: torch.Tensor, w: torch.Tensor, h: torch.Tensor,
                  vn: torch.Tensor, do: torch.Tensor, dht: torch.Tensor | None, scale: float,
                  offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dg, dbeta, dh0 = delta_backward(q, k, v, g, beta, ai, w, h, vn, do, dht, scale,
                                                offsets)
    return dq, dk, dv, q.new_empty(_EMPTY, dtype=torch.float32) if dg is None else dg, dbeta, dh0


@_delta_bwd_op.register_fake
def _(q, k, v, g, beta, ai, w, h, vn, do, dht, scale, offsets):
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(_EMPTY, dtype=torch.float32) if g is None else torch.empty_like(g),
            torch.empty_like(beta), q.new_empty(len(offsets) - 1, H, K, V, dtype=torch.float32))


def _setup(ctx, inputs, output):
    q, k, v, g, beta, h0, scale, offsets = inputs
    _, _, ai, w, h, vn = output
    ctx.save_for_backward(q, k, v, g, beta, ai, w, h, vn)
    ctx.scale, ctx.offsets, ctx.has_h0 = scale, offsets, h0 is not None
    ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None, not zeros


def _backward(ctx, do, dht, dai, dw, dh, dvn):
    if any(x is not None for x in (dai, dw, dh, dvn)):
        raise RuntimeError("delta_fwd: N, W, h and v' are saved for the backward only; "
                           "nothing may differentiate through them")
    q, k, v, g, beta, ai, w, h, vn = ctx.saved_tensors
    do = torch.zeros_like(v) if do is None else do.contiguous()
    dq, dk, dv, dg, dbeta, dh0 = _delta_bwd_op(q, k, v, g, beta, ai, w, h, vn, do,
                                               None if dht is None else dht.contiguous(),
                                               ctx.scale, ctx.offsets)
    return (dq, dk, dv, None if g is None else dg, dbeta, dh0 if ctx.has_h0 else None,
            None, None)


torch.library.register_autograd("seqpar::delta_fwd", _backward, setup_context=_setup)


def triton_delta(q, k, v, g, beta, *, scale: float, initial_state, output_final_state: bool,
                 offsets):
    """Same contract as ``_run.run_delta``: q, k (B, T, H, K); v (B, T, H, V) float16,
    bfloat16 or float32 with K, V <= 128; g None or (B, T, H) float32; beta (B, T, H);
    initial_state (N, H, K, V) or None; offsets list or None. Returns o (B, T, H, V) in
    v's dtype and the final state (N, H, K, V) float32 or None."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    for name, d in (("k", K), ("v", V)):
        if d > MAX_DIM:
            fail(name, f"head dim <= {MAX_DIM} for backend='triton'", d)
    h0 = None if initial_state is None else initial_state.float().contiguous()
    o, ht, *_ = _delta_fwd_op(as_packed(q), as_packed(k), as_packed(v), as_packed(g),
                              as_packed(beta), h0, float(scale), packed_offsets(B, T, offsets))
    return o.reshape(v.shape), (ht if output_final_state else None)
