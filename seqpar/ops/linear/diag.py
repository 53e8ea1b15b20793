"""The diagonal engine: ``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``
with ``g`` absent (linear attention), one log decay per head (simple GLA, retention) or
one per key channel (GLA).

Here: the float64 token step and reference, and :data:`DIAG`, the engine: the chunkwise
PyTorch path (:mod:`.chunk_diag`) and the Triton kernels (:mod:`.triton_diag` for no
gate or a head gate, :mod:`.triton_gla` for a key gate) on one device and under
sequence parallelism. A transition is ``exp`` of the summed gates: (N, H, 1, 1) or
(N, H, K, 1).
"""
from __future__ import annotations

import torch

from ..validate import check_scale, check_step_state
from ._family import chunked_documents, pick_backend, reference_scan
from .chunk_diag import chunk_diag, chunk_diag_terms
from .engine import ChunkPass, LinearEngine, Sequences, StatePass, scale_state, segments


def diag_step(q, k, v, g, state, scale):
    """One token of any diagonal-transition mixer, computed in the state's dtype.

    q, k: (B, H, K); v: (B, H, V); g: None, (B, H, 1) or (B, H, K) log decay;
    state: (B, H, K, V). Returns o (B, H, V) in v's dtype and the new state.
    """
    check_step_state(state, q, v)
    out_dtype = v.dtype
    q, k, v = (x.to(state.dtype) for x in (q, k, v))
    if g is not None:
        state = state * g.to(state.dtype).exp()[..., None]
    state = state + k[..., :, None] * v[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, state)
    return o.to(out_dtype), state


def diag_reference(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens):
    """Float64 token loop for the diagonal family; g None, (B, T, H, 1) or (B, T, H, K)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = check_scale(scale, K)
    offsets = None if cu_seqlens is None else cu_seqlens.tolist()

    def step(x, S):
        qt, kt, vt, gt = x
        return diag_step(qt, kt, vt, gt, S, scale)

    return reference_scan(step, (q, k, v, g), initial_state,
                          lambda n: torch.zeros(n, H, K, V, dtype=torch.float64, device=q.device),
                          output_final_state, offsets)


class DiagEngine(LinearEngine):
    name = "diag"
    inputs = ("q", "k", "v", "g")

    def transition_shape(self, xs):
        g = xs[3]
        return (xs[0].shape[-1], 1) if g is not None and g.dim() == 4 else (1, 1)

    def run(self, xs, *, scale, initial_state, output_final_state, offsets, chunk_size, backend):
        """q, k: (B, T, H, K); v: (B, T, H, V); g: None, (B, T, H) or (B, T, H, K) float32;
        initial_state: (N, H, K, V) float32 or None (N = B, or documents when packed).
        Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V) float32 or None.
        """
        q, k, v, g = xs
        if pick_backend(backend, q) == "triton":
            from .triton_diag import triton_diag
            from .triton_gla import triton_gla

            fn = triton_gla if g is not None and g.dim() == 4 else triton_diag
            return fn(q, k, v, g, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, offsets=offsets)

        if offsets is None:
            return chunk_diag(*xs, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, chunk_size=chunk_size)
        return chunked_documents(lambda part, c: chunk_diag_terms(*part, scale=scale, chunk_size=c),
                                 offsets, xs, initial_state, output_final_state, chunk_size)

    def begin(self, xs, seqs, *, scale, chunk_size, backend):
        if pick_backend(backend, xs[0]) == "triton":
            return _TritonDiagPass(xs, seqs, scale)
        return ChunkPass(xs, seqs, lambda part: chunk_diag_terms(*part, scale=scale,
                                                                 chunk_size=chunk_size))


class _TritonDiagPass(StatePass):
    """The Triton kernels on the packed stream of a shard's sequences; the state-only
    passes run segment by segment (:class:`~.engine.Segments`). The gates' per-chunk
    cumulative sums are computed once and serve every step: the segments start at
    chunk boundaries of the sequences, so their chunks are the sequences' chunks."""

    def __init__(self, xs, seqs: Sequences, scale: float):
        from .triton_common import as_packed
        from .triton_diag import diag_cumsum
        from .triton_gla import gla_cumsum

        q, k, v, g = xs
        self.shape, self.seqs, self.scale = v.shape, seqs, scale
        self.q, self.k, self.v, self.g = (as_packed(x) for x in xs)
        self.key_gate = g is not None and g.dim() == 4
        self.offsets = seqs.offsets
        self.seg = segments(tuple(self.offsets), q.device)
        self.gc = None
        if g is not None:
            self.gc = (gla_cumsum if self.key_gate else diag_cumsum)(self.g, self.offsets)
        self._decays = None
        self._saved = None

    def decays(self):
        if self._decays is None and self.gc is not None:
            self._decays = self.seg.decays(self.gc)
        return self._decays

    def final(self, h0):
        from .triton_diag import diag_final_states
        from .triton_gla import gla_final_states

        fn = gla_final_states if self.key_gate else diag_final_states
        if not self.seg.split:
            return fn(self.k, self.v, self.gc, h0, self.offsets)
        parts = fn(self.k, self.v, self.gc, None, self.seg.offsets)
        _, after, total = self.decays() or (None, None, None)
        out = self.seg.combine(parts, after)
        return out if h0 is None else out + scale_state(h0, total)

    def transition(self):
        N, H = self.seqs.count, self.q.shape[2]
        if self.g is None:
            return self.q.new_ones(N, H, 1, 1, dtype=torch.float32)
        total = self.decays()[2]
        return total.exp()[..., None, None] if total.dim() == 2 else total.exp()[..., None]

    def finish(self, h0):
        from .triton_diag import diag_forward
        from .triton_gla import gla_forward

        if self.key_gate:
            o, ht, *self._saved = gla_forward(self.q, self.k, self.v, self.g, h0, self.scale,
                                             self.offsets, gc=self.gc)
        else:
            o, ht = diag_forward(self.q, self.k, self.v, self.g, h0, self.scale, self.offsets,
                                 gc=self.gc)
        self.h0 = h0
        return o.reshape(self.shape), ht

    def initial_grads(self, do, dht):
        from .triton_common import as_packed
        from .triton_diag import diag_initial_grads
        from .triton_gla import gla_initial_grads

        fn = gla_initial_grads if self.key_gate else diag_initial_grads
        do = as_packed(do)
        if not self.seg.split:
            return fn(self.q, do, self.gc, dht, self.scale, self.offsets)
        parts = fn(self.q, do, self.gc, None, self.scale, self.seg.offsets)
        before, _, total = self.decays() or (None, None, None)
        out = self.seg.combine(parts, before)
        return out if dht is None else out + scale_state(dht, total)

    def backward(self, do, dht):
        from .triton_common import as_packed
        from .triton_diag import diag_backward
        from .triton_gla import gla_backward

        do = as_packed(do)
        if self.key_gate:
            gc, A, h = self._saved
            dq, dk, dv, dg, dh0 = gla_backward(self.q, self.k, self.v, gc, A, h, self.h0, do,
                                               dht, self.scale, self.offsets)
        else:
            dq, dk, dv, dg, dh0 = diag_backward(self.q, self.k, self.v, self.g, self.h0, do, dht,
                                                self.scale, self.offsets, gc=self.gc)
        B, T = self.shape[:2]
        dxs = tuple(None if x is None else x.reshape(B, T, *x.shape[2:]) for x in (dq, dk, dv, dg))
        return dxs, dh0


DIAG = DiagEngine()
