"""Communicators: the collectives sequence parallelism uses, as objects with public methods.

:class:`Communicator` runs them over a ``torch.distributed`` process group and counts the
bytes each rank sends. :class:`LocalCommunicator` stands in for one rank of a group on a
single device with no process group at all: every collective returns a buffer of the
right shape and dtype at once, so the SP ops run their full local compute and nothing
else. It is how ``seqpar bench sp --simulate`` times a rank's compute alone.

Point to point there is one style only: :meth:`Communicator.send_recv` posts a list of
sends and receives as one ``batch_isend_irecv``. NCCL runs unbatched sends and receives
one after another, so two ranks that each send first would wait for each other forever;
batched, they progress together. Messages between the same pair of ranks arrive in the
order they were posted.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..ops.validate import fail


class Work:
    """Handle of posted point-to-point operations; :meth:`wait` blocks until all are done
    (and copies staged receives to their tensors)."""

    def __init__(self, requests: Sequence = (), landing: Sequence = ()):
        self._requests = list(requests)
        self._landing = list(landing)

    def wait(self) -> None:
        for r in self._requests:
            r.wait()
        for t, w in self._landing:
            t.copy_(w)
        self._requests, self._landing = [], []


class Communicator:
    """Byte-counting collectives over one process group (the SP group).

    ``rank`` and ``world`` are this process's rank in the group and the group's size;
    peers are always ranks of this group. ``bytes_by_op`` counts, per label, the bytes
    this rank has sent; :attr:`bytes_sent` sums them; :meth:`reset_bytes` zeroes them.
    """

    def __init__(self, group=None):
        self.group = _resolve_group(group)
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.bytes_by_op: dict[str, int] = defaultdict(int)
        # gloo moves host memory only: device tensors travel through host copies (several
        # processes sharing one GPU, as in the GPU tests)
        self._staged = dist.get_backend(self.group) == "gloo"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world={self.world})"

    # ---- traffic ----
    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent since construction or the last :meth:`reset_bytes`."""
        return sum(self.bytes_by_op.values())

    def reset_bytes(self) -> None:
        self.bytes_by_op.clear()

    def count(self, op: str, *tensors: torch.Tensor) -> None:
        """Add the bytes of ``tensors`` to the count of ``op``."""
        self.bytes_by_op[op] += sum(t.numel() * t.element_size() for t in tensors)

    # ---- collectives ----
    def send_recv(self, sends: Sequence[tuple[torch.Tensor, int]],
                  recvs: Sequence[tuple[torch.Tensor, int]], op: str) -> Work:
        """Post ``sends`` and ``recvs`` (``(tensor, peer)`` pairs; receives fill their
        tensors in place) as one batch; returns the handle to wait on."""
        self.count(op, *(t for t, _ in sends))
        ops = [dist.P2POp(dist.isend, self._wire(t), group=self.group, group_peer=peer)
               for t, peer in sends]
        landing = [(t, self._wire(t, recv=True)) for t, _ in recvs]
        ops += [dist.P2POp(dist.irecv, w, group=self.group, group_peer=peer)
                for (_, w), (_, peer) in zip(landing, recvs)]
        return Work(dist.batch_isend_irecv(ops) if ops else (),
                    [(t, w) for t, w in landing if w is not t])

    def all_gather(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """Every rank's ``t`` (the same shape everywhere), stacked in rank order:
        (world, *t.shape), one collective into one buffer."""
        t = t.contiguous()
        self.count(op, *[t] * (self.world - 1))
        w = self._wire(t).reshape(1, -1)
        out = w.new_empty(self.world, w.shape[1])
        _all_gather_single(out, w, group=self.group)
        return out.view(self.world, *t.shape).to(t.device)

    def all_to_all(self, parts: Sequence[torch.Tensor], shapes: Sequence, op: str) -> list[torch.Tensor]:
        """Send ``parts[j]`` to rank j; receive a tensor of ``shapes[j]`` from each rank j."""
        parts = [p.contiguous() for p in parts]
        self.count(op, *[p for j, p in enumerate(parts) if j != self.rank])
        if self._staged:
            # gloo has the single-buffer form only (torch 2.11 refuses the list form)
            sizes = [math.prod(s) for s in shapes]
            flat = self._wire(torch.cat([p.reshape(-1) for p in parts]))
            out = flat.new_empty(sum(sizes))
            dist.all_to_all_single(out, flat, sizes, [p.numel() for p in parts], group=self.group)
            return [x.view(s).to(parts[0].device) for x, s in zip(out.split(sizes), shapes)]
        out = [p.new_empty(s) for p, s in zip(parts, shapes)]
        dist.all_to_all(out, parts, group=self.group)
        return out

    def reduce_scatter(self, parts: Sequence[torch.Tensor], op: str) -> torch.Tensor:
        """The sum over ranks of every rank's ``parts[self.rank]``."""
        parts = [p.contiguous() for p in parts]
        self.count(op, *[p for j, p in enumerate(parts) if j != self.rank])
        wires = [self._wire(p) for p in parts]
        out = torch.empty_like(wires[self.rank])
        dist.reduce_scatter(out, wires, group=self.group)
        return out.to(parts[0].device)

    def _wire(self, t: torch.Tensor, recv: bool = False) -> torch.Tensor:
        """What travels for ``t``: ``t`` itself, or a host copy (a host buffer to
        receive into) where the backend moves host memory only."""
        if not (self._staged and t.is_cuda):
            return t.contiguous()
        return torch.empty(t.shape, dtype=t.dtype) if recv else t.cpu()

    def gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's list of ints (the same length everywhere), in rank order, on the
        host: a small all-gather and one host sync, for agreement checks."""
        t = torch.tensor(list(values), dtype=torch.int64)
        if not self._staged:
            t = t.cuda()
        return [x.tolist() for x in self.all_gather(t, "shape_check")]


class LocalCommunicator(Communicator):
    """Rank ``rank`` of a ``world``-rank group, simulated on one device with no process
    group: sends go nowhere, receives and gathers return buffers of the right shape and
    dtype filled with stand-in values (zeros, or this rank's own tensors), and nothing
    waits. The SP ops then run exactly the local compute of that rank. Bytes are counted
    as a real communicator would count them."""

    def __init__(self, world: int, rank: int):
        for name, value, lo in (("world", world, 1), ("rank", rank, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                fail(name, f"an int >= {lo}", repr(value))
        if rank >= world:
            fail("rank", f"a rank of the simulated group, 0 <= rank < world = {world}", rank)
        self.group = None
        self.rank, self.world = rank, world
        self.bytes_by_op = defaultdict(int)

    def send_recv(self, sends, recvs, op):
        self.count(op, *(t for t, _ in sends))
        for t, _ in recvs:
            t.zero_()
        return Work()

    def all_gather(self, t, op):
        self.count(op, *[t] * (self.world - 1))
        return t.expand(self.world, *t.shape).clone()

    def all_to_all(self, parts, shapes, op):
        self.count(op, *[p for j, p in enumerate(parts) if j != self.rank])
        mine = parts[self.rank]
        return [mine.clone() if tuple(s) == tuple(mine.shape) else mine.new_zeros(s) for s in shapes]

    def reduce_scatter(self, parts, op):
        self.count(op, *[p for j, p in enumerate(parts) if j != self.rank])
        return parts[self.rank] * self.world

    def gather_ints(self, values):
        return [list(values) for _ in range(self.world)]


# torch >= 2.13 names the gather into one flat buffer all_gather_single and deprecates
# the older all_gather_into_tensor, which earlier versions have alone
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _resolve_group(group):
    """A ProcessGroup from ``None`` (the default group), a ProcessGroup or a 1-D DeviceMesh."""
    if group is not None and hasattr(group, "get_group") and hasattr(group, "ndim"):
        if group.ndim != 1:
            fail("group", "a ProcessGroup or a 1-D DeviceMesh (pass mesh['sp'] for one dimension)",
                 f"a {group.ndim}-D DeviceMesh")
        return group.get_group()
    if not dist.is_available() or not dist.is_initialized():
        fail("group", "an initialized torch.distributed process group: call "
             "torch.distributed.init_process_group(backend) first (torchrun sets the "
             "environment for it) and pass the SP group, or None for the default group; or "
             "pass comm=LocalCommunicator(world, rank) to simulate one rank",
             "torch.distributed not initialized")
    return dist.group.WORLD if group is None else group
