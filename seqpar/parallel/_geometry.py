"""Where each rank's tokens sit in the global sequence.

The global sequence of length ``T`` is cut into equal chunks: ``P`` chunks for the
``'contiguous'`` layout (rank r holds chunk r), ``2P`` for ``'zigzag'`` (rank r holds
chunks r and 2P-1-r, concatenated in that order, which balances a causal mask). A rank's
shard is therefore one or two chunks; every SP mixer works chunk by chunk in global order.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ops.validate import fail

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Geometry:
    """Chunking of a sequence whose shards have ``local_len`` tokens on each of ``world`` ranks.

    ``chunk_len`` tokens per chunk, ``n_chunks`` chunks; global token ``t`` lies in chunk
    ``t // chunk_len``.
    """
    world: int
    rank: int
    layout: str
    local_len: int

    @staticmethod
    def of(world: int, rank: int, layout: str, local_len: int, name: str = "q") -> Geometry:
        """Validated geometry; ``name`` is the argument named in errors."""
        if layout == "zigzag" and local_len % 2:
            fail(name, "an even shard length with the zigzag layout (global T divisible by 2 P = "
                 f"{2 * world}; rank r holds chunks r and {2 * world - 1}-r)",
                 f"shard length {local_len}")
        return Geometry(world, rank, layout, local_len)

    @property
    def per_rank(self) -> int:
        return 2 if self.layout == "zigzag" else 1

    @property
    def n_chunks(self) -> int:
        return self.world * self.per_rank

    @property
    def chunk_len(self) -> int:
        return self.local_len // self.per_rank

    @property
    def total(self) -> int:
        return self.local_len * self.world

    def owner(self, c: int) -> int:
        """Rank holding global chunk ``c``."""
        return c if c < self.world else self.n_chunks - 1 - c

    def chunks_of(self, rank: int) -> tuple[int, ...]:
        """Global chunk indices of ``rank``'s shard, in shard order (= global order)."""
        if self.layout == "zigzag":
            return (rank, self.n_chunks - 1 - rank)
        return (rank,)

    @property
    def chunks(self) -> tuple[int, ...]:
        return self.chunks_of(self.rank)

    def span(self, c: int) -> tuple[int, int]:
        """Global token range ``[start, end)`` of chunk ``c``."""
        return c * self.chunk_len, (c + 1) * self.chunk_len

    def local_span(self, i: int) -> tuple[int, int]:
        """Range of this rank's ``i``-th chunk inside its shard."""
        return i * self.chunk_len, (i + 1) * self.chunk_len

    def global_positions(self, rank: int | None = None) -> list[int]:
        """Global index of each token of ``rank``'s shard (default: this rank)."""
        out: list[int] = []
        for c in self.chunks_of(self.rank if rank is None else rank):
            a, b = self.span(c)
            out.extend(range(a, b))
        return out


@dataclass(frozen=True)
class Piece:
    """A run of one chunk's tokens that belongs to one sequence (a packed document, or
    a batch row when not packed).

    ``start``/``end``: global token range; ``local``: its start inside the shard;
    ``doc``: document index (``None`` when not packed); ``head``: it continues a
    sequence that began before the chunk (its state comes from the previous chunk);
    ``ends``: the sequence's last token is in this piece.
    """
    start: int
    end: int
    local: int
    doc: int | None
    head: bool
    ends: bool


def chunk_pieces(geo: Geometry, i: int, offsets: list[int] | None) -> list[Piece]:
    """Split this rank's ``i``-th chunk at document starts (``offsets``: global
    ``cu_seqlens`` as a list, or ``None``: one unpacked sequence per batch row)."""
    c = geo.chunks[i]
    a, b = geo.span(c)
    la = geo.local_span(i)[0]
    if offsets is None:
        return [Piece(a, b, la, None, a > 0, b == geo.total)]
    pieces = []
    for d, (s, e) in enumerate(zip(offsets, offsets[1:])):
        lo, hi = max(s, a), min(e, b)
        if lo < hi:
            pieces.append(Piece(lo, hi, la + lo - a, d, s < a, e <= b))
    return pieces
