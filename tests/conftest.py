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
