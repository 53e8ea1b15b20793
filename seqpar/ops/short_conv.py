"""Short causal depthwise convolution (the width-w conv in front of q/k/v).

``y_t = act(bias + sum_{j<w} weight[:, j] * x_{t-w+1+j})``; inputs before the start are
zeros, or the ``initial_state``: the last ``w - 1`` inputs before the sequence. The final
state is the last ``w - 1`` inputs (for streaming / generation).

The convolution is a sum of ``w`` shifted copies of the input, one per tap, over the
whole ``(B, T, C)`` tensor at once: batch rows are padded in front by their initial
state (or zeros), and in a packed stream a tap that would reach across a document start
is masked by the token's position in its document (the initial state's value stands in
for it). So the cost is linear in the tokens whatever the number of rows or documents,
there is no Python loop over either, and under ``torch.compile`` the taps fuse into one
kernel forward and backward.

Half-precision inputs are computed in float32: the weight and bias gradients are sums
over every token, and rounding each term to bfloat16 on the way ruins them when the
terms cancel. The products promote to float32 tap by tap, so the input itself is never
copied to float32 (under ``torch.compile`` the taps read the 16-bit input directly).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .validate import check_cu_seqlens, check_tensor, fail

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


def num_sequences(cu_seqlens, B: int, T: int, device) -> int:
    """Validate ``cu_seqlens`` and return the number of sequences N (B, or documents).

    Under ``torch.compile`` only its type, shape and dtype are checked: reading the
    offsets would stop the graph (the eager ops of the same layer read and check them).
    """
    if cu_seqlens is None:
        return B
    if not torch.compiler.is_compiling():
        return len(check_cu_seqlens(cu_seqlens, B, T, device)) - 1
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64), device=device)
    if B != 1:
        fail("cu_seqlens", "batch size B == 1 with packed sequences", f"B = {B}")
    return cu_seqlens.shape[0] - 1


def document_index(cu_seqlens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's document and its position in it: two int64 (T,) tensors on the
    device of ``cu_seqlens`` (no host read).

    A token's document is the number of offsets at or before it, less one (the first
    offset is 0). The search runs over the whole offsets tensor, never a slice of it:
    inductor's CUDA lowering of ``searchsorted`` (torch 2.11) reads the strides of the
    sorted sequence, and a slice of a tensor computed in the same graph (``cu[1:]`` of
    ``cu_seqlens.long()``) has none there (``NotImplementedError: SliceView``).
    """
    cu = cu_seqlens.long()
    t = torch.arange(T, device=cu.device)
    doc = torch.searchsorted(cu, t, right=True) - 1
    return doc, t - cu[doc]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: the initial state's
    gradient is otherwise a transposed view, and collectives that sum it over ranks
    (sequence parallelism) need contiguous buffers."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _conv_rows(xc, wc, head):
    """Batch rows: ``xc`` (B, T, C) after ``head`` (B, w - 1, C); returns the pre-activation
    sum and the padded input."""
    T, w = xc.shape[1], wc.shape[1]
    xp = torch.cat([head, xc], 1)
    y = None
    for j in range(w):  # the taps: w is the (small, fixed) conv width
        term = wc[:, j] * xp[:, j:j + T]
        y = term if y is None else y + term
    return y, xp


def _conv_packed(xc, wc, cu_seqlens, head):
    """One packed row ``xc`` (1, T, C); ``head`` (N, w - 1, C) or None. Tap ``j`` reads
    ``s = w - 1 - j`` tokens back; where that crosses the token's document start it reads
    the document's initial state (or zero) instead."""
    T, w = xc.shape[1], wc.shape[1]
    xp = F.pad(xc, (0, 0, w - 1, 0))
    doc, pos = document_index(cu_seqlens, T)
    y = None
    for j in range(w):
        s = w - 1 - j
        src = xp[:, j:j + T]
        if s == 0:
            term = wc[:, j] * src
        elif head is None:
            term = wc[:, j] * src * (pos >= s).to(src.dtype)[None, :, None]
        else:
            fill = head[doc, (pos + j).clamp(max=w - 2)]  # (T, C): x_{pos - s} from the state
            term = wc[:, j] * torch.where((pos >= s)[None, :, None], src, fill[None])
        y = term if y is None else y + term
    return y


def _final_packed(xc, cu_seqlens, head, w: int):
    """Last ``w - 1`` inputs of each packed document, (N, C, w - 1); from the initial
    state (or zero) where a document is shorter than that."""
    cu = cu_seqlens.long()
    starts, ends = cu[:-1], cu[1:]
    m = torch.arange(w - 1, device=xc.device)
    idx = ends[:, None] - (w - 1) + m  # (N, w - 1) stream positions
    inside = idx >= starts[:, None]
    vals = xc[0, idx.clamp(min=0)]  # (N, w - 1, C)
    if head is None:
        fill = torch.zeros_like(vals)
    else:
        at = ((ends - starts)[:, None] + m).clamp(max=w - 2)  # index into [head, doc]
        fill = head.gather(1, at[..., None].expand(-1, -1, head.shape[-1]))
    return torch.where(inside[..., None], vals, fill).transpose(1, 2)


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
    N = num_sequences(cu_seqlens, B, T, x.device)
    cd = _compute_dtype(x)
    head = None
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(N, C, w - 1))
        head = _ContiguousGrad.apply(initial_state).transpose(1, 2).to(cd)  # (N, w - 1, C)
    # The input stays in its dtype: each tap's product with the float32 weight promotes
    # to float32 (exactly), so no float32 copy of the whole input is made or saved.
    xc, wc = x, weight.to(cd)
    if cu_seqlens is None or w == 1:  # width 1 never reaches back: rows and documents alike
        if head is None:
            head = xc.new_zeros(B, w - 1, C)
        elif head.dtype != xc.dtype:
            xc = xc.to(cd)
        y, xp = _conv_rows(xc, wc, head.reshape(B, w - 1, C))
        final = xp[:, T:].transpose(1, 2) if output_final_state else None
        if final is not None and cu_seqlens is not None:
            final = final.reshape(N, C, 0)
    else:
        y = _conv_packed(xc, wc, cu_seqlens, head)
        final = _final_packed(xc, cu_seqlens, head, w) if output_final_state else None
    if bias is not None:
        y = y + bias.to(cd)
    y = _act(y, activation).to(x.dtype)
    return y, (None if final is None else final.to(x.dtype))


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
            else [(0, a, e) for a, e in itertools.pairwise(offsets)])
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
