"""Machinery shared by the linear family: the token-by-token reference driver,
packed-sequence splitting and backend dispatch.

Every linear mixer is one affine state recurrence (docs/design.md). Two chunkwise engines
cover all six ops:

* ``diag``: diagonal transitions ``A_t = diag(exp(g_t))`` with ``g`` absent (linear
  attention), per head (simple GLA / retention; mLSTM reduces to it) or per key channel
  (GLA);
* ``delta``: ``A_t = exp(g_t) (I - beta_t k_t^T k_t)`` (DeltaNet with ``g`` absent,
  Gated DeltaNet).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..validate import fail


def _slice_state(state, i: int, j: int):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s[i:j] for s in state)
    return state[i:j]


def _cat_states(states):
    if states[0] is None:
        return None
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts, 0) for parts in zip(*states))
    return torch.cat(states, 0)


def per_document(fn: Callable, offsets: Sequence[int] | None, xs: Sequence, initial_state,
                 output_final_state: bool):
    """Run ``fn(xs_doc, state_doc)`` on each packed document and stitch the results.

    ``xs`` are ``(B, T, ...)`` tensors (or ``None``); with ``offsets`` (``B == 1``) each
    document ``[offsets[i], offsets[i+1])`` runs as its own sequence with initial state
    row ``i``, so a boundary resets the state. ``fn`` returns ``(o, final_state)``.
    Final states of all documents are stacked along dim 0.
    """
    if offsets is None:
        return fn(xs, initial_state)
    outs, states = [], []
    for i, (s, e) in enumerate(zip(offsets, offsets[1:])):
        doc = [None if x is None else x[:, s:e] for x in xs]
        o, st = fn(doc, _slice_state(initial_state, i, i + 1))
        outs.append(o)
        states.append(st)
    return torch.cat(outs, 1), (_cat_states(states) if output_final_state else None)


def reference_scan(step: Callable, xs: Sequence, initial_state, zero_state: Callable,
                   output_final_state: bool, offsets: Sequence[int] | None):
    """Token-by-token float64 reference.

    ``step(x_t, state) -> (o_t, state)`` is the op's one-token recurrent step with
    ``x_t`` the ``(B, H, ...)`` slices of ``xs`` at time t; ``zero_state(B)`` builds a
    zero state. Everything runs in float64; the output is float64.
    """
    def up(x):
        if x is None:
            return None
        if isinstance(x, tuple):
            return tuple(t.to(torch.float64) for t in x)
        return x.to(torch.float64)

    def run(doc, state):
        B, T = doc[0].shape[:2]
        state = zero_state(B) if state is None else up(state)
        outs = []
        for t in range(T):
            o, state = step([None if x is None else up(x[:, t]) for x in doc], state)
            outs.append(o)
        return torch.stack(outs, 1), state

    o, s = per_document(run, offsets, xs, initial_state, True)
    return o, (s if output_final_state else None)


def pick_backend(backend: str, x: torch.Tensor) -> str:
    """Resolve ``'auto'``: the Triton kernels on CUDA, the PyTorch chunk path elsewhere."""
    if backend == "auto":
        return "triton" if x.is_cuda and triton_available() else "torch"
    if backend == "triton" and not (x.is_cuda or _interpreting()):
        fail("backend", "'triton' only for CUDA tensors (or with TRITON_INTERPRET=1 on CPU)",
             f"tensors on {x.device}")
    return backend


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
