"""Chunkwise-parallel PyTorch path for diagonal transitions (linear attention, simple
GLA / retention, GLA, mLSTM).

Within a chunk of C tokens with cumulative log decay ``G_i`` (from the chunk start),
``o_i = scale * (sum_{j<=i} (q_i * exp(G_i - G_j)) k_j^T v_j + (q_i * exp(G_i)) S_in)``:
the first term is a masked (C, C) matmul, the second uses the state entering the
chunk. States pass between chunks as ``S_out = exp(G_C) * S_in + sum_j (k_j *
exp(G_C - G_j))^T v_j``. Every exponent is a difference ``G_i - G_j`` with ``j <= i``,
so nothing overflows however strong the decay. Runs anywhere; backward by autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _chunks(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """(B, T, H, ...) zero-padded to n*c tokens -> (B, H, n, c, ...) float32."""
    pad = n * c - x.shape[1]
    x = x.float()
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.reshape(x.shape[0], n, c, *x.shape[2:])
    return x.movedim(3, 1)


def chunk_diag(q, k, v, g, *, scale: float, initial_state=None, output_final_state=False,
               chunk_size: int = 64):
    """Chunkwise diagonal-decay linear attention on one device.

    Args:
        q, k: (B, T, H, K); v: (B, T, H, V), any float dtype (computed in float32).
        g: None, (B, T, H) or (B, T, H, K) log decay in float32.
        initial_state: (B, H, K, V) or None.
    Returns:
        o: (B, T, H, V) in v's dtype; final state (B, H, K, V) float32 or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, T)
    n = -(-T // C)
    # Zero padding is inert: k = 0 adds nothing and g = 0 decays nothing.
    qc, kc, vc = _chunks(q, n, C), _chunks(k, n, C), _chunks(v, n, C)
    qc = qc * scale
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()

    if g is None:
        attn = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
        q_dec, k_dec = qc, kc
        chunk_decay = torch.ones(B, H, n, 1, 1, device=q.device)
    else:
        G = _chunks(g, n, C).cumsum(3)
        if g.dim() == 3:  # one decay per head: a (C, C) decay matrix
            diff = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf"))
            attn = (qc @ kc.transpose(-1, -2)) * diff.exp()
            G = G[..., None]
        else:  # one decay per key channel: the decay varies along K, so (C, C, K)
            diff = G[..., :, None, :] - G[..., None, :, :]
            diff = diff.masked_fill(~causal[..., None], float("-inf"))
            attn = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, kc, diff.exp())
        G_last = G[..., -1:, :]
        q_dec = qc * G.exp()
        k_dec = kc * (G_last - G).exp()
        chunk_decay = G_last.transpose(-1, -2).exp()  # (B, H, n, K or 1, 1)

    o = attn @ vc
    local = k_dec.transpose(-1, -2) @ vc  # state each chunk builds from zero: (B, H, n, K, V)
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    inter = []
    for i in range(n):
        inter.append(q_dec[:, :, i] @ S)
        S = chunk_decay[:, :, i] * S + local[:, :, i]
    o = o + torch.stack(inter, 2)
    o = o.movedim(1, 3).reshape(B, n * C, H, V)[:, :T]
    return o.to(v.dtype), (S if output_final_state else None)
