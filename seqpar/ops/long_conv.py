"""Long causal convolution (Hyena / H3 style), computed by FFT in O(T log T).

``y_t = sum_{u <= t} kernel[:, u] * x_{t-u}`` with a per-channel kernel of length
``L <= T`` (zero past L). A circular convolution of length ``n >= T + L - 1`` equals the
linear one on the first T outputs (nothing wraps around into them); ``n`` is rounded up
to a 2^a 3^b 5^c size, which FFT libraries handle fastest.

Packed documents (``cu_seqlens``): lags never reach across a document start. Documents
are grouped by length class (the power of two at or above their length), each class
gathered into one zero-padded ``(n_docs, P, C)`` batch and convolved by one batched FFT,
and the outputs added back into the stream; the padded work is under twice the stream
and the number of FFT calls is at most ``log2 T + 1``, whatever the number of documents.
"""
from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

from .validate import check_cu_seqlens, check_tensor, fail


def next_fast_len(m: int) -> int:
    """Smallest ``2^a 3^b 5^c >= m`` (``m >= 1``)."""
    best = 1 << (m - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < m:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def _check(x, kernel):
    """Validate ``x`` (B, T, C) and ``kernel`` (C, L); returns ``(B, T, C, L)``."""
    check_tensor("x", x, ndim=3)
    B, T, C = x.shape
    if T == 0:
        fail("x", "at least one token (T >= 1)", f"shape {tuple(x.shape)}")
    check_tensor("kernel", kernel, ndim=2, device=x.device)
    check_tensor("kernel", kernel, shape=(C, None))
    L = kernel.shape[1]
    if L < 1:
        fail("kernel", "a length L >= 1 (shape (C, L))", f"shape {tuple(kernel.shape)}")
    return B, T, C, L


def _check_length(L: int, T: int) -> None:
    if L > T:
        fail("kernel", f"a length L <= T = {T} (shape (C, L))", f"L = {L}")


def long_conv(x, kernel, cu_seqlens=None, sp=None):
    """Causal per-channel long convolution by FFT.

    Args:
        x: (B, T, C) float16/bfloat16/float32/float64.
        kernel: (C, L), 1 <= L <= T, any float dtype.
        cu_seqlens: int32 (N + 1,) offsets of packed documents (B == 1) or None; each
            document is convolved on its own (the first ``len`` kernel taps apply).
        sp: a ``seqpar.parallel.SequenceParallel``; each rank passes its own shard of x,
            the whole kernel and the global ``cu_seqlens`` (L is then checked against the
            global length by sp).
    Returns:
        y: (B, T, C) in x's dtype. Computed in float32 (float64 if x or the kernel is
        float64).
    """
    B, T, C, L = _check(x, kernel)
    if sp is not None:
        return sp.long_conv(x, kernel, cu_seqlens=cu_seqlens)
    _check_length(L, T)
    offsets = check_cu_seqlens(cu_seqlens, B, T, x.device)
    if offsets is None:
        return _fft_conv(x, kernel)
    y = x.new_zeros(T, C)
    for P, index, valid in _length_classes(tuple(offsets), x.device):
        n, flat, valid = index.shape[0], index.flatten(), valid.to(x.dtype)
        xs = x[0].index_select(0, flat).view(n, P, C) * valid
        ys = _fft_conv(xs, kernel[:, :min(L, P)]) * valid
        y = y.index_add(0, flat, ys.flatten(0, 1))
    return y[None]


@functools.lru_cache(maxsize=64)
def _length_classes(offsets: tuple[int, ...], device: torch.device):
    """For each length class P (a power of two) of the documents in ``offsets``:
    ``(P, index, valid)`` with ``index`` int64 (n, P) the stream positions of the class's
    n documents padded to P (clamped into the stream) and ``valid`` (n, P, 1) float32, 1
    on real tokens. Cached per offsets: every Hyena layer of a step shares them."""
    T = offsets[-1]
    classes: dict[int, list[int]] = {}
    for s, e in itertools.pairwise(offsets):
        classes.setdefault(1 << (e - s - 1).bit_length(), []).append(s)
    out = []
    for P, starts in sorted(classes.items()):
        lengths = torch.tensor([b - a for a, b in itertools.pairwise(offsets) if a in set(starts)])
        pos = torch.tensor(starts)[:, None] + torch.arange(P)
        valid = (torch.arange(P) < lengths[:, None]).float()[..., None]
        out.append((P, _to_device(pos.clamp(max=T - 1), device), _to_device(valid, device)))
    return out


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without blocking the host (pinned, asynchronous)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def _fft_conv(x, kernel):
    T, L = x.shape[1], kernel.shape[1]
    cd = torch.promote_types(torch.promote_types(x.dtype, kernel.dtype), torch.float32)
    n = next_fast_len(T + L - 1)
    xf = torch.fft.rfft(x.to(cd), n=n, dim=1)  # (B, n//2+1, C)
    kf = torch.fft.rfft(kernel.to(cd), n=n, dim=1).t()  # (n//2+1, C)
    y = torch.fft.irfft(xf * kf, n=n, dim=1)[:, :T]
    return y.to(x.dtype)


def long_conv_reference(x, kernel, lags: int = 256, cu_seqlens=None):
    """Float64 reference of :func:`long_conv`: the direct sum over lags, ``lags`` at a
    time (each block of lags is one product with sliding windows of the zero-padded x),
    per packed document when ``cu_seqlens`` is given."""
    B, T, C, L = _check(x, kernel)
    _check_length(L, T)
    offsets = check_cu_seqlens(cu_seqlens, B, T, x.device)
    if offsets is not None:
        return torch.cat([_direct_conv(x[:, s:e], kernel[:, :e - s], lags)
                          for s, e in itertools.pairwise(offsets)], 1)
    return _direct_conv(x, kernel, lags)


def _direct_conv(x, kernel, lags):
    T, L = x.shape[1], kernel.shape[1]
    xd, kd = x.to(torch.float64), kernel.to(torch.float64)
    xp = F.pad(xd, (0, 0, L - 1, 0))  # xp[t + L - 1 - u] = x_{t-u}, zero for t < u
    y = torch.zeros_like(xd)
    for u0 in range(0, L, lags):
        U = min(lags, L - u0)
        # window m of output t holds x_{t-u} for lag u = u0 + U - 1 - m
        win = xp[:, L - u0 - U:L - u0 - U + T + U - 1].unfold(1, U, 1)  # (B, T, C, U)
        y = y + torch.einsum("btcm,cm->btc", win, kd[:, u0:u0 + U].flip(-1))
    return y
