"""Softmax attention for hybrids: RoPE at global positions, optional GQA, a KV cache.

Positions come from the token's place in its document: with sequence parallelism the
shard's global offset is added, with packed input (``cu_seqlens``) they restart at 0 at
every document start (:func:`default_positions`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_positive_int, fail
from ..ops.short_conv import document_index
from ..ops.validate import check_tensor
from ._common import Mixer, call_eager, check_hidden


def default_positions(T: int, device: torch.device, cu_seqlens=None, sp=None) -> torch.Tensor:
    """RoPE positions of the T tokens a caller holds: int64 (T,).

    Without ``sp``: ``0..T-1``. With ``sp`` (T is the shard length): this rank's tokens'
    global indices under ``sp.layout`` (``seqpar.parallel.position_ids``). With
    ``cu_seqlens`` (global offsets under ``sp``): each index minus the start of its
    document.
    """
    if sp is not None:
        from ..parallel import position_ids

        return position_ids(sp, T * sp.world, cu_seqlens, device=device)
    if cu_seqlens is None:
        return torch.arange(T, device=device)
    return document_index(cu_seqlens.to(device), T)[1]


def check_positions(position_ids, B: int, T: int, device) -> torch.Tensor:
    """Accept integer position ids of shape (T,) or (B, T)."""
    check_tensor("position_ids", position_ids, dtypes=(torch.int32, torch.int64), device=device)
    if position_ids.shape not in ((T,), (B, T)):
        fail("position_ids", f"shape ({T},) or ({B}, {T})", f"shape {tuple(position_ids.shape)}")
    return position_ids


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x (B, T, H, Dh)`` by rotary embeddings (rotate-half / GPT-NeoX layout).

    positions: integer (T,) or (B, T). Angles are formed in float64 so that positions in
    the millions keep their precision; the result has ``x``'s dtype.
    """
    Dh = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, Dh, 2, device=x.device, dtype=torch.float64) / Dh)
    ang = positions.to(torch.float64)[..., None] * inv_freq  # (..., T, Dh/2)
    if ang.dim() == 2:
        ang = ang[None]
    cos = ang.cos().to(torch.float32)[:, :, None, :]
    sin = ang.sin().to(torch.float32)[:, :, None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


@dataclass
class KVCache:
    """Keys (after RoPE) and values of every token so far: (B, S, H_kv, Dh) each."""
    k: torch.Tensor
    v: torch.Tensor


class Attention(Mixer):
    """Causal multi-head softmax attention with RoPE and optional grouped-query heads.

    Args:
        d_model: model width D. n_heads: query heads H. head_dim: Dh (even, for RoPE).
        n_kv_heads: key/value heads (GQA), dividing H; default H.
        rope_theta: RoPE base.
    """

    cache_type = KVCache

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, n_kv_heads: int | None = None,
                 rope_theta: float = 10000.0):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.n_heads = check_positive_int("n_heads", n_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.n_kv_heads = n_heads if n_kv_heads is None else check_positive_int("n_kv_heads", n_kv_heads)
        if n_heads % self.n_kv_heads:
            fail("n_kv_heads", f"a divisor of n_heads = {n_heads}", self.n_kv_heads)
        if head_dim % 2:
            fail("head_dim", "an even number (RoPE rotates pairs)", head_dim)
        self.rope_theta = float(rope_theta)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * self.n_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.q_proj.weight, std=std)
        nn.init.normal_(self.kv_proj.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=std if out_std is None else out_std)

    def forward(self, x: torch.Tensor, *, cu_seqlens=None, position_ids=None, sp=None,
                state: KVCache | None = None, output_state: bool = False):
        """Attend causally over ``x (B, T, D)``; returns ``(y (B, T, D), KVCache or None)``.

        cu_seqlens: packed documents (B == 1); attention stays within a document and
        positions restart at each. position_ids: (T,) or (B, T) RoPE positions; default
        :func:`default_positions` (global under ``sp``). sp: ``ops.softmax_attn`` runs
        sequence-parallel on this rank's shard. state: a :class:`KVCache`; the new
        tokens take positions after it (position_ids must then be None).
        """
        B, T = check_hidden(x, self.d_model)
        self.check_state(state, cu_seqlens, sp, output_state)
        if state is not None:
            if position_ids is not None:
                fail("position_ids", "None with a KV cache (positions continue from the cache)",
                     "a tensor")
            position_ids = state.k.shape[1] + torch.arange(T, device=x.device)
        elif position_ids is None:
            position_ids = default_positions(T, x.device, cu_seqlens, sp)
        else:
            check_positions(position_ids, B, T, x.device)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, position_ids, self.rope_theta), apply_rope(k, position_ids, self.rope_theta)
        if state is None:
            o, _ = call_eager(ops.softmax_attn, q, k, v, causal=True, cu_seqlens=cu_seqlens, sp=sp)
        else:
            k, v = torch.cat([state.k, k], 1), torch.cat([state.v, v], 1)
            o = self._attend_cached(q, k, v)
        y = self.o_proj(o.reshape(B, T, -1))
        return y, (KVCache(k, v) if output_state else None)

    def _attend_cached(self, q, k, v):
        """New queries (B, T, H, Dh) at the last T of S positions against all S keys
        (B, S, H_kv, Dh); PyTorch SDPA with an explicit mask, since the op's causal
        mask needs as many keys as queries."""
        T, S = q.shape[1], k.shape[1]
        mask = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads)
        return o.transpose(1, 2)

    def flops_per_token(self, seq_len: int) -> float:
        """Scores and weighted values over the causal context (average seq_len / 2):
        forward 2 * 2 * H * Dh * seq_len / 2, times 3 with backward; i.e. half of
        PaLM's non-causal ``12 H Dh T`` per layer."""
        return 6.0 * self.n_heads * self.head_dim * seq_len
