"""``SequenceParallel``: the communicator, strategy and layout every SP op reads."""
from __future__ import annotations

from ..ops.validate import fail
from ._geometry import LAYOUTS, Geometry
from ._util import DTYPES
from .attention import sp_softmax_attn
from .comm import Communicator
from .conv import sp_long_conv, sp_short_conv
from .linear import sp_linear

LINEAR_STRATEGIES = ("scan", "allgather")
ATTN_STRATEGIES = ("ring", "alltoall", "allgather")
_AGREED_CACHE = 1024


class SequenceParallel:
    """Sequence parallelism over a process group; pass it as ``sp=`` to any op.

    Each rank passes its own shard of every (B, T, ...) input: with ``layout=
    'contiguous'`` rank r holds tokens ``[r T/P, (r+1) T/P)``; with ``'zigzag'`` the
    sequence is cut into 2P chunks and rank r holds chunks r and 2P-1-r, concatenated
    (balances causal attention). Use :func:`seqpar.parallel.shard` to split a batch.

    Args:
        group: a ``torch.distributed`` ProcessGroup, a 1-D DeviceMesh, or None for the
            default group (torch.distributed must be initialized). Ignored with ``comm``.
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
        pieces: the ``'scan'`` strategy can split each state into this many pieces along
            V so that sending one piece overlaps folding the next; a state is O(H K V)
            bytes, a few microseconds on NVLink, so the default sends it whole.
        check_shapes: the first call with a new combination of shapes, dtypes and
            options all-gathers a dozen int64s describing each rank's shard and whether
            its arguments passed the local checks (counted as ``'shape_check'``), and
            raises on every rank on a mismatch or a bad argument anywhere instead of
            hanging or computing garbage (see :meth:`agree`). Local checks always run.
        comm: the :class:`~seqpar.parallel.comm.Communicator` to run on; default, one
            over ``group``. ``LocalCommunicator(world, rank)`` simulates one rank on a
            single device with communication stubbed out (for timing its compute).

    Short convolutions always exchange halos; long convolutions always reshard by
    all-to-all. ``bytes_sent`` counts every byte this rank sends (forward and backward),
    ``bytes_by_op`` splits it by op; ``reset_bytes()`` zeroes both. As with any
    collective inside autograd, every rank must backpropagate through the outputs of
    every SP call.
    """

    def __init__(self, group=None, strategy: str | None = None, layout: str = "contiguous", *,
                 linear_strategy: str | None = None, attn_strategy: str | None = None,
                 pieces: int = 1, check_shapes: bool = True, comm: Communicator | None = None):
        if comm is not None and not isinstance(comm, Communicator):
            fail("comm", "a seqpar.parallel.Communicator (or None)", type(comm).__name__)
        self.comm = Communicator(group) if comm is None else comm
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
        self.group = self.comm.group
        self.rank, self.world = self.comm.rank, self.comm.world
        self._agreed: set = set()

    def __repr__(self) -> str:
        return (f"SequenceParallel(world={self.world}, rank={self.rank}, layout={self.layout!r}, "
                f"linear_strategy={self.linear_strategy!r}, attn_strategy={self.attn_strategy!r})")

    # ---- traffic ----
    @property
    def bytes_sent(self) -> int:
        """Bytes this rank has sent since construction or the last :meth:`reset_bytes`."""
        return self.comm.bytes_sent

    @property
    def bytes_by_op(self) -> dict[str, int]:
        """Bytes this rank has sent, by op label."""
        return self.comm.bytes_by_op

    def reset_bytes(self) -> None:
        self.comm.reset_bytes()

    # ---- checks ----
    def agree(self, name: str, desc: dict, validate):
        """Run ``validate()`` (local checks that raise ValueError) and make every rank of the
        group agree before any exchange, so that a bad call raises on every rank instead
        of leaving the others waiting: ``desc`` (label -> int: shapes, dtypes, options of
        the call, a digest of ``cu_seqlens``) must match across ranks, and no rank's checks
        may have failed. Returns ``validate()``'s result.

        The collective (a dozen int64s per rank, one host sync) runs once per new ``desc``:
        a descriptor every rank has already agreed on is accepted from the cache, so a
        training step makes no agreement traffic after its first. With
        ``check_shapes=False`` only the local checks run.
        """
        err, result = None, None
        try:
            result = validate()
        except ValueError as e:
            err = e
        key = (name, *desc.items())
        if self.check_shapes and self.world > 1 and key not in self._agreed:
            keys = list(desc)
            got = self.comm.gather_ints([int(desc[k]) for k in keys] + [int(err is not None)])
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
            if err is None:
                if len(self._agreed) >= _AGREED_CACHE:
                    self._agreed.clear()
                self._agreed.add(key)
        if err is not None:
            raise err
        return result

    def geometry(self, local_len: int, name: str = "q") -> Geometry:
        """The chunking of a shard of ``local_len`` tokens under this object's layout."""
        return Geometry.of(self.world, self.rank, self.layout, local_len, name)

    # ---- hooks called by seqpar.ops ----
    def linear(self, engine, xs, *, scale, initial_state, output_final_state, cu_seqlens,
               chunk_size, backend):
        """Linear-family hook of :mod:`seqpar.ops` (see :mod:`seqpar.parallel.linear`)."""
        return sp_linear(self, engine, xs, scale=scale, initial_state=initial_state,
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
