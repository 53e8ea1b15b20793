"""What every engine of the linear family provides, and the sequences it runs on.

An engine runs one kind of transition (see docs/design.md): ``diag`` (a scalar or a
key-vector decay: linear attention, simple GLA / retention, GLA), ``delta`` (the WY
form: DeltaNet, Gated DeltaNet) and ``mlstm`` (a scalar decay with a normalizer state).
Each one lives in its own module with its float64 token step and reference, its
chunkwise PyTorch path and the entry points of its Triton kernels, and offers:

* :meth:`LinearEngine.run`: the single-device op (autograd through its kernels);
* :meth:`LinearEngine.begin`: a :class:`StatePass` over a shard's sequences, the four
  steps sequence parallelism needs (:mod:`seqpar.parallel.linear`).

States are float32 tensors ``(N, H, K, Vs)`` with ``Vs = V`` (mLSTM: ``V + 1``, the
normalizer as one more column); a transition ``M`` is ``(N, H, 1, 1)`` (scalar),
``(N, H, K, 1)`` (diagonal) or ``(N, H, K, K)``, acting as ``M * S`` or ``M @ S``.
"""
from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sequences:
    """The independent sequences of a local ``(B, T)`` batch.

    ``spans``: token ranges ``[a, b)`` of one row that run as separate sequences (the
    same in every row); sequence ``row * len(spans) + j`` is span j of that row. Without
    packing they are a shard's chunks (one, or two under the zigzag layout); packed
    input (``B == 1``) adds a span per document piece.
    """
    B: int
    T: int
    spans: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        return self.B * len(self.spans)

    @functools.cached_property
    def offsets(self) -> list[int]:
        """Offsets of the sequences in the packed stream ``(1, B T, ...)``."""
        out = [0]
        for r in range(self.B):
            for _, b in self.spans:
                out.append(r * self.T + b)
        return out


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list as a tensor on ``device`` without blocking the host: through pinned
    memory on CUDA (a pageable copy waits for the device's queue to drain)."""
    t = torch.tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def apply(M: torch.Tensor, S: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``M S`` (or ``M^T S``) for a transition M of any engine and states S (..., K, Vs)."""
    if M.shape[-1] == 1:
        return M * S
    return (M.transpose(-1, -2) if transpose else M) @ S


class StatePass:
    """One SP call's work on a shard's :class:`Sequences`, in the order the SP layer runs
    it (each step may keep what a later one reuses):

    1. :meth:`final` and :meth:`transition` (no autograd): each sequence's final state
       from ``h0`` and the transition ``M`` that maps an entering state to its end;
    2. :meth:`finish`: outputs and final states from the entering states ``h0``;
    3. :meth:`initial_grads` (backward): the gradient of each sequence's entering state
       from the output gradient alone (plus ``dht``);
    4. :meth:`backward`: the gradients of every input and of ``h0``.
    """

    def final(self, h0: torch.Tensor | None) -> torch.Tensor:
        """Final states (N, H, K, Vs) float32 from the entering states h0 (or zeros)."""
        raise NotImplementedError

    def transition(self) -> torch.Tensor:
        """Each sequence's transition (N, H, K or 1, K or 1) float32."""
        raise NotImplementedError

    def finish(self, h0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs (B, T, H, V) and final states (N, H, K, Vs) float32 from h0."""
        raise NotImplementedError

    def initial_grads(self, do: torch.Tensor, dht: torch.Tensor | None) -> torch.Tensor:
        """Gradients (N, H, K, Vs) float32 of the entering states given do and dht."""
        raise NotImplementedError

    def backward(self, do: torch.Tensor, dht: torch.Tensor | None) -> tuple:
        """Gradients of the inputs (in the engine's argument order; None where an input
        needs none) and of h0 (N, H, K, Vs) float32 or None."""
        raise NotImplementedError


class LinearEngine:
    """Base of the engines; see the module docstring."""

    name: str = ""
    #: names of the per-token inputs, in the order ``run`` and ``begin`` take them
    inputs: tuple[str, ...] = ()

    def state_width(self, V: int) -> int:
        """Vs: columns of the exchanged state for values of width V."""
        return V

    def transition_shape(self, xs: tuple) -> tuple[int, int]:
        """The last two dims of a transition for inputs ``xs``: (1, 1), (K, 1) or (K, K)."""
        return (1, 1)

    def run(self, xs: tuple, *, scale: float, initial_state, output_final_state: bool,
            offsets, chunk_size: int, backend: str):
        raise NotImplementedError

    def begin(self, xs: tuple, seqs: Sequences, *, scale: float, chunk_size: int,
              backend: str) -> StatePass:
        raise NotImplementedError


def _plain_saved_tensors():
    """Keep the inner graph's saved tensors as they are: under activation checkpointing
    the outer hooks would otherwise recompute the whole block while this graph's backward
    runs inside the block's own backward."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


class TorchPass(StatePass):
    """:class:`StatePass` of the chunkwise PyTorch paths: the inputs are detached into
    leaves (keeping ``requires_grad``), :meth:`finish` runs the subclass's differentiable
    ``forward(h0)`` on them and keeps the graph, and :meth:`backward` differentiates it."""

    def __init__(self, xs: tuple, seqs: Sequences):
        self.seqs = seqs
        self.leaves = tuple(None if x is None else x.detach().requires_grad_(x.requires_grad)
                            for x in xs)
        self._graph = None

    def forward(self, h0):
        raise NotImplementedError

    def finish(self, h0):
        h0_leaf = None if h0 is None else h0.detach().requires_grad_()
        with torch.enable_grad(), _plain_saved_tensors():
            o, fin = self.forward(h0_leaf)
        self._graph = (h0_leaf, o, fin)
        return o.detach(), fin.detach()

    def backward(self, do, dht):
        h0_leaf, o, fin = self._graph
        leaves = self.leaves
        wrt = [x for x in leaves if x is not None and x.requires_grad]
        if h0_leaf is not None:
            wrt.append(h0_leaf)
        outs, grads = [o], [do]
        if dht is not None:
            outs.append(fin)
            grads.append(dht)
        got = list(torch.autograd.grad(outs, wrt, grads, allow_unused=True)) if wrt else []
        dxs = tuple(got.pop(0) if x is not None and x.requires_grad else None for x in leaves)
        dh0 = got.pop(0) if h0_leaf is not None else None
        self._graph = None
        return dxs, dh0


def span_split(xs: tuple, seqs: Sequences):
    """Per span: the inputs ``x[:, a:b]`` of every row."""
    return [tuple(None if x is None else x[:, a:b] for x in xs) for a, b in seqs.spans]


class ChunkPass(TorchPass):
    """:class:`~.engine.StatePass` of a chunkwise PyTorch path: ``terms(xs_span)`` gives
    the span's :class:`~.chunk_diag.ChunkTerms`, computed once (differentiably) and shared
    by every step."""

    def __init__(self, xs: tuple, seqs: Sequences, terms):
        super().__init__(xs, seqs)
        with torch.enable_grad(), _plain_saved_tensors():
            self.terms = [terms(part) for part in span_split(self.leaves, seqs)]

    def _per_span(self, fn, *states):
        n = len(self.seqs.spans)
        out = []
        for j, t in enumerate(self.terms):
            args = [None if s is None else s.view(self.seqs.B, n, *s.shape[1:])[:, j]
                    for s in states]
            out.append(fn(t, *args))
        return out

    @staticmethod
    def _stack(parts):
        return torch.stack(parts, 1).flatten(0, 1)

    def final(self, h0):
        with torch.no_grad():
            return self._stack(self._per_span(lambda t, s: t.final(s), h0))

    def transition(self):
        with torch.no_grad():
            return self._stack(self._per_span(lambda t: t.transition()))

    def forward(self, h0):
        parts = self._per_span(lambda t, s: t.scan(s), h0)
        o = torch.cat([p[0] for p in parts], 1)
        return o, self._stack([p[1] for p in parts])

    def initial_grads(self, do, dht):
        n = len(self.seqs.spans)
        dos = [do[:, a:b] for a, b in self.seqs.spans]
        with torch.no_grad():
            out = []
            for j, t in enumerate(self.terms):
                d = None if dht is None else dht.view(self.seqs.B, n, *dht.shape[1:])[:, j]
                out.append(t.initial_grad(dos[j], d))
            return self._stack(out)



#: tokens per segment of the state-only passes (a multiple of :data:`CHUNK`)
SEGMENT = 2048

#: tokens per chunk of the Triton kernels (their ``BT``): the gate cumulative sums
#: :meth:`Segments.decays` reads restart at every chunk
CHUNK = 64


class Segments:
    """Sequences cut into segments of at most :data:`SEGMENT` tokens, for the state-only
    passes of the diagonal engines.

    A sequential state pass walks a sequence chunk by chunk with one program per
    (sequence, head, tile): at long lengths and small batches too few programs to fill
    the GPU, each waiting on its loads. Walking every segment from zero in parallel
    and combining the results by their decays gives the same final states and
    entering-state gradients with many programs in flight. The decays come from the
    kernels' own per-chunk gate sums, added up across chunks in float64 (a sum of 32K
    float32 gates keeps ~1e-11 of its size) at the segment boundaries, which are chunk
    boundaries: no pass over the gates of its own. Built once per offsets and device
    (:func:`segments`).
    """

    def __init__(self, offsets: tuple[int, ...], device: torch.device):
        bounds, counts = [offsets[0]], []
        for s, e in zip(offsets, offsets[1:]):
            cuts = list(range(s + SEGMENT, e, SEGMENT)) + [e]
            counts.append(len(cuts))
            bounds.extend(cuts)
        self.offsets = bounds
        self.split = len(bounds) > len(offsets)
        firsts = [0]
        for c in counts:
            firsts.append(firsts[-1] + c)
        seq_of = [n for n, c in enumerate(counts) for _ in range(c)]
        n_seg = len(seq_of)

        def dev(x):
            return to_device(x, torch.long, device)

        # The gate sum before boundary p is the sum of the totals of the kernels' chunks
        # (CHUNK tokens from each sequence start) that end at or before p.
        chunk_ends = [min(a + CHUNK, e) for s, e in zip(offsets, offsets[1:])
                      for a in range(s, e, CHUNK)]
        self.chunk_last = dev([e - 1 for e in chunk_ends])
        chunks_before = [bisect.bisect_right(chunk_ends, p) for p in bounds]
        # before (n_seg) | after (n_seg) | total (N) = P(hi) - P(lo), as indices into the
        # chunk sums' running total (entry j: the first j chunks)
        starts = [firsts[n] for n in seq_of]
        ends = [firsts[n + 1] for n in seq_of]
        hi = list(range(n_seg)) + ends + firsts[1:]
        lo = starts + [j + 1 for j in range(n_seg)] + firsts[:-1]
        self.hi = dev([chunks_before[b] for b in hi])
        self.lo = dev([chunks_before[b] for b in lo])
        self.n_seg = n_seg
        self.counts = tuple(counts)  # segments per sequence
        self.last = dev([f - 1 for f in firsts[1:]])  # each sequence's last segment
        # each sequence's segments in order, padded to a power of two with slot n_seg
        # (an inert segment: identity transition, nothing added) for pairwise composition
        width = 1 << (max(counts) - 1).bit_length()
        self.slots = dev([firsts[n] + j if j < c else n_seg
                          for n, c in enumerate(counts) for j in range(width)])
        self.width = width
        self.padded = n_seg != len(counts) * width  # some sequence has fewer segments

    def decays(self, gc: torch.Tensor):
        """Log decays (natural log, <= 0) from the kernels' gate cumulative sums gc
        (1, TT, H[, K]) float32 (log2 units, restarting at every chunk of CHUNK tokens
        from each sequence start): per segment the sums of the gates before it and after
        it inside its sequence (n_seg, H[, K]), and per sequence the total (N, H[, K]);
        float32."""
        totals = gc[0].index_select(0, self.chunk_last).flatten(1).double()
        running = torch.cat([totals.new_zeros(1, totals.shape[1]), totals.cumsum(0)])
        d = running.index_select(0, self.hi) - running.index_select(0, self.lo)
        d = (d * math.log(2)).float().view(-1, *gc.shape[2:])
        return d[:self.n_seg], d[self.n_seg:2 * self.n_seg], d[2 * self.n_seg:]

    def by_sequence(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """Per-segment rows x (n_seg, ...) as (N, width, ...): each sequence's segments
        in order, then ``pad`` (1, ...) (default zeros) up to the width."""
        if self.padded:
            pad = x.new_zeros(1, *x.shape[1:]) if pad is None else pad
            x = torch.cat([x, pad]).index_select(0, self.slots)
        return x.view(-1, self.width, *x.shape[1:])

    def compose(self, M: torch.Tensor, C: torch.Tensor):
        """Per sequence, the affine map of its segments in order, from each segment's
        ``S -> M S + C`` (M (n_seg, H, K, K), C (n_seg, H, K, Vs), float32): the
        sequence's M (N, H, K, K) and C (N, H, K, Vs), composed pairwise in log2 rounds.
        Also returns the rounds' left transitions, which :meth:`compose_backward` takes."""
        eye = torch.eye(M.shape[-1], device=M.device, dtype=M.dtype).expand(1, *M.shape[1:])
        M, C = self.by_sequence(M, eye), self.by_sequence(C)
        lefts = []
        while M.shape[1] > 1:
            Ma, Mb = M[:, 0::2], M[:, 1::2]
            lefts.append(Ma)
            C = Mb @ C[:, 0::2] + C[:, 1::2]
            M = Mb @ Ma
        return M[:, 0], C[:, 0], lefts

    def compose_backward(self, lefts: list, D: torch.Tensor) -> torch.Tensor:
        """The adjoint of :meth:`compose` for the entering states: per sequence
        ``D_0 + M_0^T (D_1 + M_1^T (D_2 + ...))`` (N, H, K, Vs) from each segment's
        entering-state gradient D (n_seg, H, K, Vs), the last segment's including the
        sequence's final-state gradient."""
        D = self.by_sequence(D)
        for Ma in lefts:
            D = D[:, 0::2] + Ma.transpose(-1, -2) @ D[:, 1::2]
        return D[:, 0]

    def at_ends(self, S: torch.Tensor | None) -> torch.Tensor | None:
        """Per segment: the sequence's ``S`` (N, ...) on its last segment, zeros elsewhere."""
        if S is None:
            return None
        return S.new_zeros(self.n_seg, *S.shape[1:]).index_copy_(0, self.last, S)

    def combine(self, parts: torch.Tensor, logw: torch.Tensor | None) -> torch.Tensor:
        """Per sequence, the sum of its segments' ``parts`` (n_seg, H, K, Vs), each weighted
        by ``exp(logw)`` ((n_seg, H) or (n_seg, H, K); None: unweighted)."""
        return self.by_sequence(scale_state(parts, logw)).sum(1)


@functools.lru_cache(maxsize=64)
def segments(offsets: tuple[int, ...], device: torch.device) -> Segments:
    """The cached :class:`Segments` of a packed stream's sequence offsets."""
    return Segments(offsets, device)


def scale_state(S: torch.Tensor, logw: torch.Tensor | None) -> torch.Tensor:
    """``exp(logw) * S`` for states S (N, H, K, Vs) and log weights (N, H) or (N, H, K)."""
    if logw is None:
        return S
    w = logw.exp()
    return S * (w[..., None, None] if w.dim() == 2 else w[..., None])
