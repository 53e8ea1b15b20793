"""Small pieces shared by the SP ops."""
from __future__ import annotations

import torch

from ..ops.validate import host_offsets

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64)


def dtype_code(x) -> int:
    """A small int naming a tensor's dtype (index into ``DTYPES``; -1 for None), for
    ``SequenceParallel._agree``."""
    if x is None:
        return -1
    dtype = getattr(x, "dtype", None)
    return DTYPES.index(dtype) if dtype in DTYPES else -2


def offsets_digest(cu_seqlens) -> dict:
    """Two ints that differ when two ``cu_seqlens`` differ (almost surely)."""
    if not isinstance(cu_seqlens, torch.Tensor):  # None, or garbage the local checks reject
        code = -1 if cu_seqlens is None else -2
        return {"cu_seqlens length": code, "cu_seqlens digest": code}
    # a 1-D tensor through the validator's host copy: one device read per tensor
    offsets = host_offsets(cu_seqlens) if cu_seqlens.dim() == 1 else cu_seqlens.tolist()
    return {"cu_seqlens length": len(offsets),
            "cu_seqlens digest": sum((i + 1) * o for i, o in enumerate(offsets)) % (1 << 61)}
