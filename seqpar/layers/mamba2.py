"""Mamba-2 mixer (Dao & Gu 2024), wired as mamba_ssm's ``Mamba2`` block:

``x -> in_proj -> [z | x B C | dt]``; ``x B C -> short causal conv (SiLU) -> x (H heads of
P), B, C (G groups of d_state N)``; ``dt = softplus(dt + dt_bias)``, ``A = -exp(A_log)``;
``y = ops.mamba2(x, dt, A, B, C, D)``; ``y -> RMSNorm(y * SiLU(z))`` per group (gated
RMSNorm) ``-> out_proj``.

Unlike the other linear mixers there are no separate q/k/v heads: B and C (keys and
queries of the SSD scan) are shared by the heads of a group, and the values are the
conv output x itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_positive_int
from ..ops.validate import fail
from ._common import Mixer, call_eager, check_hidden
from .linear import LinearCache


class Mamba2(Mixer):
    """Mamba-2 block.

    Args:
        d_model: model width D.
        n_heads: SSD heads H. head_dim: head dim P (the inner width is H P).
        d_state: N, the width of B and C (default head_dim). n_groups: G, heads sharing
            one B and C (a divisor of H).
        conv_size: width of the short causal convolution over [x, B, C].
        norm_eps: epsilon of the gated RMSNorm. chunk_size, backend: passed to the op.

    Initialization as mamba_ssm: ``A = U(1, 16)`` per head, ``dt`` at softplus(dt_bias)
    ~ logU(1e-3, 1e-1), ``D = 1``; the generation cache is a :class:`LinearCache` (the
    conv's last inputs and the (B, H, N, P) float32 state).
    """

    cache_type = LinearCache
    dt_min, dt_max, dt_floor = 1e-3, 1e-1, 1e-4

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, d_state: int | None = None,
                 n_groups: int = 1, conv_size: int = 4, norm_eps: float = 1e-6,
                 chunk_size: int = 64, backend: str = "auto"):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.n_heads = check_positive_int("n_heads", n_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.d_state = check_positive_int("d_state", head_dim if d_state is None else d_state)
        self.n_groups = check_positive_int("n_groups", n_groups)
        if n_heads % n_groups:
            fail("n_groups", f"a divisor of n_heads = {n_heads}", n_groups)
        self.conv_size = check_positive_int("conv_size", conv_size)
        self.norm_eps, self.chunk_size, self.backend = norm_eps, chunk_size, backend
        inner = n_heads * head_dim
        self.conv_dim = inner + 2 * n_groups * self.d_state
        self.in_proj = nn.Linear(d_model, inner + self.conv_dim + n_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, conv_size))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm_weight = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Projections ~ N(0, std) (the output projection N(0, out_std), default std);
        the conv as ``nn.Conv1d`` (uniform, fan-in = conv_size); A, dt, D as mamba_ssm."""
        nn.init.normal_(self.in_proj.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=std if out_std is None else out_std)
        bound = 1.0 / math.sqrt(self.conv_size)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            dt = torch.empty_like(self.dt_bias).uniform_(math.log(self.dt_min), math.log(self.dt_max))
            dt = dt.exp().clamp_min(self.dt_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        nn.init.ones_(self.D)
        nn.init.ones_(self.norm_weight)

    def _partition(self, x):
        """in_proj of x -> z (..., H P), x B C (..., conv_dim) for the conv, dt (..., H)."""
        return self.in_proj(x).split([self.n_heads * self.head_dim, self.conv_dim, self.n_heads],
                                     dim=-1)

    def _split(self, xbc):
        """Conv output (..., conv_dim) -> x (..., H, P), B, C (..., G, N)."""
        H, P, G, N = self.n_heads, self.head_dim, self.n_groups, self.d_state
        x, B, C = xbc.split([H * P, G * N, G * N], dim=-1)
        return x.unflatten(-1, (H, P)), B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N))

    def _A(self):
        return -self.A_log.float().exp()

    def _output(self, y, z):
        """Gated RMSNorm per group of heads (mamba_ssm's norm_before_gate=False), then
        the output projection. y: (..., H, P); z: (..., H P)."""
        h = (y.flatten(-2) * F.silu(z)).unflatten(-1, (self.n_groups, -1))
        h = F.rms_norm(h, (h.shape[-1],), eps=self.norm_eps).flatten(-2)
        return self.out_proj(h * self.norm_weight.to(h.dtype))

    def forward(self, x: torch.Tensor, *, cu_seqlens=None, position_ids=None, sp=None,
                state: LinearCache | None = None, output_state: bool = False):
        """Mix ``x (B, T, D)`` along time; returns ``(y (B, T, D), cache or None)``.

        cu_seqlens: packed documents (B == 1), each from zero state. position_ids:
        unused. sp: ``x`` is this rank's shard; the conv and the scan run
        sequence-parallel. state / output_state: the generation cache to continue
        from / to return (one device, no packing).
        """
        check_hidden(x, self.d_model)
        self.check_state(state, cu_seqlens, sp, output_state)
        z, xbc, dt = self._partition(x)
        xbc, conv = ops.short_conv(xbc, self.conv_weight, self.conv_bias, activation="silu",
                                   initial_state=None if state is None else state.conv,
                                   output_final_state=output_state, cu_seqlens=cu_seqlens, sp=sp)
        u, B, C = self._split(xbc)
        y, S = call_eager(ops.mamba2, u, dt, self._A(), B, C, D=self.D, dt_bias=self.dt_bias, dt_softplus=True,
                          initial_state=None if state is None else state.state,
                          output_final_state=output_state, cu_seqlens=cu_seqlens,
                          chunk_size=self.chunk_size, backend=self.backend, sp=sp)
        return self._output(y, z), (LinearCache(conv, S) if output_state else None)

    def step(self, x: torch.Tensor, cache: LinearCache):
        """One token ``x (B, 1, D)`` through ``ops.short_conv_step`` and
        ``ops.mamba2_step``; returns ``(y (B, 1, D), cache)``."""
        self.check_step(x, cache)
        z, xbc, dt = self._partition(x[:, 0])
        xbc, conv = ops.short_conv_step(xbc, self.conv_weight, self.conv_bias, activation="silu",
                                        state=cache.conv)
        u, B, C = self._split(xbc)
        y, S = ops.mamba2_step(u, dt, self._A(), B, C, cache.state, D=self.D, dt_bias=self.dt_bias,
                               dt_softplus=True)
        return self._output(y, z)[:, None], LinearCache(conv, S)

    def flops_per_token(self, seq_len: int) -> float:
        """Recurrent-form work on the (N, P) state per head (write and read, one
        multiply-add each), forward + backward (3x); independent of ``seq_len``."""
        return 3.0 * 4 * self.n_heads * self.d_state * self.head_dim
