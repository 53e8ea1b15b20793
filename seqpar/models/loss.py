"""Cross-entropy of a language-model head without whole ``(tokens, vocab)`` logits.

:func:`linear_cross_entropy` runs the head and the loss over chunks of tokens. Each
chunk's float32 logits live only inside the forward: the gradients with respect to the
hidden states and the head weight are computed there too (softmax minus the one-hot
target), so nothing of vocabulary size is kept for the backward, which only scales
them by the incoming gradient. Peak memory is one chunk's logits instead of all of
them, at no extra matmul (a checkpointed head would recompute the logits).
"""
from __future__ import annotations

import torch

from ..ops.validate import check_tensor, fail

# Tokens per chunk: (CHUNK, vocab) float32 logits at a time.
CHUNK = 4096


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The head's matmul dtype: autocast's where it is on (as ``nn.Linear`` would run),
    else the hidden states'."""
    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk: int, cd, grads: bool):
        w, acc = weight.to(cd), torch.promote_types(cd, torch.float32)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        dh = torch.empty_like(hidden) if grads else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if grads else None
        for s in range(0, hidden.shape[0], chunk):  # chunks of tokens, not of documents
            h, t = hidden[s:s + chunk].to(cd), targets[s:s + chunk]
            keep = t != ignore_index
            t = torch.where(keep, t, 0)[:, None]
            logits = (h @ w.t()).to(acc)
            lse = logits.logsumexp(-1)
            total += torch.where(keep, lse - logits.gather(1, t)[:, 0], 0.0).sum()
            if grads:
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                g.scatter_add_(1, t, torch.full_like(t, -1, dtype=g.dtype))
                g = (g * keep[:, None]).to(cd)
                dh[s:s + chunk] = g @ w
                dw += (g.t() @ h).to(acc)
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        if dh is None:
            raise RuntimeError("linear_cross_entropy: the forward ran without gradients "
                               "(under torch.no_grad); it cannot be differentiated")
        return ((dh * grad.to(dh.dtype)), (dw * grad).to(ctx.weight_dtype),
                None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = -100, chunk: int = CHUNK) -> torch.Tensor:
    """Summed token cross-entropy of the logits ``hidden @ weight.T``.

    Args:
        hidden: (N, D) float hidden states (after the final norm).
        weight: (V, D) the head's weight.
        targets: (N,) int64 token ids in [0, V), or ``ignore_index`` (contributes 0).
        chunk: tokens per chunk of float32 logits.
    Returns:
        the scalar sum of ``logsumexp(logits_i) - logits_i[target_i]`` over the kept
        tokens, float32 (float64 for float64 input), differentiable with respect to hidden
        and weight. The head runs in autocast's dtype where autocast is on, the loss in
        float32.
    """
    check_tensor("hidden", hidden, ndim=2)
    N, D = hidden.shape
    check_tensor("weight", weight, ndim=2, device=hidden.device)
    if weight.shape[1] != D:
        fail("weight", f"shape (V, {D})", f"shape {tuple(weight.shape)}")
    check_tensor("targets", targets, shape=(N,), dtypes=(torch.int64, torch.int32), device=hidden.device)
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        fail("chunk", "an int >= 1", repr(chunk))
    grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets.long(), ignore_index, chunk,
                                     _compute_dtype(hidden), grads)
