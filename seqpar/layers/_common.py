"""What every mixer layer shares: the input checks and the cache/step contract.

A mixer maps ``x (B, T, D)`` to ``(y (B, T, D), cache)``. ``cache`` is ``None`` unless
``output_state=True``; then it is the mixer's generation cache after the last token
(recurrent + short-conv state for linear layers, keys/values for attention, the input
history for Hyena). ``state=`` continues from such a cache, so
``forward(x[:, :s], output_state=True)`` followed by ``forward(x[:, s:], state=...)``
(or one :meth:`Mixer.step` per token) equals ``forward(x)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import fail
from ..ops.validate import check_tensor


def _call(op, *args, **kwargs):
    return op(*args, **kwargs)


# ``_call`` behind torch.compiler.disable, made when the first mixer is built rather than at
# import: the disable wrapper imports torch._dynamo, which imports triton, and importing
# seqpar must leave triton's set-up (e.g. TRITON_INTERPRET) to the caller.
_graph_break = None


def use_graph_breaks() -> None:
    """Make :func:`call_eager` a ``torch.compile`` graph break (every :class:`Mixer` calls
    this when built)."""
    global _graph_break
    if _graph_break is None:
        _graph_break = torch.compiler.disable(_call)


def call_eager(op, *args, **kwargs):
    """``op(*args, **kwargs)`` outside any ``torch.compile`` graph.

    Layers call the ops that launch their own kernels (the linear family, softmax
    attention, the long convolution, and every op under sequence parallelism) through
    this: they read the packed offsets on the host and choose kernels by them, which a
    graph would have to specialize on (one recompilation per batch), and compiling them
    would fuse nothing. A compiled block breaks its graph here and fuses what lies
    around each call (norms, projections' epilogues, gates, the short convolution).
    """
    if _graph_break is not None:
        return _graph_break(op, *args, **kwargs)
    return op(*args, **kwargs)


class RMSNorm(nn.Module):
    """RMS normalization over the last dimension with a learned scale, as
    ``nn.RMSNorm`` (same ``weight`` parameter), but with the weight cast to the input's
    dtype: under autocast a bfloat16 input meets a float32 weight, and only matching
    dtypes take PyTorch's fused kernel (which accumulates in float32 either way)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., dim) -> (..., dim) in x's dtype."""
        return F.rms_norm(x, (self.dim,), self.weight.to(x.dtype), self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


def check_hidden(x, d_model: int) -> tuple[int, int]:
    """Check a mixer input ``(B, T, D)`` with ``T >= 1``; return ``(B, T)``."""
    check_tensor("x", x, ndim=3)
    if x.shape[-1] != d_model:
        fail("x", f"last dimension d_model = {d_model}", f"shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        fail("x", "at least one token (T >= 1)", f"shape {tuple(x.shape)}")
    return x.shape[0], x.shape[1]


def check_cache_args(state, output_state, cu_seqlens, sp) -> None:
    """Generation caches are per batch row on one device: refuse them with packed
    sequences or sequence parallelism rather than return a cache of unclear meaning."""
    if not isinstance(output_state, bool):
        fail("output_state", "a bool", type(output_state).__name__)
    if state is None and not output_state:
        return
    if cu_seqlens is not None:
        fail("cu_seqlens", "None when a generation cache is passed or requested (state=/output_state=)",
             "packed offsets")
    if sp is not None:
        fail("sp", "None when a generation cache is passed or requested (state=/output_state=)",
             type(sp).__name__)


class Mixer(nn.Module):
    """Base of every sequence-mixer layer.

    Subclasses set ``d_model`` and ``cache_type`` (the dataclass of their generation
    cache) and implement ``forward(x, *, cu_seqlens=None, position_ids=None, sp=None,
    state=None, output_state=False) -> (y, cache)``, ``reset_parameters(std, out_std)``
    and ``flops_per_token(seq_len)``.
    """

    d_model: int
    cache_type: type

    def __init__(self):
        super().__init__()
        use_graph_breaks()

    def check_state(self, state, cu_seqlens, sp, output_state) -> None:
        """Validate forward's cache arguments (see :func:`check_cache_args`)."""
        check_cache_args(state, output_state, cu_seqlens, sp)
        if state is not None and not isinstance(state, self.cache_type):
            fail("state", f"a {self.cache_type.__name__} or None", type(state).__name__)

    def check_step(self, x, cache) -> None:
        """Validate a step's one token ``x (B, 1, D)`` and its cache."""
        if not isinstance(cache, self.cache_type):
            fail("cache", f"a {self.cache_type.__name__} (from forward(..., output_state=True) "
                 "or step())", type(cache).__name__)
        B, T = check_hidden(x, self.d_model)
        if T != 1:
            fail("x", "one token per step, shape (B, 1, D)", f"shape {tuple(x.shape)}")

    def step(self, x: torch.Tensor, cache):
        """One generation step: ``x (B, 1, D)`` and the cache from the previous call (a
        prefill ``forward(..., output_state=True)`` or ``step``). Returns ``(y (B, 1, D),
        cache)``. The default runs :meth:`forward` on the one token with the cache."""
        self.check_step(x, cache)
        return self.forward(x, state=cache, output_state=True)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) of the sequence-mixing work
        that the model's ``6 N`` count of projection weights leaves out."""
        raise NotImplementedError
