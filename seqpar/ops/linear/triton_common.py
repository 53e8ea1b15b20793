"""What the linear family's Triton kernels share: packed-document chunk plans, block
sizes, the masked tile loads and stores every kernel addresses memory with, and the
kernels of more than one engine (document bounds, the per-head scalar gate, and the
chunk output and dq/dk kernels that the diagonal engine and the delta rules both run).

Every kernel sees its input as one packed stream ``(1, TT, H, D)`` with document
offsets; a batch of ``B`` equal-length rows is the packed stream with offsets
``[0, T, 2T, ..., B T]`` (a free reshape), so one code path serves both layouts and no
document is padded. Chunks never straddle a document boundary: chunk ``c`` of document
``n`` covers ``[bos + c BT, min(bos + (c + 1) BT, eos))``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .engine import CHUNK, to_device

# Chunk length of every kernel, the engine's CHUNK (the segment decays read the kernels'
# per-chunk gate sums): 64 rows fill a tensor-core tile and keep the (BT, BT) intra-chunk
# matrices in registers.
BT = CHUNK


@dataclass(frozen=True)
class ChunkPlan:
    """Document and chunk indices for a packed stream.

    offsets: int32 (N + 1,) document offsets; chunk_index: int32 (NT, 2) rows
    ``(document, chunk within document)``; chunk_offsets: int32 (N + 1,) index of each
    document's first chunk in the global chunk order (per-chunk states are stored in
    that order); n_docs N; n_chunks NT.
    """
    offsets: torch.Tensor
    chunk_index: torch.Tensor
    chunk_offsets: torch.Tensor
    n_docs: int
    n_chunks: int


def chunk_plan(offsets: list[int], device: torch.device) -> ChunkPlan:
    """Plan the chunks of the packed stream with document offsets ``offsets``.

    Plans are cached per (offsets, device), and a new one reaches the device through
    pinned memory, so that building it never waits for the GPU's queue. The tensors are
    shared: never modify them.
    """
    return _chunk_plan(tuple(offsets), torch.device(device))


@functools.lru_cache(maxsize=256)
def _chunk_plan(offsets: tuple[int, ...], device: torch.device) -> ChunkPlan:
    index, starts = [], [0]
    for n, (s, e) in enumerate(zip(offsets, offsets[1:])):
        nc = triton.cdiv(e - s, BT)
        index.extend((n, c) for c in range(nc))
        starts.append(starts[-1] + nc)
    def as_t(x):
        return to_device(x, torch.int32, device)

    return ChunkPlan(as_t(offsets), as_t(index).reshape(-1, 2), as_t(starts),
                     len(offsets) - 1, len(index))


# Tile sizes: one fixed set for every K and V (64 to 129 masked, checked on an H100).
# Smaller dims are masked inside these tiles rather than given smaller tiles, because a
# (64, 16) output tile produces wrong results on an H100 with triton 3.6.
BK = 64  # key tile
BV = 64  # value tile of the chunk kernels
BV_STATE = 32  # value tile of the sequential state pass: twice the programs in flight


def dot_precision(dtype: torch.dtype) -> str:
    """The ``PREC`` argument of :func:`mma` for inputs of ``dtype``.

    float32 inputs use three tf32 products per dot (about float32 accuracy on tensor
    cores); for 16-bit inputs the precision argument is ignored on GPU. Triton 3.6's
    interpreter multiplies 16-bit floats as their integer bit patterns in ``tl.dot``, so
    under ``TRITON_INTERPRET=1`` 16-bit operands are upcast first (exact: products of
    16-bit floats are exact in float32, and the GPU accumulates in float32 too).
    """
    if dtype == torch.float32:
        return "tf32x3"
    return "upcast" if os.environ.get("TRITON_INTERPRET", "0") == "1" else "tf32"


@triton.jit
def mma(a, b, PREC: tl.constexpr):
    """``tl.dot(a, b)`` with float32 accumulation; PREC from :func:`dot_precision`."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b, input_precision=PREC)


# Tiles are addressed with masked pointer arithmetic, not block pointers
# (tl.make_block_ptr), which Triton 3.9 removed. A transposed tile is the same call with
# the offsets, strides, extents and tile sizes swapped. The helpers build a tile's
# addresses and mask in the order and form of a block pointer's boundary check, lower
# bounds included (r0 and c0 are never negative here), because the kernels' launch
# settings assume the register allocation ptxas gives this form on sm_90: other forms of
# the same addresses spill more registers, the float32 mLSTM kernels most.

@triton.jit
def load_tile(base, r0, c0, stride_r, stride_c, n_rows, n_cols, BR: tl.constexpr,
              BC: tl.constexpr):
    """The (BR, BC) tile whose element ``(i, j)`` is
    ``base[(r0 + i) * stride_r + (c0 + j) * stride_c]``, zero where ``r0 + i >= n_rows``
    or ``c0 + j >= n_cols``; in base's dtype. ``r0`` and ``c0`` are non-negative. Offsets
    are int64: in a long packed stream a tile can lie more than 2^31 elements past the
    start of its document (a token row is ``H * D`` elements)."""
    rows = r0 + tl.arange(0, BR).to(tl.int64)
    cols = c0 + tl.arange(0, BC).to(tl.int64)
    return tl.load(base + (rows[:, None] * stride_r + cols[None, :] * stride_c),
                   mask=((rows[:, None] >= 0) & (rows[:, None] < n_rows))
                   & ((cols[None, :] >= 0) & (cols[None, :] < n_cols)), other=0.)


@triton.jit
def store_tile(base, x, r0, c0, stride_r, stride_c, n_rows, n_cols, BR: tl.constexpr,
               BC: tl.constexpr):
    """Store the (BR, BC) tile ``x`` where :func:`load_tile` with the same arguments
    loads it from, skipping the elements outside ``n_rows`` x ``n_cols``. ``x`` is
    converted to base's dtype by ``tl.store``; kernels cast explicitly where it matters."""
    rows = r0 + tl.arange(0, BR).to(tl.int64)
    cols = c0 + tl.arange(0, BC).to(tl.int64)
    tl.store(base + (rows[:, None] * stride_r + cols[None, :] * stride_c), x,
             mask=((rows[:, None] >= 0) & (rows[:, None] < n_rows))
             & ((cols[None, :] >= 0) & (cols[None, :] < n_cols)))


@triton.jit
def load_block(base, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
    """The whole (BR, BC) block at ``base`` with element ``(i, j)`` at
    ``base[i * stride_r + j * stride_c]``, unmasked (a per-chunk (BT, BT) matrix)."""
    r = tl.arange(0, BR)
    c = tl.arange(0, BC)
    return tl.load(base + r[:, None] * stride_r + c[None, :] * stride_c)


@triton.jit
def store_block(base, x, stride_r, stride_c, BR: tl.constexpr, BC: tl.constexpr):
    """Store the whole (BR, BC) tile ``x`` where :func:`load_block` loads it from."""
    r = tl.arange(0, BR)
    c = tl.arange(0, BC)
    tl.store(base + r[:, None] * stride_r + c[None, :] * stride_c, x)


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the per-chunk states stored for inputs like ``x``: float32 for float32
    inputs, else x's dtype."""
    # Per-chunk states feed tensor-core products in the input dtype anyway; 16-bit
    # storage halves their traffic. The carried state stays float32 in registers.
    return torch.float32 if x.dtype == torch.float32 else x.dtype


def as_packed(x: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T, H, ...) -> contiguous (1, B T, H, ...)."""
    if x is None:
        return None
    return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def packed_offsets(B: int, T: int, offsets: list[int] | None) -> list[int]:
    """Document offsets of the packed stream: the given ones, or one document per row."""
    return list(offsets) if offsets is not None else [b * T for b in range(B + 1)]


# ---- Kernels shared by the engines ---------------------------------------------------------
# Document bookkeeping, the per-head scalar gate, and the chunk kernels of the diagonal
# engine with a scalar (or no) gate, which the delta rules run on their transformed values
# (the math is in triton_diag's and triton_delta's module docstrings).

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def doc_bounds(offs, cidx, i_t):
    """Chunk ``i_t`` of the global chunk order (ChunkPlan.chunk_index): its chunk number
    within its document, the document's start token (int64) and token count."""
    n = tl.load(cidx + 2 * i_t)
    c = tl.load(cidx + 2 * i_t + 1)
    bos = tl.load(offs + n).to(tl.int64)
    eos = tl.load(offs + n + 1).to(tl.int64)
    return c, bos, eos - bos


@triton.jit
def doc_span(offs, coff, n):
    """Start token, token count and first chunk of document n."""
    bos = tl.load(offs + n).to(tl.int64)
    T_doc = tl.load(offs + n + 1).to(tl.int64) - bos
    return bos, T_doc, tl.load(coff + n).to(tl.int64)


@triton.jit
def chunk_gates(gc, bos, c, T_doc, i_h, H: tl.constexpr, BT: tl.constexpr):
    """Cumulative log2 gates of one chunk and the last one.

    Rows past the document end repeat the last gate: their inputs are zero, but a
    difference ``G_pad - G_j`` with a real ``j`` must stay <= 0 so that 0 * 2^(...)
    never meets an overflowed exponent."""
    t = c * BT + tl.arange(0, BT)
    last = tl.minimum(c * BT + BT, T_doc) - 1
    g_last = tl.load(gc + (bos + last) * H + i_h)
    b_g = tl.load(gc + (bos + t) * H + i_h, mask=t < T_doc, other=0.)
    return tl.where(t < T_doc, b_g, g_last), g_last


@triton.jit
def gate_cumsum_kernel(g, gc, offs, cidx, H: tl.constexpr, BT: tl.constexpr):
    """Per-chunk cumulative sums of one log gate per head and token, in log2 units."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    t = c * BT + tl.arange(0, BT)
    m = t < T_doc
    b_g = tl.load(g + (bos + t) * H + i_h, mask=m, other=0.)
    tl.store(gc + (bos + t) * H + i_h, tl.cumsum(b_g * LOG2E, axis=0), mask=m)


@triton.jit
def pair_kernel(a, b, y, h, gc, out, offs, cidx, scale,
                H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr,
                BACKWARD: tl.constexpr, PREC: tl.constexpr):
    """Chunk outputs along V: forward ``o`` (a=q, b=k, y=v, h: entering states) or
    backward ``dv`` (a=k, b=q, y=do, h: gradients of leaving states). With
    ``M = a b^T`` masked to the causal (forward) or anti-causal (backward) triangle and
    decayed, ``out = scale M y + w * (a h)`` with ``w`` the per-row decay into or out of
    the state."""
    i_v, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    b_M = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        b_a = load_tile(a + (bos * H + i_h) * K, c * BT, i_k * BK, H * K, 1, T_doc, K, BT, BK)
        b_b = load_tile(b + (bos * H + i_h) * K, i_k * BK, c * BT, 1, H * K, K, T_doc, BK, BT)
        b_h = load_tile(h + (i_t * H + i_h).to(tl.int64) * K * V, i_k * BK, i_v * BV, V, 1, K, V,
                        BK, BV)
        b_o += mma(b_a, b_h.to(b_a.dtype), PREC)
        b_M += mma(b_a, b_b, PREC)
    t = c * BT + tl.arange(0, BT)
    if BACKWARD:
        keep = t[:, None] <= t[None, :]
    else:
        keep = t[:, None] >= t[None, :]
    if USE_G:
        b_g, g_last = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
        if BACKWARD:
            b_o *= tl.exp2(g_last - b_g)[:, None]
            d = b_g[None, :] - b_g[:, None]
        else:
            b_o *= tl.exp2(b_g)[:, None]
            d = b_g[:, None] - b_g[None, :]
        b_M = tl.where(keep, b_M * tl.exp2(tl.where(keep, d, 0.)), 0.)
    else:
        b_M = tl.where(keep, b_M, 0.)
    b_y = load_tile(y + (bos * H + i_h) * V, c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV)
    if BACKWARD:
        b_o += scale * mma(b_M.to(b_y.dtype), b_y, PREC)
    else:
        b_o = scale * (b_o + mma(b_M.to(b_y.dtype), b_y, PREC))
    store_tile(out + (bos * H + i_h) * V, b_o.to(out.dtype.element_ty), c * BT, i_v * BV, H * V, 1,
               T_doc, V, BT, BV)


@triton.jit
def dqk_tiles(do, v, h, dh, bos, c, T_doc, i_h, i_v, i_k, base_s, H: tl.constexpr,
              K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
              BV: tl.constexpr):
    """The V-tile loads of a dq/dk kernel: do and v of the chunk (BT, BV) and their
    transposes (BV, BT), and the transposed state tiles h^T, dh^T (BV, BK) at base_s."""
    return (load_tile(do + (bos * H + i_h) * V, c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV),
            load_tile(v + (bos * H + i_h) * V, c * BT, i_v * BV, H * V, 1, T_doc, V, BT, BV),
            load_tile(do + (bos * H + i_h) * V, i_v * BV, c * BT, 1, H * V, V, T_doc, BV, BT),
            load_tile(v + (bos * H + i_h) * V, i_v * BV, c * BT, 1, H * V, V, T_doc, BV, BT),
            load_tile(h + base_s, i_v * BV, i_k * BK, 1, V, V, K, BV, BK),
            load_tile(dh + base_s, i_v * BV, i_k * BK, 1, V, V, K, BV, BK))


@triton.jit
def dqk_kernel(q, k, v, do, h, dh, gc, dq, dk, r_part, b_part, dvn, dw, offs, cidx, scale,
               TT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, USE_G: tl.constexpr, DW: tl.constexpr,
               PREC: tl.constexpr):
    """dq, dk of one chunk and K tile, and (with a gate) this tile's share of the gate
    gradient terms ``r`` (reverse-cumsummed later) and ``b`` (forward-cumsummed).
    With DW (the delta rule, v = v'): also ``dW = -dv' h^T`` into dw (packed like k,
    its dtype) from dvn (packed like v), while the state tiles are in registers."""
    i_k, i_t, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    if DW:
        b_dw = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)   # [i, j] = do_i . v_j
    b_dAt = tl.zeros([BT, BT], dtype=tl.float32)  # its transpose, by its own product
    b_hdh = tl.zeros([BK], dtype=tl.float32)
    base_s = (i_t * H + i_h).to(tl.int64) * K * V
    for i_v in range(tl.cdiv(V, BV)):
        b_do, b_v, b_doT, b_vT, b_hT, b_dhT = dqk_tiles(do, v, h, dh, bos, c, T_doc, i_h, i_v, i_k,
                                                        base_s, H, K, V, BT, BK, BV)
        b_dA += mma(b_do, b_vT, PREC)
        b_dAt += mma(b_v, b_doT, PREC)
        b_dq += mma(b_do, b_hT.to(b_do.dtype), PREC)
        b_dk += mma(b_v, b_dhT.to(b_v.dtype), PREC)
        if DW:
            b_dw -= mma(load_tile(dvn + (bos * H + i_h) * V, c * BT, i_v * BV, H * V, 1, T_doc, V,
                                  BT, BV),
                        b_hT.to(b_v.dtype), PREC)
        if USE_G:
            b_hdh += tl.sum(b_hT.to(tl.float32) * b_dhT.to(tl.float32), axis=0)
    b_q = load_tile(q + (bos * H + i_h) * K, c * BT, i_k * BK, H * K, 1, T_doc, K, BT, BK)
    b_k = load_tile(k + (bos * H + i_h) * K, c * BT, i_k * BK, H * K, 1, T_doc, K, BT, BK)
    t = c * BT + tl.arange(0, BT)
    causal = t[:, None] >= t[None, :]
    anti = t[:, None] <= t[None, :]
    b_dq *= scale
    if USE_G:
        b_g, g_last = chunk_gates(gc, bos, c, T_doc, i_h, H, BT)
        b_dq *= tl.exp2(b_g)[:, None]
        b_dk *= tl.exp2(g_last - b_g)[:, None]
        b_dS = tl.where(causal, b_dA * tl.exp2(tl.where(causal, b_g[:, None] - b_g[None, :], 0.)), 0.) * scale
        b_dSt = tl.where(anti, b_dAt * tl.exp2(tl.where(anti, b_g[None, :] - b_g[:, None], 0.)), 0.) * scale
        b_qT = load_tile(q + (bos * H + i_h) * K, i_k * BK, c * BT, 1, H * K, K, T_doc, BK, BT)
        b_kT = load_tile(k + (bos * H + i_h) * K, i_k * BK, c * BT, 1, H * K, K, T_doc, BK, BT)
        # P = dS * (q k^T) strictly below the diagonal, and its transpose
        b_P = tl.where(t[:, None] > t[None, :], b_dS * mma(b_q, b_kT, PREC), 0.)
        b_Pt = tl.where(t[:, None] < t[None, :], b_dSt * mma(b_k, b_qT, PREC), 0.)
        b_r = tl.sum(b_dq * b_q.to(tl.float32), axis=1) + tl.sum(b_P, axis=1) - tl.sum(b_Pt, axis=1)
        last = tl.minimum(c * BT + BT, T_doc) - 1
        c_term = tl.sum(b_hdh * tl.exp2(g_last), axis=0)
        b_r += tl.where(t == last, c_term, 0.)
        b_b = tl.sum(b_dk * b_k.to(tl.float32), axis=1)
        m = t < T_doc
        o_part = i_k * TT * H + (bos + t) * H + i_h
        tl.store(r_part + o_part, b_r, mask=m)
        tl.store(b_part + o_part, b_b, mask=m)
    else:
        b_dS = tl.where(causal, b_dA, 0.) * scale
        b_dSt = tl.where(anti, b_dAt, 0.) * scale
    b_dq += mma(b_dS.to(b_k.dtype), b_k, PREC)
    b_dk += mma(b_dSt.to(b_q.dtype), b_q, PREC)
    store_tile(dq + (bos * H + i_h) * K, b_dq.to(dq.dtype.element_ty), c * BT, i_k * BK, H * K, 1,
               T_doc, K, BT, BK)
    store_tile(dk + (bos * H + i_h) * K, b_dk.to(dk.dtype.element_ty), c * BT, i_k * BK, H * K, 1,
               T_doc, K, BT, BK)
    if DW:
        store_tile(dw + (bos * H + i_h) * K, b_dw.to(dw.dtype.element_ty), c * BT, i_k * BK, H * K,
                   1, T_doc, K, BT, BK)


@triton.jit
def dg_kernel(r_part, b_part, dg, offs, cidx, TT, H: tl.constexpr, BT: tl.constexpr,
              NK: tl.constexpr):
    """dg_t = sum_{i>=t} r_i + sum_{j<t} b_j within the chunk, summing the K tiles."""
    i_t, i_h = tl.program_id(0), tl.program_id(1)
    c, bos, T_doc = doc_bounds(offs, cidx, i_t)
    t = c * BT + tl.arange(0, BT)
    m = t < T_doc
    mb = m & (t > c * BT)
    b_r = tl.zeros([BT], dtype=tl.float32)
    b_b = tl.zeros([BT], dtype=tl.float32)
    for i_k in tl.static_range(NK):
        b_r += tl.load(r_part + i_k * TT * H + (bos + t) * H + i_h, mask=m, other=0.)
        # shifted by one token so the inclusive cumsum is exclusive without subtracting
        b_b += tl.load(b_part + i_k * TT * H + (bos + t - 1) * H + i_h, mask=mb, other=0.)
    b_dg = tl.cumsum(b_r, axis=0, reverse=True) + tl.cumsum(b_b, axis=0)
    tl.store(dg + (bos + t) * H + i_h, b_dg, mask=m)


def gate_cumsum(g: torch.Tensor, plan: ChunkPlan, H: int) -> torch.Tensor:
    """Log gates g (1, TT, H) float32 -> their cumulative sums within each chunk of
    ``plan``, times log2(e) (the ``G`` of the kernels, which exponentiate with exp2);
    same shape and dtype."""
    gc = torch.empty_like(g)
    gate_cumsum_kernel[(plan.n_chunks, H)](g, gc, plan.offsets, plan.chunk_index, H=H, BT=BT)
    return gc
