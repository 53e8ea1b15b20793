"""Short causal depthwise convolution (the width-w conv in front of q/k/v).

``y_t = act(bias + sum_{j<w} weight[:, j] * x_{t-w+1+j})``; inputs before the start are
zeros, or the ``initial_state``: the last ``w - 1`` inputs before the sequence. The final
state is the last ``w - 1`` inputs (for streaming / generation).

Every sequence (batch row, or packed document) is laid out as ``[state, x]`` along time,
all sequences are concatenated and one grouped ``F.conv1d`` without padding runs over
the whole stream; the outputs whose window would straddle two sequences are dropped.
That keeps packed documents apart without a Python loop of kernel launches.

Half-precision inputs are computed in float32: the weight and bias gradients are sums
over every token, and rounding each term to bfloat16 on the way (in the activation's and
the convolution's backward) ruins them when the terms cancel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_cu_seqlens, check_tensor, fail

ACTIVATIONS = (None, "silu")


def _act(y: torch.Tensor, activation) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_params(C: int, device, weight, bias, activation) -> int:
    """Validate weight (C, w), bias (C,) and the activation name; returns w."""
    check_tensor("weight", weight, ndim=2, device=device)
    check_tensor("weight", weight, shape=(C, None))
    w = weight.shape[1]
    if w < 1:
        fail("weight", "a width w >= 1 (shape (C, w))", f"shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, shape=(C,), device=device)
    if activation not in ACTIVATIONS:
        fail("activation", "None or 'silu'", repr(activation))
    return w


def _check(x, weight, bias, activation, initial_state, output_final_state):
    """Validate a full-sequence call; returns ``(B, T, C, w)``."""
    check_tensor("x", x, ndim=3)
    B, T, C = x.shape
    if T == 0:
        fail("x", "at least one token (T >= 1)", f"shape {tuple(x.shape)}")
    w = _check_params(C, x.device, weight, bias, activation)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(None, C, w - 1), device=x.device)
    if not isinstance(output_final_state, bool):
        fail("output_final_state", "a bool", type(output_final_state).__name__)
    return B, T, C, w


def short_conv(x, weight, bias=None, activation="silu", initial_state=None,
               output_final_state=False, cu_seqlens=None, sp=None):
    """Causal depthwise convolution of width w.

    Args:
        x: (B, T, C) float16/bfloat16/float32/float64.
        weight: (C, w), w >= 1; bias: (C,) or None; any float dtype.
        activation: None or 'silu'.
        initial_state: (N, C, w - 1): the last w - 1 inputs before each sequence (N = B,
            or the number of documents when packed); None means zeros.
        output_final_state: also return the last w - 1 inputs of each sequence.
        cu_seqlens: int32 (N + 1,) document offsets of packed input (B == 1); documents
            never see each other.
        sp: a ``seqpar.parallel.SequenceParallel``; each rank passes its own shard.
    Returns:
        y: (B, T, C) in x's dtype; final state (N, C, w - 1) in x's dtype, or None.
        Computed in float32 (float64 for float64 x).
    """
    B, T, C, w = _check(x, weight, bias, activation, initial_state, output_final_state)
    if sp is not None:
        return sp.short_conv(x, weight, bias, activation=activation, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    offsets = check_cu_seqlens(cu_seqlens, B, T, x.device)
    if offsets is None:
        offsets = list(range(0, B * T + 1, T))
    N = len(offsets) - 1
    cd = _compute_dtype(x)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(N, C, w - 1))
        head = initial_state.to(cd)
    else:
        head = x.new_zeros(N, C, w - 1, dtype=cd)

    stream = x.reshape(B * T, C).t().to(cd)  # (C, B*T): batch rows are sequences like documents
    pieces = []
    for i, (a, b) in enumerate(zip(offsets, offsets[1:])):
        pieces += [head[i], stream[:, a:b]]
    ext = torch.cat(pieces, 1)  # (C, B*T + N (w-1)): sequence i starts at a_i + i (w-1)
    bias_ = None if bias is None else bias.to(cd)
    y_ext = F.conv1d(ext[None], weight.to(cd)[:, None, :], bias_, groups=C)[0]

    # sequence i's outputs are y_ext[:, a_i + i (w-1) : b_i + i (w-1)]. Taken as slices,
    # whose backward is a copy: a gather by index would have a sorting scatter as its
    # backward, one of the most expensive kernels of a training step on a GPU.
    y = torch.cat([y_ext[:, a + i * (w - 1):b + i * (w - 1)]
                   for i, (a, b) in enumerate(zip(offsets, offsets[1:]))], 1)
    y = _act(y, activation).t().reshape(B, T, C).to(x.dtype)
    if not output_final_state:
        return y, None
    ends = torch.tensor(offsets[1:], device=x.device) + torch.arange(N, device=x.device) * (w - 1)
    final = ext[:, ends[:, None] + torch.arange(w - 1, device=x.device)]  # (C, N, w-1)
    return y, final.transpose(0, 1).to(x.dtype)


def short_conv_step(x, weight, bias=None, activation="silu", state=None):
    """One token of :func:`short_conv` for generation.

    Args:
        x: (B, C); weight (C, w); bias (C,) or None; state (B, C, w - 1) (the last w - 1
            inputs) or None for zeros.
    Returns:
        y (B, C) and the new state (B, C, w - 1), in x's dtype (computed as
        :func:`short_conv` does).
    """
    check_tensor("x", x, ndim=2)
    B, C = x.shape
    w = _check_params(C, x.device, weight, bias, activation)
    if state is None:
        state = x.new_zeros(B, C, w - 1)
    check_tensor("state", state, shape=(B, C, w - 1), device=x.device)
    cd = _compute_dtype(x)
    window = torch.cat([state.to(cd), x[..., None].to(cd)], -1)
    y = (window * weight.to(cd)).sum(-1)
    if bias is not None:
        y = y + bias.to(cd)
    return _act(y, activation).to(x.dtype), window[..., 1:].to(x.dtype)


def short_conv_reference(x, weight, bias=None, activation="silu", initial_state=None,
                         output_final_state=False, cu_seqlens=None):
    """Float64 reference of :func:`short_conv`: a direct sum over the w taps per document.

    Returns y (B, T, C) and the final state (N, C, w - 1), float64.
    """
    B, T, C, w = _check(x, weight, bias, activation, initial_state, output_final_state)
    offsets = check_cu_seqlens(cu_seqlens, B, T, x.device)
    docs = ([(b, 0, T) for b in range(B)] if offsets is None
            else [(0, a, e) for a, e in zip(offsets, offsets[1:])])
    wd = weight.to(torch.float64)
    ys, finals = [], []
    for i, (b, a, e) in enumerate(docs):
        xs = x[b, a:e].to(torch.float64)  # (L, C)
        head = (torch.zeros(w - 1, C, dtype=torch.float64, device=x.device) if initial_state is None
                else initial_state[i].to(torch.float64).t())
        ext = torch.cat([head, xs], 0)  # ext[t + j] is x_{t-w+1+j}
        y = sum(wd[:, j] * ext[j:j + e - a] for j in range(w))
        if bias is not None:
            y = y + bias.to(torch.float64)
        ys.append(_act(y, activation))
        finals.append(ext[ext.shape[0] - (w - 1):].t())
    y = torch.stack(ys) if offsets is None else torch.cat(ys)[None]
    return y, (torch.stack(finals) if output_final_state else None)
