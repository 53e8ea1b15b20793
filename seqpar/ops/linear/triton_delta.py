"""Delta-rule engine behind ``backend='triton'`` (DeltaNet, Gated DeltaNet).

There is no Triton kernel for the delta family yet (issue 4, open): this runs the
PyTorch chunk path (WY/UT form, :mod:`.chunk_delta`) per document, so results are
correct on CUDA and under the interpreter but not Triton-fast.
"""
from __future__ import annotations

from ._family import per_document
from .chunk_delta import chunk_delta


def triton_delta(q, k, v, g, beta, *, scale: float, initial_state, output_final_state: bool,
                 offsets):
    """Same contract as ``_run.run_delta``: q, k (B, T, H, K); v (B, T, H, V); g None or
    (B, T, H) float32; beta (B, T, H); initial_state (N, H, K, V) or None; offsets list
    or None. Returns o (B, T, H, V) in v's dtype and the final state (N, H, K, V)
    float32 or None."""
    def fn(xs, state):
        return chunk_delta(*xs, scale=scale, initial_state=state,
                           output_final_state=output_final_state)

    return per_document(fn, offsets, (q, k, v, g, beta), initial_state, output_final_state)
