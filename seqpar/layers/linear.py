"""Linear-family mixer layers: linear attention, retention, simple GLA, GLA, DeltaNet,
Gated DeltaNet and mLSTM, each as its paper (and flash-linear-attention) wires it.

One block shape serves all seven (:class:`LinearMixer`):

``x -> [q|k|v] projection -> short causal conv (SiLU) -> (L2-normalize q, k for the delta
rules) -> linear-family op with the mixer's gates -> per-head RMSNorm -> * SiLU(gate
projection of x) -> output projection``.

Subclasses differ only in the op they call and the gate tensors they compute from ``x``
(:meth:`LinearMixer.gates`). Every gate is computed in float32; log decays come from
``logsigmoid`` (GLA, simple GLA), Mamba-2's ``-exp(A_log) * softplus(x + dt_bias)``
(Gated DeltaNet) or fixed per-head constants (retention).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._checks import check_positive_int
from ._common import Mixer, RMSNorm, call_eager, check_hidden

# flash-linear-attention's normalizer for logsigmoid gates: keeps initial decays mild
# (exp(logsigmoid(0) / 16) ~ 0.96) so early training sees long memories.
GATE_LOGIT_NORMALIZER = 16.0


@dataclass
class LinearCache:
    """Generation cache of a linear-family layer.

    conv: the short convolution's state (as returned by ``ops.short_conv``).
    state: the recurrent state, (B, H, K, V) float32, or mLSTM's pair (C, n).
    """
    conv: torch.Tensor
    state: torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class LinearMixer(Mixer):
    """Shared block of the linear family (see the module docstring).

    Args:
        d_model: model width D.
        n_heads: heads H.
        head_dim: key and value dimension per head (K = V = head_dim).
        conv_size: width of the short causal convolution before q, k, v.
        norm_eps: epsilon of the per-head output RMSNorm.
        chunk_size, backend: passed to the op (chunk_size sets the PyTorch path alone).

    Subclasses set ``op`` and ``op_step`` (a function of :mod:`seqpar.ops` and its
    one-token step, as staticmethods), ``normalize_qk`` and ``state_flops`` (FLOPs per
    state element per token in the forward recurrence), and override
    :meth:`build_gates`, :meth:`reset_gates` and :meth:`gates`.
    """

    op: Callable
    op_step: Callable
    cache_type = LinearCache
    normalize_qk = False
    state_flops = 4  # k^T v write and q S read, one multiply-add each

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, conv_size: int = 4,
                 norm_eps: float = 1e-6, chunk_size: int = 64, backend: str = "auto"):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.n_heads = check_positive_int("n_heads", n_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.conv_size = check_positive_int("conv_size", conv_size)
        self.chunk_size, self.backend = chunk_size, backend
        inner = n_heads * head_dim
        self.qkv_proj = nn.Linear(d_model, 3 * inner, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * inner, conv_size))
        self.g_proj = nn.Linear(d_model, inner, bias=False)
        self.o_norm = RMSNorm(head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        self.build_gates()
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Projections ~ N(0, std) (the output projection N(0, out_std), default std);
        the short conv as ``nn.Conv1d`` (uniform, fan-in = conv_size); gate parameters
        by the subclass's :meth:`reset_gates`."""
        for lin in (self.qkv_proj, self.g_proj):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=std if out_std is None else out_std)
        bound = 1.0 / math.sqrt(self.conv_size)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        self.o_norm.reset_parameters()
        self.reset_gates(std)

    def build_gates(self) -> None:
        """Create the subclass's gate parameters (none here)."""

    def reset_gates(self, std: float) -> None:
        """Initialize the subclass's gate parameters (none here)."""

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The op's arguments after ``q, k, v`` (in order), computed from ``x (B, T, D)``:
        float32 tensors of shape (B, T, H) or (B, T, H, K)."""
        return ()

    def _qkv(self, x, initial_conv, output_state, cu_seqlens, sp):
        # Traced into a compiled block on one device; its SP path exchanges halos.
        short_conv = ops.short_conv if sp is None else partial(call_eager, ops.short_conv)
        h, conv = short_conv(self.qkv_proj(x), self.conv_weight, activation="silu",
                             initial_state=initial_conv, output_final_state=output_state,
                             cu_seqlens=cu_seqlens, sp=sp)
        return (*self._split(h), conv)

    def _split(self, h):
        """Short-conv output (B, T, 3 H Dh) -> q, k, v (B, T, H, Dh)."""
        B, T, _ = h.shape
        q, k, v = h.view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        if self.normalize_qk:
            q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        return q, k, v

    def _output(self, o, x):
        B, T = x.shape[:2]
        gate = F.silu(self.g_proj(x)).view(B, T, self.n_heads, self.head_dim)
        return self.o_proj((self.o_norm(o) * gate).reshape(B, T, -1))

    def forward(self, x: torch.Tensor, *, cu_seqlens=None, position_ids=None, sp=None,
                state: LinearCache | None = None, output_state: bool = False):
        """Mix ``x (B, T, D)`` along time; returns ``(y (B, T, D), cache or None)``.

        cu_seqlens: int32 (N + 1,) document offsets of packed input (B == 1); every
        document starts from zero state. position_ids: unused (the recurrence is
        causal by construction). sp: a ``SequenceParallel``; ``x`` is this rank's shard
        and every op runs sequence-parallel. state / output_state: the generation
        cache to continue from / to return (one device, no packing).
        """
        check_hidden(x, self.d_model)
        self.check_state(state, cu_seqlens, sp, output_state)
        q, k, v, conv = self._qkv(x, None if state is None else state.conv, output_state,
                                  cu_seqlens, sp)
        o, S = call_eager(
            self.op, q, k, v, *self.gates(x),
            initial_state=None if state is None else state.state,
            output_final_state=output_state, cu_seqlens=cu_seqlens,
            chunk_size=self.chunk_size, backend=self.backend, sp=sp)
        return self._output(o, x), (LinearCache(conv, S) if output_state else None)

    def step(self, x: torch.Tensor, cache: LinearCache):
        """One token ``x (B, 1, D)`` through ``ops.short_conv_step`` and the op's
        recurrent ``*_step`` (not the chunk path); returns ``(y (B, 1, D), cache)``."""
        self.check_step(x, cache)
        h, conv = ops.short_conv_step(self.qkv_proj(x[:, 0]), self.conv_weight, activation="silu",
                                      state=cache.conv)
        q, k, v = self._split(h[:, None])
        o, S = self.op_step(q[:, 0], k[:, 0], v[:, 0], *(g[:, 0] for g in self.gates(x)),
                            cache.state)
        return self._output(o[:, None], x), LinearCache(conv, S)

    def flops_per_token(self, seq_len: int) -> float:
        """Recurrent-form work on the (K, V) state per head, forward + backward (3x).
        The chunkwise kernels do more (intra-chunk matmuls), so MFU from this count is
        conservative. Independent of ``seq_len``."""
        return 3.0 * self.state_flops * self.n_heads * self.head_dim * self.head_dim


class LinearAttention(LinearMixer):
    """Causal linear attention (Katharopoulos et al.), identity feature map after the
    SiLU conv; the per-head output RMSNorm replaces the normalizer (TransNormer)."""
    op, op_step = staticmethod(ops.linear_attn), staticmethod(ops.linear_attn_step)


class Retention(LinearMixer):
    """RetNet's retention: fixed per-head decay ``gamma_h = 1 - 2^(-5 - h)``."""
    op, op_step = staticmethod(ops.simple_gla), staticmethod(ops.simple_gla_step)

    def build_gates(self):
        self.register_buffer("log_decay", torch.empty(self.n_heads), persistent=False)

    def reset_gates(self, std: float) -> None:
        h = torch.arange(self.n_heads, dtype=torch.float64)
        # log1p keeps the tiny decays of late heads, which 1 - 2^-n rounds away in float32.
        with torch.no_grad():
            self.log_decay.copy_(torch.log1p(-(2.0 ** (-5.0 - h))))

    def gates(self, x):
        B, T = x.shape[:2]
        return (self.log_decay.expand(B, T, self.n_heads),)


class SimpleGLA(LinearMixer):
    """Simple GLA: one data-dependent decay per head, ``logsigmoid(W x) / 16``."""
    op, op_step = staticmethod(ops.simple_gla), staticmethod(ops.simple_gla_step)

    def build_gates(self):
        self.gk_proj = nn.Linear(self.d_model, self.n_heads, bias=True)

    def reset_gates(self, std):
        nn.init.normal_(self.gk_proj.weight, std=std)
        nn.init.zeros_(self.gk_proj.bias)

    def gates(self, x):
        return (F.logsigmoid(self.gk_proj(x).float()) / GATE_LOGIT_NORMALIZER,)


class GLA(LinearMixer):
    """GLA: per-key-channel decay from a low-rank projection (D -> 16 -> H K),
    ``logsigmoid(.) / 16``, as in Yang et al. 2024."""
    op, op_step = staticmethod(ops.gla), staticmethod(ops.gla_step)
    gate_rank = 16

    def build_gates(self):
        self.gk_proj = nn.Sequential(
            nn.Linear(self.d_model, self.gate_rank, bias=False),
            nn.Linear(self.gate_rank, self.n_heads * self.head_dim, bias=True))

    def reset_gates(self, std):
        nn.init.normal_(self.gk_proj[0].weight, std=std)
        nn.init.normal_(self.gk_proj[1].weight, std=std)
        nn.init.zeros_(self.gk_proj[1].bias)

    def gates(self, x):
        B, T = x.shape[:2]
        g = F.logsigmoid(self.gk_proj(x).float()) / GATE_LOGIT_NORMALIZER
        return (g.view(B, T, self.n_heads, self.head_dim),)


class _Beta(LinearMixer):
    """Delta-rule base: L2-normalized q, k and a per-head write strength
    ``beta = sigmoid(W x)``."""
    normalize_qk = True
    state_flops = 6  # plus the prediction k S

    def build_gates(self):
        self.b_proj = nn.Linear(self.d_model, self.n_heads, bias=False)

    def reset_gates(self, std):
        nn.init.normal_(self.b_proj.weight, std=std)

    def beta(self, x):
        return torch.sigmoid(self.b_proj(x).float())


class DeltaNet(_Beta):
    """DeltaNet (Schlag et al. 2021; Yang et al. 2024)."""
    op, op_step = staticmethod(ops.delta_rule), staticmethod(ops.delta_rule_step)

    def gates(self, x):
        return (self.beta(x),)


class GatedDeltaNet(_Beta):
    """Gated DeltaNet (Yang et al. 2025): Mamba-2 decay
    ``g = -exp(A_log) * softplus(W x + dt_bias)`` per head, A ~ U(0, 16) and
    dt ~ logU(1e-3, 1e-1) at init."""
    op, op_step = staticmethod(ops.gated_delta_rule), staticmethod(ops.gated_delta_rule_step)

    def build_gates(self):
        super().build_gates()
        self.a_proj = nn.Linear(self.d_model, self.n_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))

    def reset_gates(self, std):
        super().reset_gates(std)
        nn.init.normal_(self.a_proj.weight, std=std)
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1e-4, 16).log())
            dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def gates(self, x):
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        return g, self.beta(x)


class MLSTM(LinearMixer):
    """xLSTM's mLSTM with sigmoid input and forget gates, each a per-head projection
    with bias; the forget bias starts at linspace(3, 6) over heads (long memory)."""
    op, op_step = staticmethod(ops.mlstm), staticmethod(ops.mlstm_step)

    def build_gates(self):
        self.if_proj = nn.Linear(self.d_model, 2 * self.n_heads, bias=True)

    def reset_gates(self, std):
        nn.init.normal_(self.if_proj.weight, std=std)
        with torch.no_grad():
            self.if_proj.bias[: self.n_heads].zero_()
            self.if_proj.bias[self.n_heads:].copy_(torch.linspace(3.0, 6.0, self.n_heads))

    def gates(self, x):
        i, f = self.if_proj(x).float().chunk(2, dim=-1)
        return i, f
