"""Validation and backend dispatch behind every public linear-family op."""
from __future__ import annotations

import torch

from .._validate import (check_backend, check_chunk_size, check_cu_seqlens, check_gate,
                         check_qkv, check_scale, check_state, fail)
from ._family import per_document, pick_backend


def run_diag(q, k, v, g, *, scale: float, initial_state, output_final_state: bool,
             offsets, chunk_size: int, backend: str):
    """Diagonal-transition engine on validated inputs (one device, no SP).

    q, k: (B, T, H, K); v: (B, T, H, V); g: None, (B, T, H) or (B, T, H, K) log decay;
    initial_state: (N, H, K, V) float32 or None (N = B, or documents when packed).
    Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V) float32 or None.
    """
    if pick_backend(backend, q) == "triton":
        from .triton_diag import triton_diag

        return triton_diag(q, k, v, g, scale=scale, initial_state=initial_state,
                           output_final_state=output_final_state, offsets=offsets)
    from .chunk_diag import chunk_diag

    def fn(xs, state):
        return chunk_diag(*xs, scale=scale, initial_state=state,
                          output_final_state=output_final_state, chunk_size=chunk_size)

    return per_document(fn, offsets, (q, k, v, g), initial_state, output_final_state)


def run_delta(q, k, v, g, beta, *, scale: float, initial_state, output_final_state: bool,
              offsets, chunk_size: int, backend: str):
    """Delta-rule engine on validated inputs; ``g`` is None for DeltaNet.

    beta: (B, T, H). Other shapes as in :func:`run_diag`.
    """
    # The Triton path became the CUDA default once it passed at full size on an H100
    # (bench/results/ops_delta_check_h100.json: 34 cases, outputs, states, every gradient).
    if pick_backend(backend, q) == "triton":
        from .triton_delta import triton_delta

        return triton_delta(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, offsets=offsets)
    from .chunk_delta import chunk_delta

    def fn(xs, state):
        return chunk_delta(*xs, scale=scale, initial_state=state,
                           output_final_state=output_final_state, chunk_size=chunk_size)

    return per_document(fn, offsets, (q, k, v, g, beta), initial_state, output_final_state)


def check_options(output_final_state, chunk_size, backend) -> int:
    """Validate the keywords every linear-family op shares; returns the chunk size."""
    chunk_size = check_chunk_size(chunk_size)
    check_backend(backend)
    if not isinstance(output_final_state, bool):
        fail("output_final_state", "a bool", type(output_final_state).__name__)
    return chunk_size


def documents(cu_seqlens, B: int, T: int, device) -> tuple[list[int] | None, int]:
    """Validated document offsets (None without packing) and the number of sequences N
    that initial and final states have: B, or the number of packed documents."""
    offsets = check_cu_seqlens(cu_seqlens, B, T, device)
    return offsets, (B if offsets is None else len(offsets) - 1)


def linear_call(kind: str, q, k, v, g=None, beta=None, *, gate: str | None, scale,
                initial_state, output_final_state, cu_seqlens, chunk_size, backend, sp):
    """Validate a linear-family call and run it on one device or through ``sp``.

    kind: 'diag' or 'delta'. gate: None, 'head' (g of shape (B, T, H)) or 'key'
    (g of shape (B, T, H, K)).
    """
    B, T, H, K, V = check_qkv(q, k, v)
    if g is not None:
        g = check_gate("g", g, (B, T, H) if gate == "head" else (B, T, H, K), q.device)
        g = g.float()
    if beta is not None:
        beta = check_gate("beta", beta, (B, T, H), q.device)
    scale = check_scale(scale, K)
    chunk_size = check_options(output_final_state, chunk_size, backend)
    if sp is not None:
        return sp.linear(kind, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                         chunk_size=chunk_size, backend=backend)
    offsets, N = documents(cu_seqlens, B, T, q.device)
    check_state("initial_state", initial_state, (N, H, K, V), q.device)
    run = run_diag if kind == "diag" else run_delta
    extra = (g,) if kind == "diag" else (g, beta)
    return run(q, k, v, *extra, scale=scale, initial_state=initial_state,
               output_final_state=output_final_state, offsets=offsets,
               chunk_size=chunk_size, backend=backend)


def as_compute(x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Cast a one-token input to the state's dtype for a recurrent step."""
    return x.to(state.dtype)
