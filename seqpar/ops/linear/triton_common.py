"""Bookkeeping shared by the linear family's Triton kernels: packed-document chunk plans,
block sizes and the masked tile loads and stores every kernel addresses memory with.

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

# Chunk length of every kernel: 64 rows fill a tensor-core tile and keep the (BT, BT)
# intra-chunk matrices in registers.
BT = 64


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
    def as_t(x):  # through pinned memory: a pageable copy would block the host
        t = torch.tensor(x, dtype=torch.int32)
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
    return ChunkPlan(as_t(offsets), as_t(index).reshape(-1, 2), as_t(starts),
                     len(offsets) - 1, len(index))


# Tile sizes: one fixed set, the one run and checked on H100 with triton 3.6 (K, V of 64
# to 129, masked). Smaller dims are masked inside these tiles rather than given smaller
# tiles: a (64, 16) output tile gave wrong results there (tests/test_triton.py on the GPU
# at V = 16).
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
# bounds included (r0 and c0 are never negative here): the launch settings were tuned on
# that code, and compiled for sm_90 other forms allocate registers differently (up to
# 3 KB more spills in the float32 mLSTM kernels).

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


def as_packed(x: torch.Tensor | None) -> torch.Tensor | None:
    """(B, T, H, ...) -> contiguous (1, B T, H, ...)."""
    if x is None:
        return None
    return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


def packed_offsets(B: int, T: int, offsets: list[int] | None) -> list[int]:
    """Document offsets of the packed stream: the given ones, or one document per row."""
    return list(offsets) if offsets is not None else [b * T for b in range(B + 1)]
