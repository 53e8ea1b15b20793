"""Simple GLA: one data-dependent decay per head and token.

``S_t = exp(g_t) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``. A constant ``g`` per
head is RetNet's retention / Lightning Attention's decay. Engine: :data:`~.diag.DIAG`.
"""
from __future__ import annotations

from ..validate import autocast_inputs, check_scale
from ._run import linear_call
from .diag import DIAG, diag_reference, diag_step


def simple_gla_step(q, k, v, g, state, scale=None):
    """One-token step. q, k: (B, H, K); v: (B, H, V); g: (B, H); state (B, H, K, V)."""
    return diag_step(q, k, v, g[..., None], state, check_scale(scale, q.shape[-1]))


def simple_gla_reference(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None):
    """Float64 token-by-token reference of :func:`simple_gla`."""
    return diag_reference(q, k, v, g[..., None], scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@autocast_inputs
def simple_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
               cu_seqlens=None, chunk_size=64, backend="auto", sp=None):
    """Simple gated linear attention (scalar decay per head).

    g: (B, T, H) log decay (<= 0), any float dtype, used in float32. Everything else
    as in :func:`seqpar.ops.gla`: o (B, T, H, V), final state (N, H, K, V) float32.
    """
    return linear_call(DIAG, q, k, v, g, gate="head", scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                       chunk_size=chunk_size, backend=backend, sp=sp)
