"""All-to-all between sequence shards and channel (or head) shards, differentiable.

``seq_to_channels``: every rank holds all T/P tokens of all channels -> every rank holds
all T tokens (in global order, whatever the layout) of channels ``[r C/P, (r+1) C/P)``.
``channels_to_seq`` is its inverse, and each one's backward is the other.
"""
from __future__ import annotations

import functools

import torch

from ..ops.linear.engine import to_device
from ._geometry import Geometry


@functools.lru_cache(maxsize=64)
def _orders(geo: Geometry, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(global position of each row of the rank-order concatenation of all shards, its
    inverse) on ``device``, built once per geometry; None where rank order is global
    order (the contiguous layout)."""
    order = [t for r in range(geo.world) for t in geo.global_positions(r)]
    if order == list(range(len(order))):
        return None
    inverse = [0] * len(order)
    for i, t in enumerate(order):
        inverse[t] = i
    return to_device(order, torch.long, device), to_device(inverse, torch.long, device)


def _to_channels(sp, geo: Geometry, x: torch.Tensor, dim: int, op: str) -> torch.Tensor:
    parts = list(x.chunk(sp.world, dim))
    got = sp.comm.all_to_all(parts, [parts[sp.rank].shape] * sp.world, op)
    y = torch.cat(got, 1)  # rank order
    orders = _orders(geo, x.device)
    return y if orders is None else y.index_select(1, orders[1])


def _to_seq(sp, geo: Geometry, y: torch.Tensor, dim: int, op: str) -> torch.Tensor:
    orders = _orders(geo, y.device)
    if orders is not None:
        y = y.index_select(1, orders[0])
    parts = list(y.chunk(sp.world, 1))
    got = sp.comm.all_to_all(parts, [parts[sp.rank].shape] * sp.world, op)
    return torch.cat(got, dim)


class _Reshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sp, geo, x, dim, to_channels, op):
        ctx.sp, ctx.geo, ctx.dim, ctx.to_channels, ctx.op = sp, geo, dim, to_channels, op
        return (_to_channels if to_channels else _to_seq)(sp, geo, x, dim, op)

    @staticmethod
    def backward(ctx, g):
        back = _to_seq if ctx.to_channels else _to_channels
        return None, None, back(ctx.sp, ctx.geo, g.contiguous(), ctx.dim, ctx.op + ".backward"), None, None, None


def seq_to_channels(sp, geo: Geometry, x: torch.Tensor, dim: int, op: str) -> torch.Tensor:
    """(B, T/P, ..., C, ...) shard -> (B, T, ..., C/P, ...) with C at ``dim``; C % P == 0."""
    return _Reshard.apply(sp, geo, x, dim, True, op)


def channels_to_seq(sp, geo: Geometry, y: torch.Tensor, dim: int, op: str) -> torch.Tensor:
    """Inverse of :func:`seq_to_channels`."""
    return _Reshard.apply(sp, geo, y, dim, False, op)
