"""Chunkwise-parallel PyTorch path for diagonal transitions (linear attention, simple
GLA / retention, GLA, mLSTM).

Within a chunk of C tokens with cumulative log decay ``G_i`` (from the chunk start),
``o_i = scale * (sum_{j<=i} (q_i * exp(G_i - G_j)) k_j^T v_j + (q_i * exp(G_i)) S_in)``:
the first term is a masked (C, C) matmul, the second uses the state entering the
chunk. States pass between chunks as ``S_out = exp(G_C) * S_in + sum_j (k_j *
exp(G_C - G_j))^T v_j``. Every exponent ``G_i - G_j`` with ``j <= i`` is summed
directly over the gates in between (:func:`_segsum`), so nothing overflows however
strong the decay and the decay gradients carry no cancelling terms. Runs anywhere;
backward by autograd.
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


def _segsum(g: torch.Tensor) -> torch.Tensor:
    """Within-chunk decay exponents: (B, H, n, c, D) log gates -> (B, H, n, c, c, D)
    with entry ``[i, j] = sum_{j < s <= i} g_s`` for ``j <= i`` and ``-inf`` above the
    diagonal.

    Summing the gates in between, rather than differencing cumulative sums, keeps the
    diagonal (``exp(0) = 1``) free of ``g``: a difference ``G_i - G_j`` sends equal and
    opposite gradients to ``G_i`` and ``G_j`` that cancel only up to rounding, an error
    of the size of the undecayed terms, large against the true gradient when decays are
    strong.
    """
    c = g.shape[3]
    ones = torch.ones(c, c, dtype=torch.bool, device=g.device)
    x = g.unsqueeze(4).expand(*g.shape[:4], c, g.shape[4])  # x[..., s, j, :] = g_s
    x = x.masked_fill(~ones.tril(-1)[..., None], 0.0).cumsum(3)
    return x.masked_fill(~ones.tril()[..., None], float("-inf"))


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
        gc = _chunks(g, n, C)
        if g.dim() == 3:  # one decay per head: a unit key axis makes it broadcast like GLA's
            gc = gc[..., None]
        decay = _segsum(gc).exp()  # (B, H, n, C, C, K or 1)
        if g.dim() == 3:
            attn = (qc @ kc.transpose(-1, -2)) * decay[..., 0]
        else:  # the decay varies along K, so no plain matmul
            attn = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, kc, decay)
        G = gc.cumsum(3)
        q_dec = qc * G.exp()
        k_dec = kc * decay[..., -1, :, :]  # exp(G_C - G_j): the last row of the decay
        chunk_decay = G[..., -1:, :].transpose(-1, -2).exp()  # (B, H, n, K or 1, 1)

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
