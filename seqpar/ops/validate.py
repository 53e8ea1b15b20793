"""Input checks shared by every op.

Each check raises ``ValueError`` whose message names the argument, what was expected
and what came, so a wrong call fails before any work and never gives a silent wrong
answer.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import torch

# Re-exported: the ops and the SP wrappers take ``fail`` from here with the other checks.
from .._checks import fail as fail

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "torch", "triton")


def check_tensor(name: str, x, *, ndim: int | None = None, shape: Sequence | None = None,
                 dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
                 device: torch.device | None = None) -> torch.Tensor:
    """Check type, rank, shape (``None`` entries match anything), dtype and device."""
    if not isinstance(x, torch.Tensor):
        fail(name, "a torch.Tensor", type(x).__name__)
    if ndim is not None and x.dim() != ndim:
        fail(name, f"a {ndim}-D tensor", f"shape {tuple(x.shape)} ({x.dim()}-D)")
    if shape is not None:
        if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            fail(name, f"shape {want}", f"shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        fail(name, f"dtype in {names}", str(x.dtype).replace("torch.", ""))
    if device is not None and x.device != device:
        fail(name, f"a tensor on {device} (the device of q)", f"a tensor on {x.device}")
    return x


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        fail("backend", "one of " + ", ".join(repr(b) for b in BACKENDS), repr(backend))
    return backend


def check_chunk_size(chunk_size) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        fail("chunk_size", "a positive int", repr(chunk_size))
    return chunk_size


# The cu_seqlens tensor read to the host last, its version counter and its values. Every
# layer of a packed model step passes the same tensor, and reading a CUDA tensor to the
# host waits for the device queue to drain: read per layer, the host stalled once per
# layer and could not queue the next layer's kernels ahead. A weak reference (so a freed
# tensor whose id is reused never matches) plus the version counter (bumped by in-place
# writes) decide that the cached values are still the tensor's.
_last_read: tuple = (None, -1, ())


def host_offsets(cu_seqlens: torch.Tensor) -> list[int]:
    """``cu_seqlens`` as a Python list, read from the device only when it is not the
    tensor read last or has been written in place since."""
    global _last_read
    ref, version, offsets = _last_read
    compiling = torch.compiler.is_compiling()
    if compiling or ref is None or ref() is not cu_seqlens or cu_seqlens._version != version:
        offsets = tuple(int(x) for x in cu_seqlens.tolist())
        if not compiling:
            _last_read = (weakref.ref(cu_seqlens), cu_seqlens._version, offsets)
    return list(offsets)


def remember_offsets(cu_seqlens: torch.Tensor, offsets: Sequence[int]) -> None:
    """Record that ``cu_seqlens`` holds ``offsets``: values the caller read on the host
    before copying the tensor to the device, so that :func:`host_offsets` returns them
    without reading the device (a training step then never waits for the GPU)."""
    global _last_read
    _last_read = (weakref.ref(cu_seqlens), cu_seqlens._version, tuple(int(x) for x in offsets))


def check_cu_seqlens(cu_seqlens, batch: int, length: int, device: torch.device) -> list[int] | None:
    """Validate packed-sequence offsets and return them as a Python list.

    ``cu_seqlens`` is int32 (int64 is accepted) of shape ``(N + 1,)``: it starts at 0,
    strictly increases (no empty document) and ends at the packed length ``T``; it
    requires ``B == 1``.
    """
    if cu_seqlens is None:
        return None
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=device)
    if batch != 1:
        fail("cu_seqlens", "batch size B == 1 with packed sequences (concatenate documents along T)", f"B = {batch}")
    if cu_seqlens.numel() < 2:
        fail("cu_seqlens", "at least two offsets [0, ..., T]", f"{cu_seqlens.numel()} offset(s)")
    offsets = host_offsets(cu_seqlens)
    if offsets[0] != 0:
        fail("cu_seqlens", "first offset 0", f"first offset {offsets[0]}")
    if offsets[-1] != length:
        fail("cu_seqlens", f"last offset equal to the sequence length T = {length}", f"last offset {offsets[-1]}")
    for a, b in zip(offsets, offsets[1:]):
        if b <= a:
            fail("cu_seqlens", "strictly increasing offsets (no empty documents)", f"{a} followed by {b}")
    return offsets


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        fail("scale", "a float or None", type(scale).__name__)
    if not 0 < scale < float("inf"):
        fail("scale", "a positive finite float or None", scale)
    return float(scale)


def check_step_state(state, q: torch.Tensor, v: torch.Tensor) -> None:
    """A one-token step's state: a tensor (B, H, K, V) for q (B, H, K) and v (B, H, V)."""
    for name, x in (("q", q), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            fail(name, "a (B, H, D) tensor for one token",
                 tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__)
    want = (*q.shape, v.shape[-1])
    if not isinstance(state, torch.Tensor) or tuple(state.shape) != want:
        fail("state", f"a tensor of shape (B, H, K, V) = {want}",
             tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__)


def autocast_inputs(op):
    """Decorator for an op whose first three arguments are q, k, v (positional or by
    name): under autocast for q's device type, the op runs on q, k and v cast to the
    autocast dtype with autocast off inside, so that it keeps its own precision rules
    (float32 states and accumulation), as ``torch.amp.custom_fwd(cast_inputs=...)``
    does; elsewhere it runs on them as given, and one dtype is required. Layers give
    mixed dtypes under CUDA autocast, which runs norms in float32: ``F.normalize`` of q
    and k comes back float32 beside a bf16 v (CPU autocast keeps norms in bf16, so CPU
    tests alone would not see it)."""
    names = ("q", "k", "v")

    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        q = args[0] if args else kwargs.get("q")
        if not (isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type)):
            return op(*args, **kwargs)
        dtype = torch.get_autocast_dtype(q.device.type)

        def cast(x):
            return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        args = [cast(x) if i < len(names) else x for i, x in enumerate(args)]
        kwargs = {n: cast(x) if n in names else x for n, x in kwargs.items()}
        with torch.autocast(q.device.type, enabled=False):
            return op(*args, **kwargs)

    return wrapper


def check_qkv(q, k, v):
    """Check the (B, T, H, K) / (B, T, H, V) layout shared by the linear family.

    Returns ``(B, T, H, K, V)``.
    """
    check_tensor("q", q, ndim=4)
    B, T, H, K = q.shape
    if T == 0:
        fail("q", "at least one token (T >= 1)", f"shape {tuple(q.shape)}")
    check_tensor("k", k, shape=(B, T, H, K), dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, shape=(B, T, H, None))
    return B, T, H, K, v.shape[-1]


def check_gate(name: str, g, shape: Sequence, device: torch.device) -> torch.Tensor:
    """Gates may be any float dtype; they are computed in float32."""
    return check_tensor(name, g, shape=shape, device=device)


def check_state(name: str, state, shape: Sequence, device: torch.device):
    if state is None:
        return None
    return check_tensor(name, state, shape=shape, device=device)
