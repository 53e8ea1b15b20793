"""The delta engine: ``S_t = exp(g_t) (S_{t-1} - beta_t k_t^T k_t S_{t-1}) + beta_t k_t^T v_t``,
``o_t = scale q_t S_t`` (DeltaNet with ``g`` absent, Gated DeltaNet).

Here: the float64 token step and reference, and :data:`DELTA`, the engine: the WY
chunkwise PyTorch path (:mod:`.chunk_delta`) and the Triton kernels
(:mod:`.triton_delta`) on one device and under sequence parallelism. A transition is a
K x K matrix per sequence and head, computed by the Triton state-only pass from the WY
factors (:func:`.triton_delta.delta_chain`).
"""
from __future__ import annotations

import torch

from ..validate import check_scale, check_step_state
from ._family import chunked_documents, pick_backend, reference_scan
from .chunk_delta import chunk_delta, chunk_delta_terms
from .engine import ChunkPass, LinearEngine, Sequences, StatePass, apply, segments


def delta_step(q, k, v, g, beta, state, scale):
    """One token of the (gated) delta rule, computed in the state's dtype.

    q, k: (B, H, K); v: (B, H, V); g: (B, H) log decay or None; beta: (B, H);
    state: (B, H, K, V). Returns o (B, H, V) in v's dtype and the new state.
    """
    check_step_state(state, q, v)
    out_dtype = v.dtype
    q, k, v, beta = (x.to(state.dtype) for x in (q, k, v, beta))
    if g is not None:
        state = state * g.to(state.dtype).exp()[..., None, None]
    pred = torch.einsum("bhk,bhkv->bhv", k, state)
    state = state + k[..., :, None] * (beta[..., None] * (v - pred))[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, state)
    return o.to(out_dtype), state


def delta_reference(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens):
    """Float64 token loop for the delta family (g None for DeltaNet)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = check_scale(scale, K)
    offsets = None if cu_seqlens is None else cu_seqlens.tolist()

    def step(x, S):
        qt, kt, vt, gt, bt = x
        return delta_step(qt, kt, vt, gt, bt, S, scale)

    return reference_scan(step, (q, k, v, g, beta), initial_state,
                          lambda n: torch.zeros(n, H, K, V, dtype=torch.float64, device=q.device),
                          output_final_state, offsets)


class DeltaEngine(LinearEngine):
    name = "delta"
    inputs = ("q", "k", "v", "g", "beta")

    def transition_shape(self, xs):
        return (xs[0].shape[-1], xs[0].shape[-1])

    def run(self, xs, *, scale, initial_state, output_final_state, offsets, chunk_size, backend):
        """q, k: (B, T, H, K); v: (B, T, H, V); g: None or (B, T, H) float32; beta:
        (B, T, H); initial_state: (N, H, K, V) float32 or None. Returns o (B, T, H, V) in
        v's dtype and the final state (N, H, K, V) float32 or None."""
        if pick_backend(backend, xs[0]) == "triton":
            from .triton_delta import triton_delta

            return triton_delta(*xs, scale=scale, initial_state=initial_state,
                                output_final_state=output_final_state, offsets=offsets)

        if offsets is None:
            return chunk_delta(*xs, scale=scale, initial_state=initial_state,
                               output_final_state=output_final_state, chunk_size=chunk_size)
        return chunked_documents(lambda part, c: chunk_delta_terms(*part, scale=scale, chunk_size=c),
                                 offsets, xs, initial_state, output_final_state, chunk_size)

    def begin(self, xs, seqs, *, scale, chunk_size, backend):
        if pick_backend(backend, xs[0]) == "triton":
            return _TritonDeltaPass(xs, seqs, scale)
        return ChunkPass(xs, seqs, lambda part: chunk_delta_terms(*part, scale=scale,
                                                                  chunk_size=chunk_size))


class _TritonDeltaPass(StatePass):
    """The Triton kernels on the packed stream of a shard's sequences: the WY factors
    once (:class:`~.triton_delta.DeltaPrep`), the state-only passes segment by segment
    (:class:`~.engine.Segments`): one launch gives every segment's final state and K x K
    transition, composed per sequence in log2 rounds; the reverse pass gives every
    segment's entering-state gradient, folded back through the same transitions. Its
    state-free part of dv' is reused by the full backward."""

    def __init__(self, xs, seqs: Sequences, scale: float):
        from ..validate import fail
        from .triton_common import as_packed
        from .triton_delta import MAX_DIM, DeltaPrep

        K, V = xs[0].shape[-1], xs[2].shape[-1]
        for name, d in (("k", K), ("v", V)):
            if d > MAX_DIM:
                fail(name, f"head dim <= {MAX_DIM} for backend='triton'", d)
        self.shape, self.seqs, self.scale = xs[2].shape, seqs, scale
        self.q, self.k, self.v, self.g, self.beta = (as_packed(x) for x in xs)
        self.offsets = seqs.offsets
        self.prep = DeltaPrep(self.k, self.v, self.g, self.beta, self.offsets)
        self.seg = segments(tuple(self.offsets), self.q.device)
        # the segments' view of the WY factors: the same chunks (SEGMENT is a multiple of
        # the chunk), grouped by segment
        self.seg_prep = self.prep.regrouped(self.seg.offsets) if self.seg.split else self.prep
        self._composed = None
        self._dvl = None

    def _compose(self):
        """Each sequence's (M, C from zero) and the composition's rounds, computed once."""
        if self._composed is None:
            from .triton_delta import delta_chain

            C, M = delta_chain(self.seg_prep, self.k, None, self.v.shape[-1])
            self._composed = self.seg.compose(M, C) if self.seg.split else (M, C, None)
        return self._composed

    def final(self, h0):
        M, C, _ = self._compose()
        return C if h0 is None else apply(M, h0) + C

    def transition(self):
        return self._compose()[0]

    def finish(self, h0):
        from .triton_delta import delta_finish

        o, ht, self.h, self.vn = delta_finish(self.q, self.k, self.v, self.prep, h0, self.scale)
        self.h0 = h0
        return o.reshape(self.shape), ht

    def initial_grads(self, do, dht):
        from .triton_common import as_packed
        from .triton_delta import delta_initial_grads

        do = as_packed(do)
        if not self.seg.split:
            dh0, self._dvl = delta_initial_grads(self.q, self.k, self.v, self.prep, do, dht,
                                                 self.scale)
            return dh0
        D, self._dvl = delta_initial_grads(self.q, self.k, self.v, self.seg_prep, do,
                                           self.seg.at_ends(dht), self.scale)
        return self.seg.compose_backward(self._compose()[2], D)

    def backward(self, do, dht):
        from .triton_common import as_packed
        from .triton_delta import delta_backward

        dq, dk, dv, dg, dbeta, dh0 = delta_backward(
            self.q, self.k, self.v, self.g, self.beta, self.prep.an, self.prep.w, self.h,
            self.vn, as_packed(do), dht, self.scale, self.offsets, gc=self.prep.gc, dvl=self._dvl)
        B, T = self.shape[:2]
        dxs = tuple(None if x is None else x.reshape(B, T, *x.shape[2:])
                    for x in (dq, dk, dv, dg, dbeta))
        return dxs, (dh0 if self.h0 is not None else None)


DELTA = DeltaEngine()
