"""Gated linear attention (GLA): a per-key-channel data-dependent decay.

``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``.
Engine: :data:`~.diag.DIAG`.
"""
from __future__ import annotations

from ..validate import autocast_inputs, check_scale
from ._run import linear_call
from .diag import DIAG, diag_reference, diag_step


def gla_step(q, k, v, g, state, scale=None):
    """One-token GLA step for generation. g: (B, H, K); state: (B, H, K, V) float32."""
    return diag_step(q, k, v, g, state, check_scale(scale, q.shape[-1]))


def gla_reference(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                  cu_seqlens=None):
    """Float64 token-by-token reference of :func:`gla`."""
    return diag_reference(q, k, v, g, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@autocast_inputs
def gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, chunk_size=64, backend="auto", sp=None):
    """Gated linear attention.

    Args:
        q, k: (B, T, H, K) float16/bfloat16/float32. v: (B, T, H, V), same dtype.
        g: (B, T, H, K) log decay (<= 0), any float dtype; used in float32.
        scale: defaults to K ** -0.5.
        initial_state: (N, H, K, V), N = B (or the number of packed documents).
        cu_seqlens: int32 (N + 1,) document offsets for packed input (B == 1).
        chunk_size: chunk length of the PyTorch chunk path alone (backend 'torch'); the
            Triton kernels always use 64-token chunks and ignore it.
        backend: 'auto' (Triton on CUDA, else PyTorch), 'torch' or 'triton'.
        sp: a ``seqpar.parallel.SequenceParallel``; each rank passes its own shard.
    Returns:
        o: (B, T, H, V) in v's dtype; final state (N, H, K, V) float32, or None.
    """
    return linear_call(DIAG, q, k, v, g, gate="key", scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                       chunk_size=chunk_size, backend=backend, sp=sp)
