"""Chunkwise-parallel PyTorch path for the delta rule (DeltaNet, Gated DeltaNet).

Within a chunk of C tokens with cumulative log decay ``G_t`` (from the chunk start) and
incoming state ``S``, write the chunk's states as ``S_t = exp(G_t) S + sum_{j<=t}
exp(G_t - G_j) k_j^T u_j``. The recurrence fixes the pseudo-values ``u`` by a unit
lower-triangular system (the WY/UT representation):
``(I + A) u = beta V - (beta exp(G) K) S`` with ``A_tj = beta_t exp(G_t - G_j) k_t.k_j``
for ``j < t``, so ``u = U - W S`` with ``W = (I + A)^{-1} (beta exp(G) K)`` and
``U = (I + A)^{-1} (beta V)``. Then, with ``P = (q k^T) * exp(G_i - G_j)`` masked to
``j <= i``,

* ``o = scale * (P U + (q exp(G) - P W) S)``,
* ``S_out = (exp(G_C) I - (k exp(G_C - G_j))^T W) S + (k exp(G_C - G_j))^T U``.

Everything but the terms in ``S`` is independent of the incoming state and runs for all
chunks at once; passing the state is the affine recurrence ``S <- M S + L`` of docs/design.md
with a (K, K) ``M`` per chunk. Every exponent ``G_i - G_j`` with ``j <= i`` is summed
directly over the gates in between (``chunk_diag.segsum``), so nothing overflows however
strong the decay and the gate gradients carry no cancelling terms. Backward by autograd.
"""
from __future__ import annotations

import torch

from .chunk_diag import ChunkTerms, chunked, segsum


def wy_terms(qc, kc, vc, gc, bc, scale: float, inverse=None):
    """The state-independent terms of the WY form on chunked float32 inputs.

    ``inverse`` maps the strictly lower ``A`` (..., n, C, C) to ``(I + A)^{-1}``; None
    solves the two triangular systems with ``torch.linalg.solve_triangular`` instead.

    Args:
        qc, kc: (..., n, C, K); vc: (..., n, C, V); gc: None or (..., n, C, 1) log
        decay (leading dims: two, e.g. (B, H)); bc: (..., n, C, 1) beta.
    Returns:
        P (..., n, C, C) (scaled, masked, decayed), W (..., n, C, K), U (..., n, C, V),
        q_dec = scale q exp(G) (..., n, C, K), k_dec = k exp(G_C - G_j) (..., n, C, K) and
        the chunk decay exp(G_C) (..., n, 1, 1), or None without a gate.
    """
    C = qc.shape[-2]
    kb, vb = kc * bc, vc * bc
    qc = qc * scale
    if gc is None:
        decay = torch.ones(C, C, device=qc.device).tril()
        q_dec, k_dec, kb_dec, chunk_decay = qc, kc, kb, None
    else:
        decay_full = segsum(gc).exp()  # (..., n, C, C, 1)
        decay = decay_full[..., 0]
        G = gc.cumsum(-2)
        q_dec = qc * G.exp()
        k_dec = kc * decay_full[..., -1, :, :]  # exp(G_C - G_j): the last row of the decay
        kb_dec = kb * G.exp()
        chunk_decay = G[..., -1:, :].exp()  # (..., n, 1, 1)

    A = ((kb @ kc.transpose(-1, -2)) * decay).tril(-1)
    if inverse is None:
        IA = A + torch.eye(C, device=qc.device)
        W = torch.linalg.solve_triangular(IA, kb_dec, upper=False, unitriangular=True)
        U = torch.linalg.solve_triangular(IA, vb, upper=False, unitriangular=True)
    else:
        T = inverse(A)
        W, U = T @ kb_dec, T @ vb
    P = (qc @ kc.transpose(-1, -2)) * decay
    return P, W, U, q_dec, k_dec, chunk_decay


def chunk_delta_terms(q, k, v, g, beta, *, scale: float, chunk_size: int = 64) -> ChunkTerms:
    """:class:`~.chunk_diag.ChunkTerms` of the delta rule (K x K chunk transitions);
    shapes as in :func:`chunk_delta`."""
    B, T, H, K = q.shape
    C = min(chunk_size, T)
    n = -(-T // C)
    # Zero padding is inert: beta = 0 writes nothing, k = 0 reads nothing, g = 0 decays nothing.
    gc = None if g is None else chunked(g, n, C)[..., None]
    P, W, U, q_dec, k_dec, chunk_decay = wy_terms(
        chunked(q, n, C), chunked(k, n, C), chunked(v, n, C), gc,
        chunked(beta, n, C)[..., None], scale)
    k_dec_t = k_dec.transpose(-1, -2)
    eye = torch.eye(K, device=q.device)
    M = (eye if chunk_decay is None else chunk_decay * eye) - k_dec_t @ W  # (B, H, n, K, K)
    M = M.expand(B, H, n, K, K)
    return ChunkTerms(P @ U, q_dec - P @ W, M, k_dec_t @ U, T, v.dtype)


def chunk_delta(q, k, v, g, beta, *, scale: float, initial_state=None,
                output_final_state=False, chunk_size: int = 64):
    """Chunkwise (gated) delta rule on one device.

    Args:
        q, k: (B, T, H, K); v: (B, T, H, V), any float dtype (computed in float32).
        g: None (DeltaNet) or (B, T, H) log decay in float32.
        beta: (B, T, H), any float dtype.
        initial_state: (B, H, K, V) or None.
    Returns:
        o: (B, T, H, V) in v's dtype; final state (B, H, K, V) float32 or None.
    """
    terms = chunk_delta_terms(q, k, v, g, beta, scale=scale, chunk_size=chunk_size)
    o, S = terms.scan(initial_state)
    return o, (S if output_final_state else None)
