"""``SequenceParallel``: the process group, strategy and layout every SP op reads, and
the byte-counting communication primitives they share."""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from ..ops._validate import fail
from ._geometry import LAYOUTS, Geometry
from ._util import DTYPES
from .attention import sp_softmax_attn
from .conv import sp_long_conv, sp_short_conv
from .linear import sp_linear

LINEAR_STRATEGIES = ("scan", "allgather")
ATTN_STRATEGIES = ("ring", "alltoall", "allgather")
_SHAPE_SLOTS = 12


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
             "environment for it) and pass the SP group, or None for the default group",
             "torch.distributed not initialized")
    return dist.group.WORLD if group is None else group


class SequenceParallel:
    """Sequence parallelism over a process group; pass it as ``sp=`` to any op.

    Each rank passes its own shard of every (B, T, ...) input: with ``layout=
    'contiguous'`` rank r holds tokens ``[r T/P, (r+1) T/P)``; with ``'zigzag'`` the
    sequence is cut into 2P chunks and rank r holds chunks r and 2P-1-r, concatenated
    (balances causal attention). Use :func:`seqpar.parallel.shard` to split a batch.

    Args:
        group: a ``torch.distributed`` ProcessGroup, a 1-D DeviceMesh, or None for the
            default group (torch.distributed must be initialized).
        strategy: shorthand that sets the field it names: ``'scan'`` sets
            ``linear_strategy``; ``'ring'`` / ``'alltoall'`` set ``attn_strategy``;
            ``'allgather'`` sets both. None keeps the defaults.
        layout: ``'contiguous'`` or ``'zigzag'``; one layout for every op of a model
            (the shards are the same tensors for every layer).
        linear_strategy: the linear family's state exchange: ``'scan'`` (default; a
            pipelined ring passing each rank exactly its incoming state, ZeCO's
            All-Scan) or ``'allgather'`` (one all-gather of every rank's (M, C), each
            rank folds its prefix; LASP-2). Both send O(H K V) per rank, independent of T.
        attn_strategy: softmax attention's: ``'ring'`` (KV blocks circulate; default
            with zigzag), ``'allgather'`` (all-gather KV; default with contiguous) or
            ``'alltoall'`` (Ulysses; needs the head counts divisible by P).
        pieces: the ``'scan'`` strategy splits each state into this many pieces along V
            so that sending one piece overlaps folding the next.
        check_shapes: every call all-gathers a dozen int64s describing each rank's
            shard and whether its arguments passed the local checks (one small
            collective per call, about 100 bytes per rank, counted as
            ``'shape_check'``), and raises on every rank on a mismatch or a bad argument
            anywhere instead of hanging or computing garbage. Turn off once a setup is
            known good; local checks still run.

    Short convolutions always exchange halos; long convolutions always reshard by
    all-to-all. ``bytes_sent`` counts every byte this rank sends (forward and backward),
    ``bytes_by_op`` splits it by op; ``reset_bytes()`` zeroes both. As with any
    collective inside autograd, every rank must backpropagate through the outputs of
    every SP call.
    """

    def __init__(self, group=None, strategy: str | None = None, layout: str = "contiguous", *,
                 linear_strategy: str | None = None, attn_strategy: str | None = None,
                 pieces: int = 4, check_shapes: bool = True):
        self.group = _resolve_group(group)
        if layout not in LAYOUTS:
            fail("layout", "'contiguous' or 'zigzag'", repr(layout))
        self.layout = layout
        lin, att = linear_strategy, attn_strategy
        if strategy is not None:
            if strategy not in LINEAR_STRATEGIES + ATTN_STRATEGIES:
                fail("strategy", "one of 'scan', 'allgather', 'ring', 'alltoall'", repr(strategy))
            for field, value, allowed in (("linear_strategy", lin, LINEAR_STRATEGIES),
                                          ("attn_strategy", att, ATTN_STRATEGIES)):
                if strategy in allowed and value is not None and value != strategy:
                    fail(field, f"{strategy!r} or None together with strategy={strategy!r}", repr(value))
            lin = strategy if strategy in LINEAR_STRATEGIES and lin is None else lin
            att = strategy if strategy in ATTN_STRATEGIES and att is None else att
        lin = "scan" if lin is None else lin
        att = ("ring" if layout == "zigzag" else "allgather") if att is None else att
        if lin not in LINEAR_STRATEGIES:
            fail("linear_strategy", "'scan' or 'allgather'", repr(lin))
        if att not in ATTN_STRATEGIES:
            fail("attn_strategy", "'ring', 'alltoall' or 'allgather'", repr(att))
        if not isinstance(pieces, int) or isinstance(pieces, bool) or pieces < 1:
            fail("pieces", "a positive int", repr(pieces))
        self.strategy = strategy
        self.linear_strategy, self.attn_strategy = lin, att
        self.pieces = pieces
        self.check_shapes = bool(check_shapes)
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.bytes_by_op: dict[str, int] = defaultdict(int)

    def __repr__(self) -> str:
        return (f"SequenceParallel(world={self.world}, rank={self.rank}, layout={self.layout!r}, "
                f"linear_strategy={self.linear_strategy!r}, attn_strategy={self.attn_strategy!r})")

    # ---- traffic ----
    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent since construction or the last :meth:`reset_bytes`."""
        return sum(self.bytes_by_op.values())

    def reset_bytes(self) -> None:
        self.bytes_by_op.clear()

    def _count(self, op: str, *tensors: torch.Tensor) -> None:
        self.bytes_by_op[op] += sum(t.numel() * t.element_size() for t in tensors)

    # ---- primitives (peers are ranks of this group) ----
    def _isend(self, t: torch.Tensor, peer: int, tag: int, op: str):
        self._count(op, t)
        return dist.isend(t.contiguous(), group=self.group, group_dst=peer, tag=tag)

    def _irecv(self, t: torch.Tensor, peer: int, tag: int):
        return dist.irecv(t, group=self.group, group_src=peer, tag=tag)

    def _exchange(self, sends: list, recvs: list, op: str) -> list:
        """Post ``sends`` and ``recvs`` ((tensor, peer, tag) each) as one batch; returns
        the requests. NCCL runs unbatched sends and receives one after another, so a ring
        step where each rank sends before it receives waits forever (two ranks that send
        to each other first); batched, they progress together."""
        self._count(op, *(t for t, _, _ in sends))
        ops = [dist.P2POp(dist.isend, t.contiguous(), group=self.group, group_peer=peer, tag=tag)
               for t, peer, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=peer, tag=tag)
                for t, peer, tag in recvs]
        return dist.batch_isend_irecv(ops)

    def _all_gather(self, t: torch.Tensor, op: str) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape everywhere), in rank order."""
        t = t.contiguous()
        self._count(op, *[t] * (self.world - 1))
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return out

    def _all_to_all(self, parts: list[torch.Tensor], shapes: list, op: str) -> list[torch.Tensor]:
        """Send ``parts[j]`` to rank j; receive a tensor of ``shapes[j]`` from each rank j."""
        parts = [p.contiguous() for p in parts]
        self._count(op, *[p for j, p in enumerate(parts) if j != self.rank])
        out = [parts[0].new_empty(s) for s in shapes]
        dist.all_to_all(out, parts, group=self.group)
        return out

    def _reduce_scatter(self, parts: list[torch.Tensor], op: str) -> torch.Tensor:
        """Sum over ranks of every rank's ``parts[self.rank]``."""
        parts = [p.contiguous() for p in parts]
        self._count(op, *[p for j, p in enumerate(parts) if j != self.rank])
        out = torch.empty_like(parts[self.rank])
        dist.reduce_scatter(out, parts, group=self.group)
        return out

    # ---- checks ----
    def _agree(self, name: str, desc: dict, validate):
        """Run ``validate()`` (local checks that raise ValueError) and make every rank of the
        group agree before any exchange, so that a bad call raises on every rank instead
        of leaving the others waiting: ``desc`` (label -> int: shapes, dtypes, options of
        the call) must match across ranks, and no rank's checks may have failed. Returns
        ``validate()``'s result. With ``check_shapes=False`` only the local checks run.
        """
        err, result = None, None
        try:
            result = validate()
        except ValueError as e:
            err = e
        if self.check_shapes and self.world > 1:
            keys = list(desc)
            if len(keys) >= _SHAPE_SLOTS:
                raise AssertionError("shape descriptor too long")
            t = torch.full((_SHAPE_SLOTS,), -1, dtype=torch.int64)
            t[:len(keys) + 1] = torch.tensor([int(desc[k]) for k in keys] + [int(err is not None)])
            if dist.get_backend(self.group) == "nccl":
                t = t.cuda()
            got = [x.tolist() for x in self._all_gather(t, "shape_check")]
            differ = [i for i in range(len(keys)) if any(g[i] != got[0][i] for g in got)]
            if differ:
                def show(k, v):
                    return f"{k}={DTYPES[v] if k.endswith('dtype') and v >= 0 else v}"
                fail(name, "the same shard shapes, dtypes and options on every rank of the SP "
                     "group (each rank passes its own T/P tokens of the same batch, the same "
                     "global cu_seqlens and the same initial state)",
                     "; ".join(f"rank {r}: " + ", ".join(show(keys[i], g[i]) for i in differ)
                               for r, g in enumerate(got)))
            if err is None and any(g[len(keys)] for g in got):
                bad = [r for r, g in enumerate(got) if g[len(keys)]]
                fail(name, "arguments that every rank of the SP group accepts",
                     f"a ValueError on rank(s) {bad} (see the error there)")
        if err is not None:
            raise err
        return result

    def geometry(self, local_len: int, name: str = "q") -> Geometry:
        """The chunking of a shard of ``local_len`` tokens under this object's layout."""
        return Geometry.of(self.world, self.rank, self.layout, local_len, name)

    # ---- hooks called by seqpar.ops ----
    def linear(self, kind, q, k, v, g, beta, *, scale, initial_state, output_final_state,
               cu_seqlens, chunk_size, backend):
        """Linear-family hook of :mod:`seqpar.ops` (see :mod:`seqpar.parallel.linear`)."""
        return sp_linear(self, kind, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                         chunk_size=chunk_size, backend=backend)

    def softmax_attn(self, q, k, v, *, causal, scale, cu_seqlens):
        """Softmax-attention hook of :mod:`seqpar.ops` (see :mod:`seqpar.parallel.attention`)."""
        return sp_softmax_attn(self, q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens)

    def short_conv(self, x, weight, bias, *, activation, initial_state, output_final_state,
                   cu_seqlens):
        """Short-convolution hook of :mod:`seqpar.ops` (see :mod:`seqpar.parallel.conv`)."""
        return sp_short_conv(self, x, weight, bias, activation=activation,
                             initial_state=initial_state, output_final_state=output_final_state,
                             cu_seqlens=cu_seqlens)

    def long_conv(self, x, kernel, *, cu_seqlens):
        """Long-convolution hook of :mod:`seqpar.ops` (see :mod:`seqpar.parallel.conv`)."""
        return sp_long_conv(self, x, kernel, cu_seqlens=cu_seqlens)
