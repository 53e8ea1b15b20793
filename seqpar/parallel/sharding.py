"""Helpers for users of sequence parallelism: split a batch along T, gather it back,
global position ids per shard and per-rank views of packed sequences.

All of them follow ``sp.layout`` (contiguous, or zigzag: rank r holds chunks r and
2P-1-r of 2P). Nothing is padded: a length that the layout cannot split evenly raises.
"""
from __future__ import annotations

import torch

from ..ops.validate import check_cu_seqlens, check_tensor, fail, host_offsets
from ._geometry import Geometry, Piece, chunk_pieces


def _geometry_for(sp, seq_len: int, name: str) -> Geometry:
    n = sp.world * (2 if sp.layout == "zigzag" else 1)
    if seq_len < n or seq_len % n:
        fail(name, f"a sequence length divisible by {n} ({sp.layout} layout over {sp.world} "
             "ranks; nothing is padded: pad or trim the batch yourself)", f"length {seq_len}")
    return sp.geometry(seq_len // sp.world, name)


def _index(geo: Geometry, device) -> torch.Tensor:
    return torch.tensor(geo.global_positions(), dtype=torch.long, device=device)


def shard(x: torch.Tensor, sp, dim: int = 1) -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim`` (default: T of a (B, T, ...) tensor).

    ``x`` is the full tensor, the same on every rank. Returns a new tensor of length
    ``x.shape[dim] / P``.
    """
    check_tensor("x", x, dtypes=None)
    geo = _geometry_for(sp, x.shape[dim], "x")
    return x.index_select(dim, _index(geo, x.device))


def unshard(x: torch.Tensor, sp, dim: int = 1) -> torch.Tensor:
    """All-gather every rank's shard along ``dim`` and undo the layout: the full tensor,
    on every rank. Not differentiable (for evaluation and checks); sends
    ``(P - 1) * x.nbytes``, counted as ``'unshard'``."""
    check_tensor("x", x, dtypes=None)
    geo = sp.geometry(x.shape[dim], "x")
    with torch.no_grad():
        parts = torch.cat(sp.comm.all_gather(x.detach(), "unshard").unbind(0), dim)
    order = torch.tensor([t for r in range(sp.world) for t in geo.global_positions(r)], device=x.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=x.device)
    return parts.index_select(dim, inverse)


def position_ids(sp, seq_len: int, cu_seqlens=None, device=None) -> torch.Tensor:
    """Global positions (for RoPE) of this rank's tokens: int64 of shape (seq_len / P,).

    ``seq_len`` is the global length T. With ``cu_seqlens`` (the global packed offsets)
    positions restart at 0 at every document start. ``device`` defaults to
    ``cu_seqlens``' device, or the CPU.
    """
    geo = _geometry_for(sp, seq_len, "seq_len")
    if cu_seqlens is None:
        return _index(geo, device)
    offsets = check_cu_seqlens(cu_seqlens, 1, seq_len, None)
    device = cu_seqlens.device if device is None else device
    pos = _index(geo, device)
    starts = torch.tensor(offsets[:-1], dtype=torch.long, device=device)
    doc = torch.searchsorted(starts, pos, right=True) - 1
    return pos - starts[doc]


def shard_documents(sp, cu_seqlens) -> list[Piece]:
    """The document pieces of this rank's shard of a packed batch, in shard order.

    ``cu_seqlens``: the global int32 offsets (N + 1,). Each :class:`Piece` gives the
    document index, its global and local token range, whether it continues a document
    that began before the chunk (``head``) and whether the document ends in it.
    """
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
    total = host_offsets(cu_seqlens)[-1] if cu_seqlens.numel() else 0  # empty: rejected below
    offsets = check_cu_seqlens(cu_seqlens, 1, total, None)
    geo = _geometry_for(sp, offsets[-1], "cu_seqlens")
    return [p for i in range(len(geo.chunks)) for p in chunk_pieces(geo, i, offsets)]


def local_cu_seqlens(sp, cu_seqlens) -> torch.Tensor:
    """int32 offsets of the pieces of this rank's shard (document and chunk boundaries):
    the ``cu_seqlens`` to pass to a single-device op that should treat every piece as its
    own sequence (e.g. to process a shard without SP)."""
    pieces = shard_documents(sp, cu_seqlens)
    offs = [p.local for p in pieces] + [pieces[-1].local + pieces[-1].end - pieces[-1].start]
    return torch.tensor(offs, dtype=torch.int32, device=cu_seqlens.device)
