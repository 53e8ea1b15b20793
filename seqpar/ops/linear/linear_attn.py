"""Linear attention: ``S_t = S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``.

Engine: :data:`~.diag.DIAG` with no decay.
"""
from __future__ import annotations

from ..validate import autocast_inputs, check_scale
from ._run import linear_call
from .diag import DIAG, diag_reference, diag_step


def linear_attn_step(q, k, v, state, scale=None):
    """One-token step. q, k: (B, H, K); v: (B, H, V); state (B, H, K, V) float32."""
    return diag_step(q, k, v, None, state, check_scale(scale, q.shape[-1]))


def linear_attn_reference(q, k, v, scale=None, initial_state=None, output_final_state=False,
                          cu_seqlens=None):
    """Float64 token-by-token reference of :func:`linear_attn`."""
    return diag_reference(q, k, v, None, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@autocast_inputs
def linear_attn(q, k, v, *, scale=None, initial_state=None, output_final_state=False,
                cu_seqlens=None, chunk_size=64, backend="auto", sp=None):
    """Causal linear attention (no decay, no normalizer).

    q, k: (B, T, H, K); v: (B, T, H, V). Keywords as in :func:`seqpar.ops.gla`.
    Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V) float32 or None.
    """
    return linear_call(DIAG, q, k, v, None, gate=None, scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                       chunk_size=chunk_size, backend=backend, sp=sp)
