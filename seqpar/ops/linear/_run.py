"""Validation and backend dispatch behind every public linear-family op."""
from __future__ import annotations

from ..validate import (
    check_backend,
    check_chunk_size,
    check_cu_seqlens,
    check_gate,
    check_qkv,
    check_scale,
    check_state,
    fail,
)
from .engine import LinearEngine


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


def linear_call(engine: LinearEngine, q, k, v, g=None, beta=None, *, gate: str | None, scale,
                initial_state, output_final_state, cu_seqlens, chunk_size, backend, sp):
    """Validate a linear-family call and run it on one device or through ``sp``.

    engine: :data:`~.diag.DIAG` or :data:`~.delta.DELTA` (``beta`` is the delta rule's).
    gate: None, 'head' (g of shape (B, T, H)) or 'key' (g of shape (B, T, H, K)).
    """
    B, T, H, K, V = check_qkv(q, k, v)
    if g is not None:
        g = check_gate("g", g, (B, T, H) if gate == "head" else (B, T, H, K), q.device)
        g = g.float()
    if beta is not None:
        beta = check_gate("beta", beta, (B, T, H), q.device)
    scale = check_scale(scale, K)
    chunk_size = check_options(output_final_state, chunk_size, backend)
    xs = (q, k, v, g) if engine.name == "diag" else (q, k, v, g, beta)
    if sp is not None:
        return sp.linear(engine, xs, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                         chunk_size=chunk_size, backend=backend)
    offsets, N = documents(cu_seqlens, B, T, q.device)
    check_state("initial_state", initial_state, (N, H, K, V), q.device)
    return engine.run(xs, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, offsets=offsets,
                      chunk_size=chunk_size, backend=backend)
