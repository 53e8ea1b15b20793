"""Sequence-mixer layers (nn.Modules) built on :mod:`seqpar.ops`.

Every mixer maps ``x (B, T, D)`` to ``(y (B, T, D), cache)`` with
``forward(x, *, cu_seqlens=None, position_ids=None, sp=None, state=None,
output_state=False)`` and has ``step(x (B, 1, D), cache)`` for generation; with ``sp``
every op inside (convolutions included) runs sequence-parallel. :data:`MIXERS` maps the
names used in model patterns to the classes; :func:`build_mixer` builds one by name.
"""
from __future__ import annotations

from .._checks import fail
from ._common import Mixer, RMSNorm, call_eager, use_graph_breaks
from .attention import Attention, KVCache, apply_rope, default_positions
from .hyena import Hyena, HyenaCache, ImplicitFilter
from .linear import (
    GLA,
    MLSTM,
    DeltaNet,
    GatedDeltaNet,
    LinearAttention,
    LinearCache,
    LinearMixer,
    Retention,
    SimpleGLA,
)
from .mamba2 import Mamba2
from .mlp import SwiGLU

MIXERS: dict[str, type[Mixer]] = {
    "linear_attn": LinearAttention,
    "retention": Retention,
    "simple_gla": SimpleGLA,
    "gla": GLA,
    "deltanet": DeltaNet,
    "gdn": GatedDeltaNet,
    "mlstm": MLSTM,
    "mamba2": Mamba2,
    "hyena": Hyena,
    "attn": Attention,
}


def check_mixer_name(name) -> str:
    if name not in MIXERS:
        fail("mixer name", "one of " + ", ".join(repr(n) for n in MIXERS), repr(name))
    return name


def build_mixer(name: str, *, d_model: int, n_heads: int, head_dim: int, n_kv_heads=None,
                conv_size: int = 4, norm_eps: float = 1e-6, chunk_size: int = 64,
                backend: str = "auto", rope_theta: float = 10000.0,
                time_scale: int = 2048) -> Mixer:
    """Build the mixer ``name`` (a key of :data:`MIXERS`), handing each class the
    arguments it takes: head layout, conv width and op settings for the linear family;
    heads, GQA and RoPE base for attention; channels, conv width and filter time scale
    for Hyena."""
    cls = MIXERS[check_mixer_name(name)]
    if cls is Attention:
        return Attention(d_model, n_heads, head_dim, n_kv_heads=n_kv_heads, rope_theta=rope_theta)
    if cls is Hyena:
        return Hyena(d_model, conv_size=conv_size, time_scale=time_scale)
    return cls(d_model, n_heads, head_dim, conv_size=conv_size, norm_eps=norm_eps,
               chunk_size=chunk_size, backend=backend)


__all__ = ["MIXERS", "Attention", "DeltaNet", "GLA", "GatedDeltaNet", "Hyena", "HyenaCache",
           "ImplicitFilter", "KVCache", "LinearAttention", "LinearCache", "LinearMixer", "MLSTM",
           "Mamba2", "Mixer", "RMSNorm", "Retention", "SimpleGLA", "SwiGLU", "apply_rope",
           "build_mixer", "call_eager", "check_mixer_name", "default_positions", "use_graph_breaks"]
