"""DeltaNet: ``S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1})``, ``o_t = scale * q_t S_t``.

The caller L2-normalizes k. Engine: :data:`~.delta.DELTA` with no decay.
"""
from __future__ import annotations

from ..validate import autocast_inputs, check_scale
from ._run import linear_call
from .delta import DELTA, delta_reference, delta_step


def delta_rule_step(q, k, v, beta, state, scale=None):
    """One-token step. beta: (B, H); state (B, H, K, V) float32."""
    return delta_step(q, k, v, None, beta, state, check_scale(scale, q.shape[-1]))


def delta_rule_reference(q, k, v, beta, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None):
    """Float64 token-by-token reference of :func:`delta_rule`."""
    return delta_reference(q, k, v, None, beta, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@autocast_inputs
def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               cu_seqlens=None, chunk_size=64, backend="auto", sp=None):
    """DeltaNet. beta: (B, T, H) in (0, 1). Keywords and returns as in
    :func:`seqpar.ops.gla`."""
    return linear_call(DELTA, q, k, v, None, beta, gate=None, scale=scale,
                       initial_state=initial_state, output_final_state=output_final_state,
                       cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend, sp=sp)
