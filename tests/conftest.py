"""Shared test helpers: the relative-error metric of the precision contract and the
hypothesis profiles.

Profiles: ``ci`` (default) and ``dev`` (few examples, for quick local runs); pick one
with ``--hypothesis-profile`` or ``HYPOTHESIS_PROFILE``. Tests draw their own seeds
(never ``torch.manual_seed`` globally), so a failing example replays from hypothesis'
report.
"""
from __future__ import annotations

import os

import torch
from hypothesis import settings

# Float64 reference loops make examples slow and uneven, so no deadline.
settings.register_profile("ci", deadline=None, derandomize=False, print_blob=True)
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=5)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# A gradient can be (nearly) zero while the terms it sums are not: mLSTM's dq, dk, di
# vanish by scale invariance when T = 1 and the normalizer is active, and gradients
# of initial states decay into float32's subnormal range under strong decays (to ~1e-47
# within 61 tokens, which every float32 engine returns as 0). Relative error then
# measures round-off against ~0, in any float32 implementation. So a gradient's error is
# taken relative to at least GRAD_FLOOR times the RMS of the case's largest gradient (per
# element): such a gradient must still be right to 1e-6 (float32) of the typical
# gradient in absolute terms.
GRAD_FLOOR = 1e-2


def grad_errors(names, grads, grads_ref) -> dict[str, float]:
    """``{'d' + name: relative error}`` of each gradient against its reference, with the
    :data:`GRAD_FLOOR` denominator floor."""
    rms = max(g.detach().double().pow(2).mean().sqrt().item() for g in grads_ref)
    return {f"d{n}": rel_err(a, b, floor=GRAD_FLOOR * rms * b.numel() ** 0.5)
            for n, a, b in zip(names, grads, grads_ref)}


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """Relative L2 error ``||a - b|| / max(||b||, floor)`` in float64 (DESIGN.md's metric).

    ``b`` is the reference. ``floor`` bounds the denominator from below for references
    that are (near) zero; with the default 0, an exactly-zero reference gives the absolute
    error ``||a||``. NaN or inf anywhere gives NaN or inf, which fails every ``<``.
    """
    if a.shape != b.shape:
        raise ValueError(f"rel_err: expected equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).norm().item()
    ref = max(b.norm().item(), floor)
    return diff / ref if ref > 0 else diff
