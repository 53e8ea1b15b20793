"""Gated DeltaNet: ``S_t = exp(g_t) S_{t-1} + beta_t k_t^T (v_t - exp(g_t) k_t S_{t-1})``,
``o_t = scale * q_t S_t``. The caller L2-normalizes k. Engine: ``chunk_delta`` (WY form).
"""
from __future__ import annotations

import torch

from .._validate import autocast_inputs, check_scale
from ._family import reference_scan
from ._run import linear_call


def delta_step(q, k, v, g, beta, state, scale):
    """One token of the (gated) delta rule, computed in the state's dtype.

    q, k: (B, H, K); v: (B, H, V); g: (B, H) log decay or None; beta: (B, H);
    state: (B, H, K, V). Returns o (B, H, V) in v's dtype and the new state.
    """
    out_dtype = v.dtype
    q, k, v, beta = (x.to(state.dtype) for x in (q, k, v, beta))
    if g is not None:
        state = state * g.to(state.dtype).exp()[..., None, None]
    pred = torch.einsum("bhk,bhkv->bhv", k, state)
    state = state + k[..., :, None] * (beta[..., None] * (v - pred))[..., None, :]
    o = scale * torch.einsum("bhk,bhkv->bhv", q, state)
    return o.to(out_dtype), state


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None):
    """One-token step. g, beta: (B, H); state (B, H, K, V) float32."""
    return delta_step(q, k, v, g, beta, state, check_scale(scale, q.shape[-1]))


def delta_reference(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens):
    """Float64 token loop for the delta family (g None for DeltaNet)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = check_scale(scale, K)
    offsets = None if cu_seqlens is None else cu_seqlens.tolist()

    def step(x, S):
        qt, kt, vt, gt, bt = x
        return delta_step(qt, kt, vt, gt, bt, S, scale)

    return reference_scan(step, (q, k, v, g, beta), initial_state,
                          lambda n: torch.zeros(n, H, K, V, dtype=torch.float64, device=q.device),
                          output_final_state, offsets)


def gated_delta_rule_reference(q, k, v, g, beta, scale=None, initial_state=None,
                               output_final_state=False, cu_seqlens=None):
    """Float64 token-by-token reference of :func:`gated_delta_rule`."""
    return delta_reference(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@autocast_inputs
def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, chunk_size=64,
                     backend="auto", sp=None):
    """Gated delta rule.

    g: (B, T, H) log decay (<= 0); beta: (B, T, H) in (0, 1). k should be
    L2-normalized by the caller. Keywords and returns as in :func:`seqpar.ops.gla`.
    """
    return linear_call("delta", q, k, v, g, beta, gate="head", scale=scale,
                       initial_state=initial_state, output_final_state=output_final_state,
                       cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend, sp=sp)
