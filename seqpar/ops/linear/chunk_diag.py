"""Chunkwise-parallel PyTorch path for diagonal transitions (linear attention, simple
GLA / retention, GLA, mLSTM).

Within a chunk of C tokens with cumulative log decay ``G_i`` (from the chunk start),
``o_i = scale * (sum_{j<=i} (q_i * exp(G_i - G_j)) k_j^T v_j + (q_i * exp(G_i)) S_in)``:
the first term is a masked (C, C) matmul, the second uses the state entering the
chunk. States pass between chunks as ``S_out = exp(G_C) * S_in + sum_j (k_j *
exp(G_C - G_j))^T v_j``. Every exponent ``G_i - G_j`` with ``j <= i`` is summed
directly over the gates in between (:func:`segsum`), so nothing overflows however
strong the decay and the decay gradients carry no cancelling terms. Runs anywhere;
backward by autograd.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .engine import apply


def chunked(x: torch.Tensor, n: int, c: int) -> torch.Tensor:
    """(B, T, H, ...) zero-padded to n*c tokens -> (B, H, n, c, ...) float32."""
    pad = n * c - x.shape[1]
    x = x.float()
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    x = x.reshape(x.shape[0], n, c, *x.shape[2:])
    return x.movedim(3, 1)


def segsum(g: torch.Tensor) -> torch.Tensor:
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


class ChunkTerms:
    """The state-independent part of a chunkwise run on a (B, T) batch, float32,
    differentiable: ``o_intra`` (B, H, n, C, V) the outputs from inside each chunk,
    ``q_eff`` (B, H, n, C, K) how each output reads the state entering its chunk,
    ``M`` the chunk transitions ((B, H, n, K or 1, 1) diagonal, or (B, H, n, K, K)) and
    ``local`` (B, H, n, K, V) the state each chunk builds from zero. Then
    ``o_c = o_intra_c + q_eff_c S_c`` and ``S_{c+1} = M_c S_c + local_c``."""

    def __init__(self, o_intra, q_eff, M, local, T: int, dtype: torch.dtype):
        self.o_intra, self.q_eff, self.M, self.local = o_intra, q_eff, M, local
        self.T, self.dtype = T, dtype

    def apply(self, c: int, S, transpose: bool = False):
        return apply(self.M[:, :, c], S, transpose)

    def scan(self, initial_state=None):
        """Outputs (B, T, H, V) in the inputs' dtype and the final state (B, H, K, V)
        float32 from ``initial_state`` (or zeros)."""
        B, H, n, _, K = self.q_eff.shape
        V = self.local.shape[-1]
        S = self.local.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
        inter = []
        for c in range(n):
            inter.append(self.q_eff[:, :, c] @ S)
            S = self.apply(c, S) + self.local[:, :, c]
        o = self.o_intra + torch.stack(inter, 2)
        o = o.movedim(1, 3).reshape(B, -1, H, V)[:, :self.T]
        return o.to(self.dtype), S

    def scan_chains(self, initial_state, sizes, chain, unchain):
        """:meth:`scan` of a one-row run (B == 1) whose n chunks form independent chains
        (packed documents, each starting a chunk), all advanced together step by step.

        ``chain`` (n,) long lists the chunks in step order: step j's ``sizes[j]`` chunks
        (the j-th chunk of chains ``0 .. sizes[j] - 1``, so ``sizes`` does not increase)
        follow step j - 1's; ``unchain`` is its inverse. ``initial_state`` (sizes[0], H,
        K, V) float32, one per chain (None: zeros). Returns the outputs (1, T, H, V) in
        the inputs' dtype and the state (n, H, K, V) float32 after every chunk, in step
        order. The graph grows with the number of steps, not of chains.
        """
        _, H, n, C, K = self.q_eff.shape
        V = self.local.shape[-1]
        M = self.M[0].index_select(1, chain).movedim(1, 0)  # (n, H, K or 1, K or 1)
        local = self.local[0].index_select(1, chain).movedim(1, 0)  # (n, H, K, V)
        S = local.new_zeros(sizes[0], H, K, V) if initial_state is None else initial_state
        entering, leaving, p = [], [], 0
        for a in sizes:
            S = S[:a]
            entering.append(S)
            Mj = M[p:p + a]
            S = apply(Mj, S) + local[p:p + a]
            leaving.append(S)
            p += a
        S_in = torch.cat(entering).index_select(0, unchain).movedim(0, 1)  # (H, n, K, V)
        o = self.o_intra[0] + self.q_eff[0] @ S_in  # (H, n, C, V)
        o = o.permute(1, 2, 0, 3).reshape(1, n * C, H, V)[:, :self.T]
        return o.to(self.dtype), torch.cat(leaving)

    def final(self, initial_state=None):
        """The final state (B, H, K, V) float32 alone."""
        S = torch.zeros_like(self.local[:, :, 0]) if initial_state is None else initial_state
        for c in range(self.local.shape[2]):
            S = self.apply(c, S) + self.local[:, :, c]
        return S

    def transition(self):
        """The product of the chunk transitions: (B, H, K or 1, K or 1)."""
        M = self.M[:, :, 0]
        for c in range(1, self.M.shape[2]):
            Mc = self.M[:, :, c]
            M = Mc * M if Mc.shape[-1] == 1 else Mc @ M
        return M

    def initial_grad(self, do, dht=None):
        """The gradient (B, H, K, V) of the entering state from the output gradient do
        (B, T, H, V) and the final state's gradient dht (or None)."""
        B, H, n, C, K = self.q_eff.shape
        V = self.local.shape[-1]
        do = chunked(do, n, C)
        lam = self.local.new_zeros(B, H, K, V) if dht is None else dht.float()
        for c in range(n - 1, -1, -1):
            lam = self.apply(c, lam, transpose=True) + self.q_eff[:, :, c].transpose(-1, -2) @ do[:, :, c]
        return lam


def chunk_diag_terms(q, k, v, g, *, scale: float, chunk_size: int = 64) -> ChunkTerms:
    """:class:`ChunkTerms` of the diagonal family; shapes as in :func:`chunk_diag`."""
    B, T, H, K = q.shape
    C = min(chunk_size, T)
    n = -(-T // C)
    # Zero padding is inert: k = 0 adds nothing and g = 0 decays nothing.
    qc, kc, vc = chunked(q, n, C), chunked(k, n, C), chunked(v, n, C)
    qc = qc * scale
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()

    if g is None:
        attn = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
        q_dec, k_dec = qc, kc
        chunk_decay = torch.ones(B, H, n, 1, 1, device=q.device)
    else:
        gc = chunked(g, n, C)
        if g.dim() == 3:  # one decay per head: a unit key axis makes it broadcast like GLA's
            gc = gc[..., None]
        decay = segsum(gc).exp()  # (B, H, n, C, C, K or 1)
        if g.dim() == 3:
            attn = (qc @ kc.transpose(-1, -2)) * decay[..., 0]
        else:  # the decay varies along K, so no plain matmul
            attn = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, kc, decay)
        G = gc.cumsum(3)
        q_dec = qc * G.exp()
        k_dec = kc * decay[..., -1, :, :]  # exp(G_C - G_j): the last row of the decay
        chunk_decay = G[..., -1:, :].transpose(-1, -2).exp()  # (B, H, n, K or 1, 1)
    local = k_dec.transpose(-1, -2) @ vc  # state each chunk builds from zero: (B, H, n, K, V)
    return ChunkTerms(attn @ vc, q_dec, chunk_decay, local, T, v.dtype)


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
    o, S = chunk_diag_terms(q, k, v, g, scale=scale, chunk_size=chunk_size).scan(initial_state)
    return o, (S if output_final_state else None)
