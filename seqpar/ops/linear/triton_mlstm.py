"""Chunkwise Triton kernels of mLSTM (sigmoid input gate), forward and backward, on the
16-bit (or float32) inputs directly.

mLSTM is simple GLA with gate ``g = logsigmoid(f~)``, keys ``k'_j = sigmoid(i~_j) k_j``
and a normalizer state ``n`` (K,) carried beside ``C`` (K, V); per chunk, with the
cumulative log2 gate ``G`` of triton_diag (every exponent <= 0, see its docstring):

* ``h_i = scale (sum_{j<=i} 2^(G_i - G_j) (q_i.k'_j) v_j + 2^G_i q_i C_c)`` and
  ``u_i = scale (sum_{j<=i} 2^(G_i - G_j) (q_i.k'_j) + 2^G_i q_i.n_c)``;
* ``o_i = h_i / m_i`` with ``m_i = max(|u_i|, 1)``.

Precision. ``o`` is invariant to the scale of ``q`` where ``|u| > 1``, so the gradient
the engine sees, ``dh_i = do_i / m_i`` and ``du_i = c_i = -(do_i.o_i) sign(u_i) / m_i``,
makes ``dq``, ``dk``, ``di``, ``df`` small differences of large terms: e.g. the
intra-chunk ``dA_ij = (do_i.v_j) / m_i + c_i``. Rounding such an intermediate to 16 bits
before a product gives gradient errors of the order of 10%. So the kernels keep these rules:

* products of two inputs (q, k, v, do: exact 16-bit values) run on tensor cores in the
  input dtype with float32 accumulation (exact products);
* every float32 intermediate that enters a product (per-chunk states ``C``, ``n``,
  their gradients, decayed and gated score matrices, ``dA``) is split into
  ``hi + lo`` of the input dtype and multiplied twice (:func:`_dot32`): about 16 more
  bits, at twice the cost of one 16-bit product; per-row factors (``1 / m_i``,
  ``c_i``, gates) are applied to float32 results, never folded into a 16-bit operand;
* ``o`` is kept in float32 for the backward (``c_i`` needs it to float32 accuracy);
  per-chunk states are float32 and recomputed in the backward (memory O(T), as
  triton_diag).

The normalizer rides along as a vector: ``n`` grows by row sums of the weighted keys,
``u`` by row sums of the score matrix, so V stays V (two 64-wide tiles at V = 128, not
three for a 129th column).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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
    doc_bounds,
    doc_span,
    dot_precision,
    dqk_tiles,
    gate_cumsum,
    load_tile,
    mma,
    packed_offsets,
    store_tile,
)

# The diagonal engine's launch setting, the one checked on an H100. At 4 warps the bf16
# kernels spill registers on sm_90 (_dqk_kernel most, as the diagonal engine's dq/dk
# kernel does) and at 8 they do not; tests/sm90.py prints the spills, and only a device
# timing can choose between the two.
NUM_WARPS = 4


def _dqk_meta(dtype: torch.dtype) -> dict:
    """Launch settings of :func:`_dqk_kernel`. Float32 inputs run 2 pipeline stages: at
    Triton's default 3 its (BT, 128) float32 tiles need more shared memory than sm_90 has
    with some supported Triton versions (3.8), at 2 they fit with every one
    (tests/sm90.py compiles the kernel for sm_90 with these settings and checks)."""
    return dict(num_warps=NUM_WARPS, num_stages=2 if dtype == torch.float32 else 3)


@triton.jit
def _dot32(a, b, PREC: tl.constexpr, A32: tl.constexpr):
    """``a @ b`` to about float32 accuracy where one operand is a float32 intermediate
    (``a`` if A32, else ``b``) and the other an input. For 16-bit inputs the float32
    one is split into ``hi + lo`` of the input dtype (two products, both exact in the
    float32 accumulator); float32 inputs take tf32x3 (PREC) directly."""
    if PREC == "tf32x3":
        out = mma(a, b, PREC)
    elif A32:
        hi = a.to(b.dtype)
        lo = (a - hi.to(tl.float32)).to(b.dtype)
        out = mma(hi, b, PREC) + mma(lo, b, PREC)
    else:
        hi = b.to(a.dtype)
        lo = (b - hi.to(tl.float32)).to(a.dtype)
        out = mma(a, hi, PREC) + mma(a, lo, PREC)
    return out


@triton.jit
def _state_walk(x, y, gc, wc, wn, h, hn, s0, n0, s_out, n_out, offs, coff, scale, i_k, i_v,
                i_nh, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
                HAS_S0: tl.constexpr, STORE_OUT: tl.constexpr, STORE_H: tl.constexpr,
                PREC: tl.constexpr):
    """Sequential pass over the chunks of document and head ``i_nh`` for one (K, V)
    tile, carrying ``(C (BK, BV), n (BK,))`` in float32.

    Forward (x=k, y=v, wc=wn=sigmoid(i)): stores the pair entering each chunk in (h, hn).
    Backward (REVERSE, x=q, y=do, wc=1/m, wn=c): walks chunks last to first and stores
    the gradient of the pair leaving each chunk. (s0, n0): initial pair (or its
    gradient at the end); (s_out, n_out) receive the final pair (or dC0, dn0). The
    ``n`` slice is stored by the programs of the first V tile. Without STORE_H only the
    final pair is written (the state-only passes of sequence parallelism).
    """
    n, i_h = i_nh // H, i_nh % H
    bos, T_doc, boc = doc_span(offs, coff, n)
    NC = tl.cdiv(T_doc, BT).to(tl.int32)
    o_k = i_k * BK + tl.arange(0, BK)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    b_n = tl.zeros([BK], dtype=tl.float32)
    if HAS_S0:
        b_h += load_tile(s0 + i_nh * K * V, i_k * BK, i_v * BV, V, 1, K, V, BK, BV).to(tl.float32)
        b_n += tl.load(n0 + i_nh * K + o_k, mask=o_k < K, other=0.).to(tl.float32)
    for i in range(NC):
        c = NC - 1 - i if REVERSE else i
        if STORE_H:
            store_tile(h + ((boc + c) * H + i_h) * K * V, b_h, i_k * BK, i_v * BV, V, 1, K, V, BK,
                       BV)
            if i_v == 0:
                tl.store(hn + ((boc + c) * H + i_h) * K + o_k, b_n, mask=o_k < K)
        b_x = load_tile(x + (bos * H + i_h) * K, i_k * BK, c * BT, 1, H * K, K, T_doc, BK,
                        BT).to(tl.float32)
        b_y = load_tile(y + (bos * H + i_h) * V, c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV)
        b_g, g_last = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
        t = c * BT + tl.arange(0, BT)
        r_wc = tl.load(wc + (bos + t) * H + i_h, mask=t < T_doc, other=0.)
        if REVERSE:
            w = scale * tl.exp2(b_g)  # q_i 2^G_i
            r_wn = w * tl.load(wn + (bos + t) * H + i_h, mask=t < T_doc, other=0.)
            r_wc *= w
        else:
            r_wc *= tl.exp2(g_last - b_g)  # k'_j 2^(G_C - G_j)
            r_wn = r_wc
        decay = tl.exp2(g_last)
        b_h = b_h * decay + _dot32(b_x * r_wc[None, :], b_y, PREC, True)
        b_n = b_n * decay + tl.sum(b_x * r_wn[None, :], axis=1)
    if STORE_OUT:
        store_tile(s_out + i_nh * K * V, b_h, i_k * BK, i_v * BV, V, 1, K, V, BK, BV)
        if i_v == 0:
            tl.store(n_out + i_nh * K + o_k, b_n, mask=o_k < K)


@triton.jit
def _state_kernel(x, y, gc, wc, wn, h, hn, s0, n0, s_out, n_out, offs, coff, scale,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr,
                  STORE_H: tl.constexpr, PREC: tl.constexpr):
    """The forward's state pass (:func:`_state_walk`), storing the final pair."""
    _state_walk(x, y, gc, wc, wn, h, hn, s0, n0, s_out, n_out, offs, coff, scale,
                tl.program_id(0), tl.program_id(1), tl.program_id(2), H, K, V, BT, BK, BV,
                False, HAS_S0, True, STORE_H, PREC)


@triton.jit
def _state_rev_kernel(q, do, gc, rm, cu, dht, dnt, ds0, dn0, offs, coff, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, HAS_DT: tl.constexpr,
                      PREC: tl.constexpr):
    """The backward's reverse pass alone, storing only the initial pair's gradient."""
    _state_walk(q, do, gc, rm, cu, None, None, dht, dnt, ds0, dn0, offs, coff, scale,
                tl.program_id(0), tl.program_id(1), tl.program_id(2), H, K, V, BT, BK, BV,
                True, HAS_DT, True, False, PREC)


@triton.jit
def _state_bwd_kernel(k, v, q, do, gc, ig, rm, cu, h, hn, dh, dhn, s0, n0, dht, dnt, ds0, dn0,
                      offs, coff, scale, NH, H: tl.constexpr, K: tl.constexpr,
                      V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      HAS_S0: tl.constexpr, HAS_DT: tl.constexpr, PREC: tl.constexpr):
    """The backward's two state passes side by side in one launch: programs with
    ``program_id(2) < NH`` recompute the forward pairs (h, hn), the others walk back
    with the gradients (dh, dhn; dC0, dn0 into ds0, dn0 when HAS_S0). Each pass is
    sequential with few programs (one per document, head and tile), so together they
    keep twice as many SMs busy."""
    i_k, i_v, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if i_nh < NH:
        _state_walk(k, v, gc, ig, ig, h, hn, s0, n0, None, None, offs, coff, scale, i_k, i_v,
                    i_nh, H, K, V, BT, BK, BV, False, HAS_S0, False, True, PREC)
    else:
        _state_walk(q, do, gc, rm, cu, dh, dhn, dht, dnt, ds0, dn0, offs, coff, scale, i_k,
                    i_v, i_nh - NH, H, K, V, BT, BK, BV, True, HAS_DT, HAS_S0, True, PREC)


@triton.jit
def _pair_kernel(a, b, y, h, hn, gc, ig, rm, out, out32, u, offs, cidx, scale,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, BACKWARD: tl.constexpr,
                 PREC: tl.constexpr):
    """Chunk outputs along V.

    Forward (a=q, b=k, y=v, (h, hn): pair entering the chunk): ``o`` in the input dtype
    and float32 (out, out32), and ``u`` (TT, H) from the first V tile's programs.
    Backward (a=k, b=q, y=do, h: gradient of C leaving the chunk, rm = 1/m): ``dv``.
    ``M = a b^T`` is masked to the causal (forward) or anti-causal (backward) triangle,
    decayed and gated; ``out = scale (M y + w (a h))`` (forward) or
    ``scale M y + w (a h)`` (backward) with ``w`` the per-row decay into or out of the
    state.
    """
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_M = tl.zeros([BT, BT], dtype=tl.float32)
    b_an = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_a = load_tile(a + (bos * H + i_h) * K, c * BT, i_k * BK, H * K, 1, T_doc, K, BT, BK)
        b_b = load_tile(b + (bos * H + i_h) * K, i_k * BK, c * BT, 1, H * K, K, T_doc, BK, BT)
        b_h = load_tile(h + (i_t * H + i_h).to(tl.int64) * K * V, i_k * BK, i_v * BV, V, 1, K, V,
                        BK, BV)
        b_o += _dot32(b_a, b_h, PREC, False)
        b_M += mma(b_a, b_b, PREC)
        if not BACKWARD:
            o_k = i_k * BK + tl.arange(0, BK)
            b_hn = tl.load(hn + (i_t * H + i_h).to(tl.int64) * K + o_k, mask=o_k < K, other=0.)
            b_an += tl.sum(b_a.to(tl.float32) * b_hn[None, :], axis=1)
    t = c * BT + tl.arange(0, BT)
    m = t < T_doc
    b_g, g_last = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
    b_ig = tl.load(ig + (bos + t) * H + i_h, mask=m, other=0.)
    if BACKWARD:
        keep = t[:, None] <= t[None, :]
        d = b_g[None, :] - b_g[:, None]
        b_rm = tl.load(rm + (bos + t) * H + i_h, mask=m, other=0.)
        b_o *= (tl.exp2(g_last - b_g) * b_ig)[:, None]
        b_M *= b_ig[:, None] * b_rm[None, :]
    else:
        keep = t[:, None] >= t[None, :]
        d = b_g[:, None] - b_g[None, :]
        b_o *= tl.exp2(b_g)[:, None]
        b_M *= b_ig[None, :]
    b_M = tl.where(keep, b_M * tl.exp2(tl.where(keep, d, 0.)), 0.)
    b_y = load_tile(y + (bos * H + i_h) * V, c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV)
    if BACKWARD:
        b_o += scale * _dot32(b_M, b_y, PREC, True)
    else:
        b_o = scale * (b_o + _dot32(b_M, b_y, PREC, True))
        b_u = scale * (tl.exp2(b_g) * b_an + tl.sum(b_M, axis=1))
        b_o /= tl.maximum(tl.abs(b_u), 1.)[:, None]
        if i_v == 0:
            tl.store(u + (bos + t) * H + i_h, b_u, mask=m)
        store_tile(out32 + (bos * H + i_h) * V, b_o, c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV)
    store_tile(out + (bos * H + i_h) * V, b_o.to(out.dtype.element_ty), c * BT, i_v * BV, H * V, 1,
               T_doc, V, BT, BV)


@triton.jit
def _dqk_kernel(q, k, v, do, h, hn, dh, dhn, gc, ig, rm, cu, dq, dk, r_part, b_part, i_part,
                offs, cidx, scale, TT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dq, dk of one chunk and K tile, and this tile's shares of the gate gradient
    terms ``r``, ``b`` (as triton_diag's, with the normalizer included) and of
    ``di`` (``k_j.dk'_j``, times sigmoid'(i) later). (h, hn): pair entering the
    chunk; (dh, dhn): gradient of the pair leaving it; rm = 1/m, cu = c per row."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)   # [i, j] = do_i . v_j
    b_dAt = tl.zeros([BT, BT], dtype=tl.float32)  # its transpose, by its own product
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    base_s = (i_t * H + i_h).to(tl.int64) * K * V
    for i_v in range(tl.cdiv(V, BV)):
        b_do, b_v, b_doT, b_vT, b_hT, b_dhT = dqk_tiles(do, v, h, dh, bos, c, T_doc, i_h, i_v, i_k,
                                                        base_s, H, K, V, BT, BK, BV)
        b_dA += mma(b_do, b_vT, PREC)
        b_dAt += mma(b_v, b_doT, PREC)
        b_dq += _dot32(b_do, b_hT, PREC, False)
        b_dk += _dot32(b_v, b_dhT, PREC, False)
        b_hdh += tl.sum(b_hT * b_dhT, axis=0)
    o_k = i_k * BK + tl.arange(0, BK)
    s_n = (i_t * H + i_h).to(tl.int64) * K + o_k
    b_hn = tl.load(hn + s_n, mask=o_k < K, other=0.)
    b_dhn = tl.load(dhn + s_n, mask=o_k < K, other=0.)
    t = c * BT + tl.arange(0, BT)
    m = t < T_doc
    b_ig = tl.load(ig + (bos + t) * H + i_h, mask=m, other=0.)
    b_rm = tl.load(rm + (bos + t) * H + i_h, mask=m, other=0.)
    b_cu = tl.load(cu + (bos + t) * H + i_h, mask=m, other=0.)
    b_g, g_last = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
    # state terms: dq_i through (C_c, n_c); dk'_j through (dC, dn) of the leaving pair
    b_dq = (b_dq * b_rm[:, None] + b_cu[:, None] * b_hn[None, :]) * (scale * tl.exp2(b_g))[:, None]
    b_dk = (b_dk + b_dhn[None, :]) * tl.exp2(g_last - b_g)[:, None]
    c_term = tl.sum((b_hdh + b_hn * b_dhn) * tl.exp2(g_last), axis=0)
    causal = t[:, None] >= t[None, :]
    anti = t[:, None] <= t[None, :]
    # dA_ij = do_i.v_j / m_i + c_i: the cancelling difference, formed in float32
    b_dS = b_dA * b_rm[:, None] + b_cu[:, None]
    b_dS = tl.where(causal, b_dS * tl.exp2(tl.where(causal, b_g[:, None] - b_g[None, :], 0.)), 0.) * scale
    b_dSt = b_dAt * b_rm[None, :] + b_cu[None, :]
    b_dSt = tl.where(anti, b_dSt * tl.exp2(tl.where(anti, b_g[None, :] - b_g[:, None], 0.)), 0.) * scale
    b_q = load_tile(q + (bos * H + i_h) * K, c * BT, i_k * BK, H * K, 1, T_doc, K, BT, BK)
    b_k = load_tile(k + (bos * H + i_h) * K, c * BT, i_k * BK, H * K, 1, T_doc, K, BT, BK)
    b_qT = load_tile(q + (bos * H + i_h) * K, i_k * BK, c * BT, 1, H * K, K, T_doc, BK, BT)
    b_kT = load_tile(k + (bos * H + i_h) * K, i_k * BK, c * BT, 1, H * K, K, T_doc, BK, BT)
    # P = dS * (q_i.k'_j) strictly below the diagonal, and its transpose
    b_dS *= b_ig[None, :]
    b_dSt *= b_ig[:, None]
    b_P = tl.where(t[:, None] > t[None, :], b_dS * mma(b_q, b_kT, PREC), 0.)
    b_Pt = tl.where(t[:, None] < t[None, :], b_dSt * mma(b_k, b_qT, PREC), 0.)
    b_r = tl.sum(b_dq * b_q.to(tl.float32), axis=1) + tl.sum(b_P, axis=1) - tl.sum(b_Pt, axis=1)
    last = tl.minimum(c * BT + BT, T_doc) - 1
    b_r += tl.where(t == last, c_term, 0.)
    b_b = tl.sum(b_dk * b_k.to(tl.float32), axis=1) * b_ig
    # intra-chunk terms; b_dSt already carries sigmoid(i_j), so b_dk becomes dk_j
    b_dq += _dot32(b_dS, b_k, PREC, True)
    b_dk = b_dk * b_ig[:, None] + _dot32(b_dSt, b_q, PREC, True)
    b_di = tl.sum(b_dk * b_k.to(tl.float32), axis=1) * (1. - b_ig)
    o_part = i_k * TT * H + (bos + t) * H + i_h
    tl.store(r_part + o_part, b_r, mask=m)
    tl.store(b_part + o_part, b_b, mask=m)
    tl.store(i_part + o_part, b_di, mask=m)
    store_tile(dq + (bos * H + i_h) * K, b_dq.to(dq.dtype.element_ty), c * BT, i_k * BK, H * K, 1,
               T_doc, K, BT, BK)
    store_tile(dk + (bos * H + i_h) * K, b_dk.to(dk.dtype.element_ty), c * BT, i_k * BK, H * K, 1,
               T_doc, K, BT, BK)


@triton.jit
def _norm_grad_kernel(do, o32, u, rm, cu, TT, H: tl.constexpr, V: tl.constexpr,
                      BT: tl.constexpr, BV: tl.constexpr):
    """Per row of the packed stream: ``rm = 1 / m`` and the normalizer's gradient
    ``c = -(do.o) sign(u) [|u| > 1] / m``, float32, from float32 ``o``."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    t = i_t * BT + tl.arange(0, BT)
    m = t < TT
    b_do = tl.zeros([BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        p = (t.to(tl.int64) * H + i_h)[:, None] * V + o_v[None, :]
        mask = m[:, None] & (o_v < V)[None, :]
        b_do += tl.sum(tl.load(do + p, mask=mask, other=0.).to(tl.float32)
                       * tl.load(o32 + p, mask=mask, other=0.), axis=1)
    b_u = tl.load(u + t * H + i_h, mask=m, other=0.)
    b_rm = 1. / tl.maximum(tl.abs(b_u), 1.)
    b_c = tl.where(tl.abs(b_u) > 1., tl.where(b_u > 0, -b_do, b_do) * b_rm, 0.)
    tl.store(rm + t * H + i_h, b_rm, mask=m)
    tl.store(cu + t * H + i_h, b_c, mask=m)


def _pairs(x, y, plan, per_doc):
    """Empty float32 state buffers for keys like x, values like y: one (C, n) pair per
    chunk ((NT, H, K, V), (NT, H, K)), then ``per_doc`` pairs per document
    ((N, H, K, V), (N, H, K)), as a flat list."""
    H, K, V = x.shape[2], x.shape[3], y.shape[3]
    out = [x.new_empty(plan.n_chunks, H, K, V, dtype=torch.float32),
           x.new_empty(plan.n_chunks, H, K, dtype=torch.float32)]
    for _ in range(per_doc):
        out += [x.new_empty(plan.n_docs, H, K, V, dtype=torch.float32),
                x.new_empty(plan.n_docs, H, K, dtype=torch.float32)]
    return out


def _state_grid(plan, H, K, V, passes=1):
    return (triton.cdiv(K, BK), triton.cdiv(V, BV_STATE), passes * plan.n_docs * H)


def _gate_inputs(i, f, plan, H):
    """sigmoid(i) and the cumulative log2 forget gate, float32 (1, TT, H)."""
    return torch.sigmoid(i), gate_cumsum(F.logsigmoid(f), plan, H)


def mlstm_forward(q, k, v, i, f, C0, n0, scale: float, offsets: list[int]):
    """Packed inputs q, k (1, TT, H, K), v (1, TT, H, V) (16-bit or float32), i, f
    (1, TT, H) float32 pre-activations, (C0 (N, H, K, V), n0 (N, H, K)) float32 or None.
    Returns o (1, TT, H, V) in v's dtype, o32 (the same in float32), u (1, TT, H)
    float32 (the normalizer before the max) and the final pair (CT, nT) float32."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    plan = chunk_plan(offsets, q.device)
    ig, gc = _gate_inputs(i, f, plan, H)
    h, hn, CT, nT = _pairs(k, v, plan, 1)
    _state_kernel[_state_grid(plan, H, K, V)](
        k, v, gc, ig, ig, h, hn, C0, n0, CT, nT, plan.offsets, plan.chunk_offsets, scale,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV_STATE, HAS_S0=C0 is not None, STORE_H=True,
        PREC=dot_precision(q.dtype), num_warps=NUM_WARPS)
    o, o32, u = torch.empty_like(v), torch.empty_like(v, dtype=torch.float32), torch.empty_like(i)
    _pair_kernel[(triton.cdiv(V, BV), plan.n_chunks, H)](
        q, k, v, h, hn, gc, ig, None, o, o32, u, plan.offsets, plan.chunk_index, scale,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, BACKWARD=False, PREC=dot_precision(q.dtype),
        num_warps=NUM_WARPS)
    return o, o32, u, CT, nT


def mlstm_backward(q, k, v, i, f, C0, n0, o32, u, do, dCT, dnT, scale: float,
                   offsets: list[int]):
    """Gradients of :func:`mlstm_forward` (o32, u from it; do like v; dCT, dnT float32
    or None): dq, dk, dv like their inputs; di, df (1, TT, H) float32; dC0, dn0 float32
    or None."""
    _, TT, H, K = q.shape
    V = v.shape[-1]
    plan = chunk_plan(offsets, q.device)
    ig, gc = _gate_inputs(i, f, plan, H)
    rm, cu = torch.empty_like(u), torch.empty_like(u)
    _norm_grad_kernel[(triton.cdiv(TT, BT), H)](do, o32, u, rm, cu, TT, H=H, V=V, BT=BT, BV=BV,
                                               num_warps=NUM_WARPS)
    prec = dot_precision(q.dtype)
    h, hn = _pairs(k, v, plan, 0)
    dh, dhn, *d0 = _pairs(k, v, plan, int(C0 is not None))
    dC0, dn0 = d0 or (None, None)
    _state_bwd_kernel[_state_grid(plan, H, K, V, 2)](
        k, v, q, do, gc, ig, rm, cu, h, hn, dh, dhn, C0, n0, dCT, dnT, dC0, dn0, plan.offsets,
        plan.chunk_offsets, scale, plan.n_docs * H, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV_STATE,
        HAS_S0=C0 is not None, HAS_DT=dCT is not None, PREC=prec, num_warps=NUM_WARPS)
    dv = torch.empty_like(v)
    _pair_kernel[(triton.cdiv(V, BV), plan.n_chunks, H)](
        k, q, do, dh, None, gc, ig, rm, dv, None, None, plan.offsets, plan.chunk_index, scale,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, BACKWARD=True, PREC=prec, num_warps=NUM_WARPS)
    NK = triton.cdiv(K, BK)
    dq, dk = torch.empty_like(q), torch.empty_like(k)
    r_part = q.new_empty(NK, TT, H, dtype=torch.float32)
    b_part, i_part = torch.empty_like(r_part), torch.empty_like(r_part)
    _dqk_kernel[(NK, plan.n_chunks, H)](q, k, v, do, h, hn, dh, dhn, gc, ig, rm, cu, dq, dk,
                                        r_part, b_part, i_part, plan.offsets, plan.chunk_index,
                                        scale, TT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV,
                                        PREC=prec, **_dqk_meta(q.dtype))
    dg = torch.empty_like(f)
    dg_kernel[(plan.n_chunks, H)](r_part, b_part, dg, plan.offsets, plan.chunk_index, TT,
                                  H=H, BT=BT, NK=NK)
    di = i_part.sum(0)[None]
    return dq, dk, dv, di, dg * torch.sigmoid(-f), dC0, dn0


def mlstm_final_states(k, v, i, f, C0, n0, offsets: list[int]):
    """The state-only forward pass: the final pair (CT (N, H, K, V), nT (N, H, K)) float32
    of the packed documents of k (1, TT, H, K), v (1, TT, H, V), gate pre-activations i, f
    (1, TT, H) float32, from (C0, n0) or zeros; no per-chunk states, no outputs."""
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    plan = chunk_plan(offsets, k.device)
    ig, gc = _gate_inputs(i, f, plan, H)
    CT = k.new_empty(plan.n_docs, H, K, V, dtype=torch.float32)
    nT = k.new_empty(plan.n_docs, H, K, dtype=torch.float32)
    _state_kernel[_state_grid(plan, H, K, V)](
        k, v, gc, ig, ig, None, None, C0, n0, CT, nT, plan.offsets, plan.chunk_offsets, 1.0,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV_STATE, HAS_S0=C0 is not None, STORE_H=False,
        PREC=dot_precision(k.dtype), num_warps=NUM_WARPS)
    return CT, nT


def mlstm_initial_grads(q, f, o32, u, do, dCT, dnT, scale: float, offsets: list[int]):
    """The state-only backward pass: the gradient (dC0 (N, H, K, V), dn0 (N, H, K))
    float32 of each packed document's initial pair, from o32 and u of
    :func:`mlstm_forward`, do (1, TT, H, V) and the final pair's gradient (or None)."""
    _, TT, H, K = q.shape
    V = do.shape[-1]
    plan = chunk_plan(offsets, q.device)
    gc = gate_cumsum(F.logsigmoid(f), plan, H)
    rm, cu = torch.empty_like(u), torch.empty_like(u)
    _norm_grad_kernel[(triton.cdiv(TT, BT), H)](do, o32, u, rm, cu, TT, H=H, V=V, BT=BT, BV=BV,
                                               num_warps=NUM_WARPS)
    dC0 = q.new_empty(plan.n_docs, H, K, V, dtype=torch.float32)
    dn0 = q.new_empty(plan.n_docs, H, K, dtype=torch.float32)
    _state_rev_kernel[_state_grid(plan, H, K, V)](
        q, do, gc, rm, cu, dCT, dnT, dC0, dn0, plan.offsets, plan.chunk_offsets, scale,
        H=H, K=K, V=V, BT=BT, BK=BK, BV=BV_STATE, HAS_DT=dCT is not None,
        PREC=dot_precision(q.dtype), num_warps=NUM_WARPS)
    return dC0, dn0


# torch.library registration, as triton_diag's: absent tensors come back empty.
_EMPTY = (0,)


@torch.library.custom_op("seqpar::mlstm_fwd", mutates_args=())
def _mlstm_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor,
                  f: torch.Tensor, C0: torch.Tensor | None, n0: torch.Tensor | None,
                  scale: float, offsets: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlstm_forward(q, k, v, i, f, C0, n0, scale, offsets)


@_mlstm_fwd_op.register_fake
def _(q, k, v, i, f, C0, n0, scale, offsets):
    N, H, K, V = len(offsets) - 1, q.shape[2], q.shape[3], v.shape[3]
    return (torch.empty_like(v), torch.empty_like(v, dtype=torch.float32), torch.empty_like(i),
            q.new_empty(N, H, K, V, dtype=torch.float32), q.new_empty(N, H, K, dtype=torch.float32))


@torch.library.custom_op("seqpar::mlstm_bwd", mutates_args=())
def _mlstm_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor,
                  f: torch.Tensor, C0: torch.Tensor | None, n0: torch.Tensor | None,
                  o32: torch.Tensor, u: torch.Tensor, do: torch.Tensor,
                  dCT: torch.Tensor | None, dnT: torch.Tensor | None, scale: float,
                  offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    dq, dk, dv, di, df, dC0, dn0 = mlstm_backward(q, k, v, i, f, C0, n0, o32, u, do, dCT, dnT,
                                                  scale, offsets)
    def empty():  # one each: custom op outputs may not alias one another
        return q.new_empty(_EMPTY, dtype=torch.float32)

    return (dq, dk, dv, di, df, empty() if dC0 is None else dC0, empty() if dn0 is None else dn0)


@_mlstm_bwd_op.register_fake
def _(q, k, v, i, f, C0, n0, o32, u, do, dCT, dnT, scale, offsets):
    def like(x):
        return q.new_empty(_EMPTY, dtype=torch.float32) if x is None else torch.empty_like(x)

    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(i),
            torch.empty_like(f), like(C0), like(n0))


def _setup(ctx, inputs, output):
    q, k, v, i, f, C0, n0, scale, offsets = inputs
    _, o32, u, _, _ = output
    ctx.save_for_backward(q, k, v, i, f, C0, n0, o32, u)
    ctx.scale, ctx.offsets = scale, offsets


def _backward(ctx, do, do32, du, dCT, dnT):
    # o32 and u are the forward's saved intermediates, not results: mlstm never
    # returns them, so their gradients are None here.
    q, k, v, i, f, C0, n0, o32, u = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    if (dCT is None) != (dnT is None):  # a loss on one half of the final pair only
        N, H, K, V = len(ctx.offsets) - 1, q.shape[2], q.shape[3], v.shape[3]
        dCT = q.new_zeros(N, H, K, V, dtype=torch.float32) if dCT is None else dCT
        dnT = q.new_zeros(N, H, K, dtype=torch.float32) if dnT is None else dnT
    dq, dk, dv, di, df, dC0, dn0 = _mlstm_bwd_op(
        q, k, v, i, f, C0, n0, o32, u, do.contiguous(),
        None if dCT is None else dCT.contiguous(), None if dnT is None else dnT.contiguous(),
        ctx.scale, ctx.offsets)
    return (dq, dk, dv, di, df, None if C0 is None else dC0, None if n0 is None else dn0,
            None, None)


torch.library.register_autograd("seqpar::mlstm_fwd", _backward, setup_context=_setup)


def triton_mlstm(q, k, v, i, f, *, scale: float, initial_state, output_final_state: bool,
                 offsets):
    """mLSTM on CUDA (or the Triton interpreter) on validated inputs.

    q, k: (B, T, H, K); v: (B, T, H, V) float16/bfloat16/float32; i, f: (B, T, H)
    float32 pre-activations; initial_state: the pair (C (N, H, K, V), n (N, H, K)) or
    None; offsets: document offsets (list, B == 1) or None. Returns o (B, T, H, V) in
    v's dtype and the final pair (float32) or None.
    """
    B, T = q.shape[:2]
    C0 = n0 = None
    if initial_state is not None:
        C0, n0 = (s.float().contiguous() for s in initial_state)
    o, _, _, CT, nT = _mlstm_fwd_op(as_packed(q), as_packed(k), as_packed(v), as_packed(i),
                                    as_packed(f), C0, n0, float(scale),
                                    packed_offsets(B, T, offsets))
    return o.reshape(v.shape), ((CT, nT) if output_final_state else None)
