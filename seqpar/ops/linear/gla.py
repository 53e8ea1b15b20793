"""Gated linear attention (GLA): a per-key-channel data-dependent decay.

``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale * q_t S_t``.
Engine: ``chunk_diag`` (PyTorch) / ``triton_diag`` (CUDA).
"""
from __future__ import annotations

import torch

from .._validate import autocast_inputs, check_scale
from ._family import reference_scan
from ._run import linear_call


def diag_step(q, k, v, g, state, scale):
    """One token of any diagonal-transition mixer, computed in the state's dtype.

    q, k: (B, H, K); v: (B, H, V); g: None, (B, H, 1) or (B, H, K) log decay;
    state: (B, H, K, V). Returns o (B, H, V) in v's dtype and the new state.
    """
    out_dtype = v.dtype
    q, k, v = (x.to(state.dtype) for x in (q, k, v))
    if g is not None:
        state = state * g.to(state.dtype).exp()[..., None]
    state = state + k[..., :, None] * v[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, state)
    return o.to(out_dtype), state


def gla_step(q, k, v, g, state, scale=None):
    """One-token GLA step for generation. g: (B, H, K); state: (B, H, K, V) float32."""
    return diag_step(q, k, v, g, state, check_scale(scale, q.shape[-1]))


def diag_reference(q, k, v, g, *, scale, initial_state, output_final_state, cu_seqlens):
    """Float64 token loop for the diagonal family; g None, (B, T, H, 1) or (B, T, H, K)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = check_scale(scale, K)
    offsets = None if cu_seqlens is None else cu_seqlens.tolist()

    def step(x, S):
        qt, kt, vt, gt = x
        return diag_step(qt, kt, vt, gt, S, scale)

    return reference_scan(step, (q, k, v, g), initial_state,
                          lambda n: torch.zeros(n, H, K, V, dtype=torch.float64, device=q.device),
                          output_final_state, offsets)


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
    return linear_call("diag", q, k, v, g, gate="key", scale=scale, initial_state=initial_state,
                       output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                       chunk_size=chunk_size, backend=backend, sp=sp)
