"""Chunkwise Triton kernels for gated linear attention with a per-key log decay (GLA),
forward and backward; float32 states and accumulation.

Per chunk of ``BT`` tokens, with ``G_i`` the cumulative log2 decay of token ``i`` from
the chunk start (a vector over the key channels, float32), ``G_C`` that of the chunk's
last token and ``h_c`` the state entering chunk ``c``:

* ``o_i = scale * (sum_{j<=i} A_ij v_j + (q_i * 2^G_i) h_c)`` with
  ``A_ij = sum_k q_ik k_jk 2^(G_ik - G_jk)``;
* ``h_{c+1} = 2^G_C * h_c + sum_j (k_j * 2^(G_C - G_j))^T v_j`` (sequential over chunks,
  one program per document, head and (K, V) tile).

The exponent of ``A_ij`` depends on the key channel, so ``A`` is not one matrix product
of decayed inputs without a positive exponent somewhere. The chunk is cut into
sub-chunks of ``BC = 16`` tokens. For the rows of the sub-chunk starting at ``p`` and the
columns before ``p``, ``G_p`` is a reference point between the two:
``A_ij = (q_i 2^(G_i - G_p)) . (k_j 2^(G_p - G_j))``, both exponents <= 0, one
tensor-core product per sub-chunk boundary. The (BC, BC) diagonal blocks are summed
elementwise, one column offset per step, with the exponent ``G_i - G_j`` masked to
``j <= i``. No exponent is ever positive, so no decay overflows however strong.

Kernels: the forward builds ``scale * A`` once per chunk and head (``_intra_kernel``:
the off-diagonal blocks as products, (BT, BT) tiles; ``_diag_kernel``: the diagonal
blocks, one program per sub-chunk, small tiles, so that many programs per SM hide the
latency of its sequential steps), stores it ((NT, H, BT, BT), in the inputs' dtype for
16-bit inputs, which its products use anyway) and forms ``o`` from it with two products
(``_out_kernel``). The backward gets ``A``, the cumulative gates and the entering
states ``h`` from the forward. Saving ``h`` costs memory: (NT, H, K, V) in the inputs'
dtype, ``K V H 2 / 64`` bytes per token in bf16 (V / 64 times q's size: 8 KB per token
at H = 16, K = V = 128, twice q), held per layer until its backward. It is worth it:
the forward writes ``h`` anyway, and recomputing it is a second sequential pass over
the sequence, the latency-bound kind of launch. The backward
runs only the reverse pass (``_state_bwd_kernel``), which gives ``dh_c`` (gradient of
the state leaving chunk ``c``); then ``dv = (scale A)^T do + (k 2^(G_C - G)) dh``
(``_out_kernel`` again, no rebuild of ``A``), ``dA = scale do v^T`` once per chunk and
head (``_dA_kernel``; in the inputs' dtype for 16-bit inputs, as ``A``), the diagonal
blocks' shares of dq and dk per sub-chunk (``_dqk_diag_kernel``, float32) and the rest
of dq, dk and dg per chunk and key tile (``_dqk_kernel``: products with the states and
with ``dA`` through the sub-chunk reference points).

Gate gradient: the cumulative gates are local to the chunk, so ``g_t`` acts only through
``G_s`` (``s >= t`` in its chunk) and through the leaving state, which gives

``dg_t = sum_{s>=t} (q_s dq_s - k_s dk_s) + sum_s k_s dk^state_s + sum_v 2^G_C h_c dh_c``

(elementwise over key channels), where ``dk^state_s = 2^(G_C - G_s) (v_s dh_c^T)`` is the
part of ``dk`` through the leaving state. Every term is a decayed product, bounded by
products of input norms (no factor ``2^(+G)``, no undecayed cumulative quantity), so the
subtractions cost no more than float32 rounding of such terms. ``dq`` and ``dk`` enter
in float32, before they are rounded to the input dtype. The reverse cumulative sum is a
product with a triangular matrix of ones.
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
    LOG2E,
    as_packed,
    chunk_plan,
    doc_bounds,
    doc_span,
    dot_precision,
    load_block,
    load_tile,
    mma,
    packed_offsets,
    state_dtype,
    store_block,
    store_tile,
)

NUM_WARPS = 4  # the sequential state pass
# Launch settings of the (BT, BT)-tile kernels: they hold several (BT, BT) and (BT, BK)
# float32 tiles at once, so they need 8 warps not to spill registers on sm_90, and one
# pipeline stage, as more stages spill again and take the float32 kernels past sm_90's
# shared memory (tests/sm90.py compiles them for sm_90 and checks both).
CHUNK_LAUNCH = dict(num_warps=8, num_stages=1)
BC = 16  # sub-chunk of the intra-chunk decomposition: the smallest tensor-core tile
DIAG_WARPS = 4  # _diag_kernel, _dqk_diag_kernel: (BC, BK) tiles
# Key tile of the (dq, dk, dg) kernel (the default of _dqk's bk): 64, although it spills a
# few hundred bytes of registers on sm_90 in bf16, because 32-wide tiles reload do, v and
# dA twice as often.
BK_DQK = 64


@triton.jit
def _load(x, bos, rows, T_doc, i_h, cols, H: tl.constexpr, D: tl.constexpr):
    """``x[bos + rows, i_h, cols]`` of a packed (1, TT, H, D) tensor, zero past the
    document end and past D; ``rows`` and ``cols`` broadcast to the tile's shape."""
    return tl.load(x + ((bos + rows) * H + i_h) * D + cols, mask=(rows < T_doc) & (cols < D),
                   other=0.)


@triton.jit
def _tile(x, bos, T_doc, i_h, t0, d0, H: tl.constexpr, D: tl.constexpr, BR: tl.constexpr,
          BD: tl.constexpr, TRANS: tl.constexpr):
    """Rows ``t0 + [0, BR)`` and columns ``d0 + [0, BD)`` of head ``i_h`` of a packed
    (1, TT, H, D) tensor's document at ``bos``, zero outside; (BR, BD), or (BD, BR) with
    TRANS."""
    if TRANS:
        return load_tile(x + (bos * H + i_h) * D, d0, t0, 1, H * D, D, T_doc, BD, BR)
    return load_tile(x + (bos * H + i_h) * D, t0, d0, H * D, 1, T_doc, D, BR, BD)


@triton.jit
def _store(x, b_x, bos, T_doc, i_h, t0, d0, H: tl.constexpr, D: tl.constexpr,
           BR: tl.constexpr, BD: tl.constexpr):
    """Store a (BR, BD) tile at the place :func:`_tile` loads it from (TRANS=False)."""
    store_tile(x + (bos * H + i_h) * D, b_x.to(x.dtype.element_ty), t0, d0, H * D, 1, T_doc, D,
               BR, BD)


@triton.jit
def _gate_tile(gc, bos, T_doc, last, i_h, c, d0, H: tl.constexpr, K: tl.constexpr,
               BT: tl.constexpr, BD: tl.constexpr, TRANS: tl.constexpr):
    """Cumulative log2 gates of chunk ``c`` as :func:`_tile`, rows past the document end
    repeating row ``last`` (as :func:`_load_g`)."""
    kk = d0 + tl.arange(0, BD)
    t = c * BT + tl.arange(0, BT)
    g_last = tl.load(gc + ((bos + last) * H + i_h) * K + kk, mask=kk < K, other=0.)
    b_g = _tile(gc, bos, T_doc, i_h, c * BT, d0, H, K, BT, BD, TRANS)
    if TRANS:
        return tl.where(t[None, :] < T_doc, b_g, g_last[:, None])
    return tl.where(t[:, None] < T_doc, b_g, g_last[None, :])


@triton.jit
def _load_g(gc, bos, rows, last, i_h, cols, H: tl.constexpr, K: tl.constexpr):
    """Cumulative log2 gates at ``rows`` (as :func:`_load`). Rows past the document end
    repeat row ``last``: their inputs are zero, but a difference ``G_pad - G_j`` with a
    real ``j`` must stay <= 0 so that 0 * 2^(...) never meets an overflowed exponent."""
    return tl.load(gc + ((bos + tl.minimum(rows, last)) * H + i_h) * K + cols, mask=cols < K,
                   other=0.)


@triton.jit
def _cumsum_kernel(g, gc, offs, cidx, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr):
    """Cumulative log2 gates of one chunk and key tile, from the chunk start."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    t = c * BT + tl.arange(0, BT)
    kk = i_k * BK + tl.arange(0, BK)
    b_g = _load(g, bos, t[:, None], T_doc, i_h, kk[None, :], H, K)
    tl.store(gc + ((bos + t[:, None]) * H + i_h) * K + kk[None, :],
             tl.cumsum(b_g * LOG2E, axis=0), mask=(t[:, None] < T_doc) & (kk[None, :] < K))


@triton.jit
def _state_scan(x, y, gc, h, s0, s_out, offs, coff, scale, i_k, i_v, i_nh,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, REVERSE: tl.constexpr,
                HAS_S0: tl.constexpr, STORE_OUT: tl.constexpr, STORE_H: tl.constexpr,
                PREC: tl.constexpr):
    """Sequential state pass of document and head ``i_nh`` and (K, V) tile
    ``(i_k, i_v)``.

    Forward (REVERSE=False, x=k, y=v): stores the state entering each chunk into h.
    Backward (REVERSE=True, x=q, y=do): walks chunks last to first and stores the
    gradient of the state leaving each chunk into h. s0 is the initial state (or dht),
    s_out receives the final state (or dh0). Without STORE_H only s_out is written.
    """
    n, i_h = i_nh // H, i_nh % H
    bos, T_doc, boc = doc_span(offs, coff, n)
    NC = tl.cdiv(T_doc, BT).to(tl.int32)
    kk = i_k * BK + tl.arange(0, BK)
    vv = i_v * BV + tl.arange(0, BV)
    o_s = kk[:, None] * V + vv[None, :]
    m_s = (kk[:, None] < K) & (vv[None, :] < V)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_S0:
        b_h += tl.load(s0 + i_nh * K * V + o_s, mask=m_s, other=0.).to(tl.float32)
    for i in range(NC):
        c = NC - 1 - i if REVERSE else i
        if STORE_H:
            tl.store(h + ((boc + c) * H + i_h) * K * V + o_s, b_h.to(h.dtype.element_ty), mask=m_s)
        t = c * BT + tl.arange(0, BT)
        last = tl.minimum(c * BT + BT, T_doc) - 1
        b_x = _load(x, bos, t[None, :], T_doc, i_h, kk[:, None], H, K)
        b_y = _load(y, bos, t[:, None], T_doc, i_h, vv[None, :], H, V)
        b_g = _load_g(gc, bos, t[None, :], last, i_h, kk[:, None], H, K)
        g_last = tl.load(gc + ((bos + last) * H + i_h) * K + kk, mask=kk < K, other=0.)
        b_h *= tl.exp2(g_last)[:, None]
        # forward: k_j 2^(G_C - G_j); backward: q_i 2^G_i
        w = b_g if REVERSE else g_last[:, None] - b_g
        b_x = (b_x * tl.exp2(w)).to(b_y.dtype)
        if REVERSE:
            b_h += scale * mma(b_x, b_y, PREC)
        else:
            b_h += mma(b_x, b_y, PREC)
    if STORE_OUT:
        tl.store(s_out + i_nh * K * V + o_s, b_h, mask=m_s)


@triton.jit
def _state_kernel(k, v, gc, h, h0, ht, offs, coff,
                  H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                  BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
                  STORE_H: tl.constexpr, PREC: tl.constexpr):
    """The forward state pass (:func:`_state_scan`): entering states h and the final
    state ht, one program per (K tile, V tile, document and head)."""
    _state_scan(k, v, gc, h, h0, ht, offs, coff, 1., tl.program_id(0), tl.program_id(1),
                tl.program_id(2), H, K, V, BT, BK, BV, False, HAS_H0, True, STORE_H, PREC)


@triton.jit
def _state_bwd_kernel(q, do, gc, dh, dht, dh0, offs, coff, scale,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr,
                      HAS_H0: tl.constexpr, STORE_H: tl.constexpr, PREC: tl.constexpr):
    """The reverse state pass (:func:`_state_scan`): gradients dh of the leaving states
    and dh0 where there is an initial state, one program per (K tile, V tile, document
    and head)."""
    _state_scan(q, do, gc, dh, dht, dh0, offs, coff, scale, tl.program_id(0), tl.program_id(1),
                tl.program_id(2), H, K, V, BT, BK, BV, True, HAS_DHT, HAS_H0, STORE_H, PREC)


@triton.jit
def _intra_kernel(q, k, gc, A, offs, cidx, scale,
                  H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                  BC: tl.constexpr, PREC: tl.constexpr):
    """``scale * A`` of one chunk and head outside the diagonal (BC, BC) blocks: a
    (BT, BT) row-major block of A (zero above the diagonal blocks), in A's dtype; the
    products through the sub-chunk reference points (module docstring)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    r = tl.arange(0, BT)
    last = tl.minimum(c * BT + BT, T_doc) - 1
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        kk = i_k * BK + tl.arange(0, BK)
        b_q = _tile(q, bos, T_doc, i_h, c * BT, i_k * BK, H, K, BT, BK, False)
        g_q = _gate_tile(gc, bos, T_doc, last, i_h, c, i_k * BK, H, K, BT, BK, False)
        b_kT = _tile(k, bos, T_doc, i_h, c * BT, i_k * BK, H, K, BT, BK, True)
        g_kT = _gate_tile(gc, bos, T_doc, last, i_h, c, i_k * BK, H, K, BT, BK, True)
        # not unrolled (tl.static_range): unrolling keeps more tiles live, which spill on sm_90
        for p in range(BC, BT, BC):
            g_p = tl.load(gc + ((bos + tl.minimum(c * BT + p, last)) * H + i_h) * K + kk,
                          mask=kk < K, other=0.)
            late = (r >= p) & (r < p + BC)  # the sub-chunk starting at p (the q side)
            early = r < p                   # the tokens before it (the k side)
            w_q = tl.where(late[:, None], tl.exp2(tl.where(late[:, None], g_q - g_p[None, :], 0.)), 0.)
            w_k = tl.where(early[None, :], tl.exp2(tl.where(early[None, :], g_p[:, None] - g_kT, 0.)), 0.)
            b_A += mma((b_q * w_q).to(b_q.dtype), (b_kT * w_k).to(b_q.dtype), PREC)
    # the diagonal blocks are :func:`_diag_kernel`'s: each entry has one writer
    tl.store(A + (i_t * H + i_h).to(tl.int64) * BT * BT + r[:, None] * BT + r[None, :],
             (scale * b_A).to(A.dtype.element_ty), mask=(r[:, None] // BC) != (r[None, :] // BC))


@triton.jit
def _diag_kernel(q, k, gc, A, offs, cidx, scale,
                 H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                 BC: tl.constexpr):
    """The (BC, BC) diagonal block of ``scale * A`` of one sub-chunk, chunk and head,
    summed elementwise over the keys (``A_ij`` for ``j <= i``, zero above), one column
    per step. Small tiles and one program per sub-chunk: many programs per SM hide the
    latency of the sequential steps."""
    i_s, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    last = tl.minimum(c * BT + BT, T_doc) - 1
    t0 = c * BT + i_s * BC
    r = tl.arange(0, BC)
    b_D = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        kk = i_k * BK + tl.arange(0, BK)
        b_q = _load(q, bos, t0 + r[:, None], T_doc, i_h, kk[None, :], H, K).to(tl.float32)
        g_q = _load_g(gc, bos, t0 + r[:, None], last, i_h, kk[None, :], H, K)
        for jj in range(BC):
            b_kj = _load(k, bos, t0 + jj, T_doc, i_h, kk, H, K).to(tl.float32)
            g_j = _load_g(gc, bos, t0 + jj, last, i_h, kk, H, K)
            keep = r >= jj
            s = tl.sum(b_q * b_kj[None, :] * tl.exp2(tl.where(keep[:, None], g_q - g_j[None, :], 0.)),
                       axis=1)
            b_D += tl.where(keep[:, None] & (r[None, :] == jj), s[:, None], 0.)
    p_D = A + (i_t * H + i_h).to(tl.int64) * BT * BT + (i_s * BC) * (BT + 1)
    tl.store(p_D + r[:, None] * BT + r[None, :], (scale * b_D).to(A.dtype.element_ty))


@triton.jit
def _out_kernel(a, y, h, gc, A, out, offs, cidx, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, BACKWARD: tl.constexpr,
                PREC: tl.constexpr):
    """One (BT, BV) output tile of one chunk and head from the stored ``scale * A``
    (:func:`_intra_kernel`): forward ``o`` (a=q, y=v, h: entering states),
    ``o = (scale A) v + scale (q 2^G) h``; backward ``dv`` (a=k, y=do, h: gradients of
    the leaving states, which carry the scale), ``dv = (scale A)^T do +
    (k 2^(G_C - G)) dh``."""
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    last = tl.minimum(c * BT + BT, T_doc) - 1
    base_s = (i_t * H + i_h).to(tl.int64) * K * V
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        kk = i_k * BK + tl.arange(0, BK)
        b_a = _tile(a, bos, T_doc, i_h, c * BT, i_k * BK, H, K, BT, BK, False)
        g_a = _gate_tile(gc, bos, T_doc, last, i_h, c, i_k * BK, H, K, BT, BK, False)
        if BACKWARD:
            g_last = tl.load(gc + ((bos + last) * H + i_h) * K + kk, mask=kk < K, other=0.)
            g_a = g_last[None, :] - g_a
        b_h = load_tile(h + base_s, i_k * BK, i_v * BV, V, 1, K, V, BK, BV)
        b_o += mma((b_a * tl.exp2(g_a)).to(b_a.dtype), b_h.to(b_a.dtype), PREC)
    if not BACKWARD:
        b_o *= scale
    base_A = (i_t * H + i_h).to(tl.int64) * BT * BT
    b_y = _tile(y, bos, T_doc, i_h, c * BT, i_v * BV, H, V, BT, BV, False)
    if BACKWARD:  # A^T through swapped strides
        b_A = load_block(A + base_A, 1, BT, BT, BT)
    else:
        b_A = load_block(A + base_A, BT, 1, BT, BT)
    b_o += mma(b_A.to(b_y.dtype), b_y, PREC)
    _store(out, b_o, bos, T_doc, i_h, c * BT, i_v * BV, H, V, BT, BV)


@triton.jit
def _dA_kernel(do, v, dA, offs, cidx, scale, H: tl.constexpr, V: tl.constexpr,
               BT: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """``dA = scale do v^T`` of one chunk and head: a (BT, BT) row-major block in dA's
    dtype, every entry (the masks are applied where it is used, in :func:`_dqk_kernel`
    and :func:`_dqk_diag_kernel`)."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(V, BV)):
        b_do = _tile(do, bos, T_doc, i_h, c * BT, i_v * BV, H, V, BT, BV, False)
        b_vT = _tile(v, bos, T_doc, i_h, c * BT, i_v * BV, H, V, BT, BV, True)
        b_dA += mma(b_do, b_vT, PREC)
    store_block(dA + (i_t * H + i_h).to(tl.int64) * BT * BT,
                (scale * b_dA).to(dA.dtype.element_ty), BT, 1, BT, BT)


@triton.jit
def _dqk_diag_kernel(q, k, gc, dA, dq_d, dk_d, offs, cidx,
                     H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                     BC: tl.constexpr):
    """The shares of dq and dk through the diagonal (BC, BC) blocks of A, of one
    sub-chunk, chunk and head (float32, (1, TT, H, K)): ``dq_i += sum_{j<=i} dA_ij
    2^(G_i - G_j) k_j`` and ``dk_j += sum_{i>=j} dA_ij 2^(G_i - G_j) q_i`` within the
    sub-chunk, one partner token per step (as :func:`_diag_kernel`)."""
    i_s, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    last = tl.minimum(c * BT + BT, T_doc) - 1
    t0 = c * BT + i_s * BC
    r = tl.arange(0, BC)
    p_dA = dA + (i_t * H + i_h).to(tl.int64) * BT * BT + (i_s * BC) * (BT + 1)
    for i_k in range(tl.cdiv(K, BK)):
        kk = i_k * BK + tl.arange(0, BK)
        g_b = _load_g(gc, bos, t0 + r[:, None], last, i_h, kk[None, :], H, K)
        b_dq = tl.zeros([BC, BK], dtype=tl.float32)
        b_dk = tl.zeros([BC, BK], dtype=tl.float32)
        for jj in range(BC):
            b_kj = _load(k, bos, t0 + jj, T_doc, i_h, kk, H, K).to(tl.float32)
            b_qj = _load(q, bos, t0 + jj, T_doc, i_h, kk, H, K).to(tl.float32)
            g_j = _load_g(gc, bos, t0 + jj, last, i_h, kk, H, K)
            dA_col = tl.load(p_dA + r * BT + jj).to(tl.float32)  # dA[row, jj]
            dA_row = tl.load(p_dA + jj * BT + r).to(tl.float32)  # dA[jj, row]
            lower = (r >= jj)[:, None]
            upper = (r <= jj)[:, None]
            d = g_b - g_j[None, :]
            b_dq += tl.where(lower, dA_col[:, None] * tl.exp2(tl.where(lower, d, 0.)), 0.) * b_kj[None, :]
            b_dk += tl.where(upper, dA_row[:, None] * tl.exp2(tl.where(upper, -d, 0.)), 0.) * b_qj[None, :]
        m = (t0 + r[:, None] < T_doc) & (kk[None, :] < K)
        o_d = ((bos + t0 + r[:, None]) * H + i_h) * K + kk[None, :]
        tl.store(dq_d + o_d, b_dq, mask=m)
        tl.store(dk_d + o_d, b_dk, mask=m)


@triton.jit
def _dqk_kernel(q, k, v, do, h, dh, gc, dA, dq_d, dk_d, dq, dk, dg, offs, cidx, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    """dq, dk and dg of one chunk and key tile, from ``dA = scale do v^T``
    (:func:`_dA_kernel`) and the diagonal blocks' shares of dq and dk
    (:func:`_dqk_diag_kernel`)."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    r = tl.arange(0, BT)
    last = tl.minimum(c * BT + BT, T_doc) - 1
    kk = i_k * BK + tl.arange(0, BK)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    base_s = (i_t * H + i_h).to(tl.int64) * K * V
    for i_v in range(tl.cdiv(V, BV)):
        b_do = _tile(do, bos, T_doc, i_h, c * BT, i_v * BV, H, V, BT, BV, False)
        b_v = _tile(v, bos, T_doc, i_h, c * BT, i_v * BV, H, V, BT, BV, False)
        b_hT = load_tile(h + base_s, i_v * BV, i_k * BK, 1, V, V, K, BV, BK)
        b_dhT = load_tile(dh + base_s, i_v * BV, i_k * BK, 1, V, V, K, BV, BK)
        b_dq += mma(b_do, b_hT.to(b_do.dtype), PREC)
        b_dk += mma(b_v, b_dhT.to(b_v.dtype), PREC)
        b_hdh += tl.sum(b_hT.to(tl.float32) * b_dhT.to(tl.float32), axis=0)
    b_q = _tile(q, bos, T_doc, i_h, c * BT, i_k * BK, H, K, BT, BK, False)
    b_k = _tile(k, bos, T_doc, i_h, c * BT, i_k * BK, H, K, BT, BK, False)
    b_g = _gate_tile(gc, bos, T_doc, last, i_h, c, i_k * BK, H, K, BT, BK, False)
    g_last = tl.load(gc + ((bos + last) * H + i_h) * K + kk, mask=kk < K, other=0.)
    b_dq *= scale * tl.exp2(b_g)
    b_dk *= tl.exp2(g_last[None, :] - b_g)
    # the gate-gradient terms through the leaving state (module docstring)
    b_dg_c = tl.sum(b_dk * b_k.to(tl.float32), axis=0) + b_hdh * tl.exp2(g_last)
    # one load; the transpose is a register/shared-memory relayout, not a second read
    b_dA = load_block(dA + (i_t * H + i_h).to(tl.int64) * BT * BT, BT, 1, BT, BT).to(b_k.dtype)
    b_dAt = tl.trans(b_dA)
    for p in range(BC, BT, BC):
        g_p = tl.load(gc + ((bos + tl.minimum(c * BT + p, last)) * H + i_h) * K + kk,
                      mask=kk < K, other=0.)
        late = (r >= p) & (r < p + BC)
        early = r < p
        w_q = tl.where(late[:, None], tl.exp2(tl.where(late[:, None], b_g - g_p[None, :], 0.)), 0.)
        w_k = tl.where(early[:, None], tl.exp2(tl.where(early[:, None], g_p[None, :] - b_g, 0.)), 0.)
        b_dq += w_q * mma(b_dA, (b_k * w_k).to(b_k.dtype), PREC)
        b_dk += w_k * mma(b_dAt, (b_q * w_q).to(b_q.dtype), PREC)
    b_dq += _tile(dq_d, bos, T_doc, i_h, c * BT, i_k * BK, H, K, BT, BK, False)
    b_dk += _tile(dk_d, bos, T_doc, i_h, c * BT, i_k * BK, H, K, BT, BK, False)
    _store(dq, b_dq, bos, T_doc, i_h, c * BT, i_k * BK, H, K, BT, BK)
    _store(dk, b_dk, bos, T_doc, i_h, c * BT, i_k * BK, H, K, BT, BK)
    # reverse cumulative sum over the chunk's tokens as a product with ones on and above
    # the diagonal, in float32 ('ieee')
    b_dg = mma(tl.where(r[:, None] <= r[None, :], 1., 0.),
               b_q.to(tl.float32) * b_dq - b_k.to(tl.float32) * b_dk, "ieee")
    _store(dg, b_dg + b_dg_c[None, :], bos, T_doc, i_h, c * BT, i_k * BK, H, K, BT, BK)


def _cumsum(g, plan):
    H, K = g.shape[2:]
    gc = torch.empty_like(g)
    _cumsum_kernel[(triton.cdiv(K, BK), plan.n_chunks, H)](g, gc, plan.offsets, plan.chunk_index,
                                                            H=H, K=K, BT=BT, BK=BK)
    return gc


def _state_pass(k, v, gc, h0, plan, bk=BK, store_h=True):
    """The forward state pass (:func:`_state_kernel`) in key tiles of ``bk`` (narrower:
    more sequential programs in flight, each reloading v): entering states h (NT, H, K, V)
    in the states' dtype, final states ht (N, H, K, V) float32."""
    H, K, V = k.shape[2], k.shape[3], v.shape[3]
    h = k.new_empty(plan.n_chunks, H, K, V, dtype=state_dtype(k)) if store_h else None
    ht = k.new_empty(plan.n_docs, H, K, V, dtype=torch.float32)
    _state_kernel[(triton.cdiv(K, bk), triton.cdiv(V, BV_STATE), plan.n_docs * H)](
        k, v, gc, h, h0, ht, plan.offsets, plan.chunk_offsets, H=H, K=K, V=V, BT=BT, BK=bk,
        BV=BV_STATE, HAS_H0=h0 is not None, STORE_H=store_h, PREC=dot_precision(k.dtype),
        num_warps=NUM_WARPS)
    return h, ht


def _state_bwd(q, do, gc, h0, dht, plan, scale, bk=BK, store_h=True, want_dh0=None):
    """The reverse state pass (:func:`_state_bwd_kernel`) in key tiles of ``bk`` (as
    :func:`_state_pass`): leaving-state gradients dh (NT, H, K, V) in the states' dtype,
    dh0 (N, H, K, V) float32 or None."""
    H, K, V = q.shape[2], q.shape[3], do.shape[3]
    want_dh0 = h0 is not None if want_dh0 is None else want_dh0
    dh = q.new_empty(plan.n_chunks, H, K, V, dtype=state_dtype(q)) if store_h else None
    dh0 = q.new_empty(plan.n_docs, H, K, V, dtype=torch.float32) if want_dh0 else None
    _state_bwd_kernel[(triton.cdiv(K, bk), triton.cdiv(V, BV_STATE), plan.n_docs * H)](
        q, do, gc, dh, dht, dh0, plan.offsets, plan.chunk_offsets, scale, H=H, K=K, V=V, BT=BT,
        BK=bk, BV=BV_STATE, HAS_DHT=dht is not None, HAS_H0=want_dh0, STORE_H=store_h,
        PREC=dot_precision(q.dtype), num_warps=NUM_WARPS)
    return dh, dh0


def _intra(q, k, gc, plan, scale):
    H, K = q.shape[2], q.shape[3]
    A = q.new_empty(plan.n_chunks, H, BT, BT, dtype=state_dtype(q))
    args = (q, k, gc, A, plan.offsets, plan.chunk_index, scale)
    _intra_kernel[(plan.n_chunks, H)](*args, H=H, K=K, BT=BT, BK=BK, BC=BC,
                                      PREC=dot_precision(q.dtype), **CHUNK_LAUNCH)
    _diag_kernel[(BT // BC, plan.n_chunks, H)](*args, H=H, K=K, BT=BT, BK=BK, BC=BC,
                                               num_warps=DIAG_WARPS)
    return A


def _out(a, y, h, gc, A, plan, scale, backward):
    H, K, V = a.shape[2], a.shape[3], y.shape[3]
    out = torch.empty_like(y)
    _out_kernel[(triton.cdiv(V, BV), plan.n_chunks, H)](
        a, y, h, gc, A, out, plan.offsets, plan.chunk_index, scale, H=H, K=K, V=V, BT=BT,
        BK=BK, BV=BV, BACKWARD=backward, PREC=dot_precision(a.dtype), **CHUNK_LAUNCH)
    return out


def _dA(do, v, plan, scale):
    H = do.shape[2]
    # in the inputs' dtype for 16-bit inputs: _dqk_kernel's products round it to that
    # dtype anyway, and it halves the bytes of the (BT, BT) block it reloads per key tile
    dA = do.new_empty(plan.n_chunks, H, BT, BT, dtype=state_dtype(do))
    _dA_kernel[(plan.n_chunks, H)](do, v, dA, plan.offsets, plan.chunk_index, scale, H=H,
                                   V=v.shape[3], BT=BT, BV=BV, PREC=dot_precision(do.dtype),
                                   **CHUNK_LAUNCH)
    return dA


def _dqk_diag(q, k, gc, dA, plan):
    H, K = q.shape[2], q.shape[3]
    dq_d, dk_d = torch.empty_like(gc), torch.empty_like(gc)
    _dqk_diag_kernel[(BT // BC, plan.n_chunks, H)](q, k, gc, dA, dq_d, dk_d, plan.offsets,
                                                   plan.chunk_index, H=H, K=K, BT=BT, BK=BK,
                                                   BC=BC, num_warps=DIAG_WARPS)
    return dq_d, dk_d


def _dqk(q, k, v, do, h, dh, gc, dA, dq_d, dk_d, plan, scale, bk=BK_DQK):
    """dq, dk like q and k, dg (1, TT, H, K) float32 (:func:`_dqk_kernel`), in key tiles
    of ``bk``: each tile reloads do, v and dA, so wider tiles read fewer bytes but hold
    more registers."""
    H, K = q.shape[2], q.shape[3]
    dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(gc)
    _dqk_kernel[(triton.cdiv(K, bk), plan.n_chunks, H)](
        q, k, v, do, h, dh, gc, dA, dq_d, dk_d, dq, dk, dg, plan.offsets, plan.chunk_index,
        scale, H=H, K=K, V=v.shape[3], BT=BT, BK=bk, BV=BV, BC=BC,
        PREC=dot_precision(q.dtype), **CHUNK_LAUNCH)
    return dq, dk, dg


def gla_forward(q, k, v, g, h0, scale: float, offsets: list[int], gc=None):
    """Packed inputs q, k (1, TT, H, K), v (1, TT, H, V), g (1, TT, H, K) float32 log
    decay, h0 None or (N, H, K, V). Returns o (1, TT, H, V) in v's dtype, the final
    state (N, H, K, V) float32, and for the backward the cumulative log2 gates gc
    (1, TT, H, K) float32, ``scale * A`` (NT, H, BT, BT) (per chunk, row-major) and the
    entering states h (NT, H, K, V); A and h float32 for float32 inputs, else in the
    inputs' dtype, which the products with them use anyway. ``gc``: :func:`gla_cumsum`
    of g if already computed."""
    plan = chunk_plan(offsets, q.device)
    gc = _cumsum(g, plan) if gc is None else gc
    h, ht = _state_pass(k, v, gc, h0, plan)
    A = _intra(q, k, gc, plan, scale)
    return _out(q, v, h, gc, A, plan, scale, False), ht, gc, A, h


def gla_backward(q, k, v, gc, A, h, h0, do, dht, scale: float, offsets: list[int]):
    """Gradients of :func:`gla_forward` from its gc, A and h: dq, dk, dv like their
    inputs, dg (1, TT, H, K) float32, dh0 (N, H, K, V) float32 or None."""
    plan = chunk_plan(offsets, q.device)
    dh, dh0 = _state_bwd(q, do, gc, h0, dht, plan, scale)
    dv = _out(k, do, dh, gc, A, plan, scale, True)
    dA = _dA(do, v, plan, scale)
    dq, dk, dg = _dqk(q, k, v, do, h, dh, gc, dA, *_dqk_diag(q, k, gc, dA, plan), plan, scale)
    return dq, dk, dv, dg, dh0


def gla_cumsum(g, offsets: list[int]):
    """The kernels' G: per-key log gates g (1, TT, H, K) float32 summed cumulatively
    within each chunk of the packed documents, in log2 units; same shape and dtype."""
    return _cumsum(g, chunk_plan(offsets, g.device))


def gla_final_states(k, v, gc, h0, offsets: list[int]):
    """The state-only forward pass: final states (N, H, K, V) float32 of the packed
    documents of k (1, TT, H, K), v (1, TT, H, V), gc (:func:`gla_cumsum` over chunks of
    these documents), from h0 (N, H, K, V) or zeros; no per-chunk states, no outputs."""
    plan = chunk_plan(offsets, k.device)
    return _state_pass(k, v, gc, h0, plan, store_h=False)[1]


def gla_initial_grads(q, do, gc, dht, scale: float, offsets: list[int]):
    """The state-only backward pass: the gradient (N, H, K, V) float32 of each packed
    document's initial state from do (1, TT, H, V) and dht (N, H, K, V) or None; gc as
    in :func:`gla_final_states`."""
    plan = chunk_plan(offsets, q.device)
    return _state_bwd(q, do, gc, None, dht, plan, scale, store_h=False, want_dh0=True)[1]


# torch.library registration: compile traces these as single nodes (no graph break).
# Custom ops cannot return None, so an absent dh0 comes back as an empty tensor.
_EMPTY = (0,)


@torch.library.custom_op("seqpar::gla_fwd", mutates_args=())
def _gla_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                h0: torch.Tensor | None, scale: float, offsets: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return gla_forward(q, k, v, g, h0, scale, offsets)


@_gla_fwd_op.register_fake
def _(q, k, v, g, h0, scale, offsets):
    N, H, K, V = len(offsets) - 1, q.shape[2], q.shape[3], v.shape[3]
    NT = sum(triton.cdiv(e - s, BT) for s, e in zip(offsets, offsets[1:]))
    return (torch.empty_like(v), q.new_empty(N, H, K, V, dtype=torch.float32),
            torch.empty_like(g), q.new_empty(NT, H, BT, BT, dtype=state_dtype(q)),
            q.new_empty(NT, H, K, V, dtype=state_dtype(q)))


@torch.library.custom_op("seqpar::gla_bwd", mutates_args=())
def _gla_bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gc: torch.Tensor,
                A: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, do: torch.Tensor,
                dht: torch.Tensor | None, scale: float, offsets: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, dg, dh0 = gla_backward(q, k, v, gc, A, h, h0, do, dht, scale, offsets)
    return dq, dk, dv, dg, q.new_empty(_EMPTY, dtype=torch.float32) if dh0 is None else dh0


@_gla_bwd_op.register_fake
def _(q, k, v, gc, A, h, h0, do, dht, scale, offsets):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(gc),
            q.new_empty(_EMPTY, dtype=torch.float32) if h0 is None
            else torch.empty_like(h0, dtype=torch.float32))


def _setup(ctx, inputs, output):
    q, k, v, g, h0, scale, offsets = inputs
    _, _, gc, A, h = output
    # gc replaces g (same size; the backward needs only the cumulative gates)
    ctx.save_for_backward(q, k, v, gc, A, h, h0)
    ctx.mark_non_differentiable(gc, A, h)
    ctx.scale, ctx.offsets = scale, offsets


def _backward(ctx, do, dht, _dgc, _dA, _dh):
    q, k, v, gc, A, h, h0 = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(v)
    dq, dk, dv, dg, dh0 = _gla_bwd_op(q, k, v, gc, A, h, h0, do.contiguous(),
                                      None if dht is None else dht.contiguous(),
                                      ctx.scale, ctx.offsets)
    return dq, dk, dv, dg, None if h0 is None else dh0.to(h0.dtype), None, None


torch.library.register_autograd("seqpar::gla_fwd", _backward, setup_context=_setup)


def triton_gla(q, k, v, g, *, scale: float, initial_state, output_final_state: bool, offsets):
    """GLA (per-key log decay) on CUDA (or the Triton interpreter).

    q, k: (B, T, H, K); v: (B, T, H, V) float16/bfloat16/float32; g: (B, T, H, K) log
    decay (<= 0), float32; initial_state: (N, H, K, V) or None; offsets: document offsets
    (list, B == 1) or None. Returns o (B, T, H, V) in v's dtype and the final state
    (N, H, K, V) float32 or None.
    """
    B, T = q.shape[:2]
    h0 = None if initial_state is None else initial_state.contiguous()
    o, ht, *_ = _gla_fwd_op(as_packed(q), as_packed(k), as_packed(v), as_packed(g), h0,
                              float(scale), packed_offsets(B, T, offsets))
    return o.reshape(v.shape), (ht if output_final_state else None)
