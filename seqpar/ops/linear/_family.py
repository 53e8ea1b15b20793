"""Machinery shared by the linear family: the token-by-token reference driver,
packed-sequence splitting (one by one for the reference, in one batched chunkwise run
for the PyTorch path) and backend dispatch.

Every linear mixer is one affine state recurrence (docs/design.md). Two chunkwise engines
cover all six ops:

* ``diag``: diagonal transitions ``A_t = diag(exp(g_t))`` with ``g`` absent (linear
  attention), per head (simple GLA / retention; mLSTM reduces to it) or per key channel
  (GLA);
* ``delta``: ``A_t = exp(g_t) (I - beta_t k_t^T k_t)`` (DeltaNet with ``g`` absent,
  Gated DeltaNet).
"""
from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Sequence

import torch

from ..validate import fail
from .engine import to_device


def _slice_state(state, i: int, j: int):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s[i:j] for s in state)
    return state[i:j]


def _cat_states(states):
    if states[0] is None:
        return None
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts, 0) for parts in zip(*states))
    return torch.cat(states, 0)


def per_document(fn: Callable, offsets: Sequence[int] | None, xs: Sequence, initial_state,
                 output_final_state: bool):
    """Run ``fn(xs_doc, state_doc)`` on each packed document and stitch the results.

    ``xs`` are ``(B, T, ...)`` tensors (or ``None``); with ``offsets`` (``B == 1``) each
    document ``[offsets[i], offsets[i+1])`` runs as its own sequence with initial state
    row ``i``, so a boundary resets the state. ``fn`` returns ``(o, final_state)``.
    Final states of all documents are stacked along dim 0.
    """
    if offsets is None:
        return fn(xs, initial_state)
    outs, states = [], []
    for i, (s, e) in enumerate(zip(offsets, offsets[1:])):
        doc = [None if x is None else x[:, s:e] for x in xs]
        o, st = fn(doc, _slice_state(initial_state, i, i + 1))
        outs.append(o)
        states.append(st)
    return torch.cat(outs, 1), (_cat_states(states) if output_final_state else None)


class Packing:
    """Packed documents laid out for one chunkwise run (built once per offsets, chunk
    size and device: :func:`packing`).

    Each document ``i`` of length ``L_i > 0`` (``check_cu_seqlens`` rejects empty ones)
    starts a chunk and is zero-padded to ``n_i = ceil(L_i / C)`` chunks of
    ``C = min(chunk_size, max L_i)`` tokens (``chunk``), so no chunk holds two
    documents; zero padding is inert in both chunk paths. Every document's chunks form
    one chain of the affine state recurrence; the chains run side by side, step ``j``
    advancing every document with more than ``j`` chunks
    (:meth:`~.chunk_diag.ChunkTerms.scan_chains`): the graph grows with the longest
    document's chunk count, not with the number of documents.

    Attributes (index tensors on ``device``, long): ``dst`` (T,) each token's position
    in the padded stream of ``padded`` tokens; ``docs`` (N,) the documents by chunk count,
    longest first (stable); ``sizes`` how many documents each step advances;
    ``chain`` (n,) the padded stream's chunks in step order (step, then rank in ``docs``)
    and ``unchain`` (n,) its inverse; ``last`` (N,) each document's last chunk in step
    order.
    """

    def __init__(self, offsets: tuple[int, ...], chunk_size: int, device: torch.device):
        lengths = [e - s for s, e in zip(offsets, offsets[1:])]
        C = min(chunk_size, max(lengths))
        counts = [-(-L // C) for L in lengths]
        first = [0]
        for n in counts:
            first.append(first[-1] + n)
        docs = sorted(range(len(counts)), key=lambda i: -counts[i])
        sizes, left = [], len(counts)  # sizes[j]: documents of more than j chunks
        ends_at = collections.Counter(counts)
        for j in range(counts[docs[0]]):
            sizes.append(left)
            left -= ends_at[j + 1]
        step_start = [0]
        for a in sizes:
            step_start.append(step_start[-1] + a)
        chain = [first[docs[r]] + j for j, a in enumerate(sizes) for r in range(a)]
        unchain = [0] * len(chain)
        for p, c in enumerate(chain):
            unchain[c] = p
        rank = {i: r for r, i in enumerate(docs)}
        last = [step_start[counts[i] - 1] + rank[i] for i in range(len(counts))]
        self.chunk, self.padded, self.sizes = C, first[-1] * C, tuple(sizes)

        def dev(x):
            return to_device(x, torch.long, device)

        self.docs, self.chain, self.unchain, self.last = (
            dev(x) for x in (docs, chain, unchain, last))
        # token t of document i moves by first[i] * C - offsets[i]: built on the device
        # from per-document values, not from a host list per token
        shift = dev([f * C - s for f, s in zip(first[:-1], offsets)])
        self.dst = torch.arange(offsets[-1], device=device) + torch.repeat_interleave(
            shift, dev(lengths), output_size=offsets[-1])

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """A packed (1, T, ...) tensor in the padded layout (1, padded, ...), zeros between
        documents (differentiable)."""
        out = x.new_zeros(1, self.padded, *x.shape[2:])
        return out.index_copy(1, self.dst, x)


@functools.lru_cache(maxsize=64)
def packing(offsets: tuple[int, ...], chunk_size: int, device: torch.device) -> Packing:
    """The cached :class:`Packing` of a packed stream's document offsets."""
    return Packing(offsets, chunk_size, device)


def chunked_documents(terms: Callable, offsets: Sequence[int], xs: Sequence, initial_state,
                      output_final_state: bool, chunk_size: int):
    """Packed documents in one chunkwise run, without a loop over documents.

    ``xs`` are ``(1, T, ...)`` tensors (or ``None``) holding documents ``[offsets[i],
    offsets[i+1])``; ``terms(xs_padded, C)`` gives the :class:`~.chunk_diag.ChunkTerms`
    of a one-row stream with chunk size C; ``initial_state`` (N, H, K, V) or None.
    Returns o (1, T, H, V) in the terms' dtype and the final states (N, H, K, V)
    float32, or None.
    """
    plan = packing(tuple(offsets), chunk_size, xs[0].device)
    t = terms([None if x is None else plan.pad(x) for x in xs], plan.chunk)
    h0 = None if initial_state is None else initial_state.float().index_select(0, plan.docs)
    o, ends = t.scan_chains(h0, plan.sizes, plan.chain, plan.unchain)
    o = o.index_select(1, plan.dst)
    return o, (ends.index_select(0, plan.last) if output_final_state else None)


def reference_scan(step: Callable, xs: Sequence, initial_state, zero_state: Callable,
                   output_final_state: bool, offsets: Sequence[int] | None):
    """Token-by-token float64 reference.

    ``step(x_t, state) -> (o_t, state)`` is the op's one-token recurrent step with
    ``x_t`` the ``(B, H, ...)`` slices of ``xs`` at time t; ``zero_state(B)`` builds a
    zero state. Everything runs in float64; the output is float64.
    """
    def up(x):
        if x is None:
            return None
        if isinstance(x, tuple):
            return tuple(t.to(torch.float64) for t in x)
        return x.to(torch.float64)

    def run(doc, state):
        B, T = doc[0].shape[:2]
        state = zero_state(B) if state is None else up(state)
        outs = []
        for t in range(T):
            o, state = step([None if x is None else up(x[:, t]) for x in doc], state)
            outs.append(o)
        return torch.stack(outs, 1), state

    o, s = per_document(run, offsets, xs, initial_state, True)
    return o, (s if output_final_state else None)


def pick_backend(backend: str, x: torch.Tensor) -> str:
    """Resolve ``'auto'``: the Triton kernels on CUDA, the PyTorch chunk path elsewhere."""
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton" and not (x.is_cuda or _interpreting()):
        fail("backend", "'triton' only for CUDA tensors (or with TRITON_INTERPRET=1 on CPU)",
             f"tensors on {x.device}")
    return backend


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
