"""Hyena operator (Poli et al. 2023), order 2, as a mixer layer.

``x -> [x0|x1|v] projection -> short causal conv (no activation) -> z = v * x1 ->
z = long_conv(z, h) + bias * z -> y = z * x0 -> output projection``.

The long filter ``h (D, L)`` is implicit: a small MLP with sine activations over
positional features of the lag ``u`` (``u / time_scale`` and Fourier features), times an
exponential window ``exp(-alpha_c u / time_scale)`` with per-channel rates from fast to
slow. Lags are normalized by the fixed ``time_scale`` (not by the input length), so the
filter at lag ``u`` does not depend on how long the input is: a shard, a full sequence
and a generation prefix all see the same filter.

Generation cache: the input history. :meth:`Hyena.step` recomputes the block over the
whole history and keeps the last output, O(t log t) per token; simple and exact, and
Hyena layers are rare in hybrids. (A constant-cost step would need the filter
distilled into a recurrence, as in Massaroli et al. 2023.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .. import ops
from .._checks import check_positive_int
from ._common import Mixer, call_eager, check_hidden


class _Sin(nn.Module):
    """``sin(w * x)`` with a learnable frequency per feature (Hyena's filter activation)."""

    def __init__(self, dim: int, w: float = 1.0):
        super().__init__()
        self.w0 = w
        self.freq = nn.Parameter(torch.full((dim,), w))

    def reset_parameters(self):
        nn.init.constant_(self.freq, self.w0)

    def forward(self, x):
        return torch.sin(self.freq * x)


class ImplicitFilter(nn.Module):
    """Long-convolution kernel ``h (channels, L)`` float32 from an MLP over lag features.

    Args:
        channels: number of channels C.
        time_scale: lag normalization (the context length the model is built for).
        emb_dim: positional features (odd: 1 linear + (emb_dim-1)/2 frequency bands
            as cos and sin).
        hidden: MLP width.
        fast_decay_pct, slow_decay_pct, target: Hyena's window: channel c decays to
            ``target`` after a fraction of ``time_scale`` between fast and slow.
    """

    def __init__(self, channels: int, *, time_scale: int, emb_dim: int = 33, hidden: int = 64,
                 fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5, target: float = 1e-2):
        super().__init__()
        self.channels, self.time_scale = channels, check_positive_int("time_scale", time_scale)
        self.bands = (emb_dim - 1) // 2
        self.mlp = nn.Sequential(
            nn.Linear(1 + 2 * self.bands, hidden), _Sin(hidden),
            nn.Linear(hidden, hidden), _Sin(hidden),
            nn.Linear(hidden, channels, bias=False))
        self.register_buffer("rates", torch.empty(channels), persistent=False)
        self._decay = (math.log(target) / slow_decay_pct, math.log(target) / fast_decay_pct)
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.mlp:
            m.reset_parameters()
        with torch.no_grad():
            self.rates.copy_(torch.linspace(*self._decay, self.channels).abs())

    def forward(self, L: int) -> torch.Tensor:
        """The kernel for lags ``0..L-1``: (C, L) in float32, or float64 when the
        parameters are float64; also under autocast and with bf16/fp16 parameters, which
        are then upcast (the filter is tiny and its precision sets the whole
        convolution's)."""
        dev = self.rates.device
        dtype = torch.promote_types(self.mlp[0].weight.dtype, torch.float32)
        t = torch.arange(L, device=dev, dtype=torch.float64) / self.time_scale
        f = torch.linspace(1e-4, self.bands - 1, self.bands, device=dev, dtype=torch.float64)
        ang = 2 * math.pi * f * t[:, None]
        z = torch.cat([t[:, None], ang.cos(), -ang.sin()], -1).to(dtype)
        with torch.autocast(dev.type, enabled=False):
            # In the parameters' dtype: float32, or bfloat16 under FSDP mixed precision.
            h = self.mlp(z.to(self.mlp[0].weight.dtype)).float()  # (L, C)
        window = torch.exp(-t.float()[:, None] * self.rates)
        return (h * window).t()


@dataclass
class HyenaCache:
    """Generation cache of a Hyena layer: every input so far, (B, S, D)."""
    x: torch.Tensor


class Hyena(Mixer):
    """Hyena block (order 2) over ``d_model`` channels.

    Args:
        d_model: width D (the block mixes each channel separately).
        conv_size: short conv width.
        time_scale: the implicit filter's lag normalization (model context length).
        filter_hidden: the filter MLP's width.
    """

    cache_type = HyenaCache

    def __init__(self, d_model: int, *, conv_size: int = 4, time_scale: int = 2048,
                 filter_hidden: int = 64):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.conv_size = check_positive_int("conv_size", conv_size)
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * d_model, conv_size))
        self.filter = ImplicitFilter(d_model, time_scale=time_scale, hidden=filter_hidden)
        self.skip = nn.Parameter(torch.empty(d_model))
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        nn.init.normal_(self.in_proj.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=std if out_std is None else out_std)
        bound = 1.0 / math.sqrt(self.conv_size)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.normal_(self.skip, std=1.0)
        self.filter.reset_parameters()

    def forward(self, x: torch.Tensor, *, cu_seqlens=None, position_ids=None, sp=None,
                state: HyenaCache | None = None, output_state: bool = False):
        """Mix ``x (B, T, D)``; returns ``(y (B, T, D), HyenaCache or None)``.

        cu_seqlens: packed documents (B == 1); each is convolved on its own, with
            ``sp`` too (the global offsets on every rank).
        position_ids: unused (the filter is a function of the lag). sp: both
        convolutions run sequence-parallel on this rank's shard. state: the input
        history to continue from (recomputed, see the module docstring).
        """
        B, T = check_hidden(x, self.d_model)
        self.check_state(state, cu_seqlens, sp, output_state)
        if state is not None:
            x = torch.cat([state.x, x], 1)
        y = self._mix(x, cu_seqlens, sp)[:, -T:]
        return y, (HyenaCache(x) if output_state else None)

    def _mix(self, x, cu_seqlens, sp):
        D = self.d_model
        short_conv = ops.short_conv if sp is None else partial(call_eager, ops.short_conv)
        u, _ = short_conv(self.in_proj(x), self.conv_weight, activation=None, cu_seqlens=cu_seqlens,
                          sp=sp)
        x0, x1, v = u.split(D, dim=-1)
        z = v * x1
        z = self._long_conv(z, cu_seqlens, sp) + z * self.skip.to(z.dtype)
        return self.o_proj(z * x0)

    def _long_conv(self, z, cu_seqlens, sp):
        T = z.shape[1] * (1 if sp is None else sp.world)
        return call_eager(ops.long_conv, z, self.filter(T), cu_seqlens=cu_seqlens, sp=sp)

    def flops_per_token(self, seq_len: int) -> float:
        """FFT convolution per channel: three real FFTs of length 2T at about
        ``2.5 n log2 n`` FLOPs each (``15 log2(2T)`` per token), times 3 with backward.
        An estimate; the filter MLP and the element-wise gates are left out."""
        return 3.0 * 15.0 * self.d_model * math.log2(2 * seq_len)
