"""Single-device sequence mixers. Each takes ``sp=`` to run sequence-parallel.

Linear family (returns ``(o, final_state)``): :func:`linear_attn`, :func:`simple_gla`,
:func:`gla`, :func:`delta_rule`, :func:`gated_delta_rule`, :func:`mlstm`, :func:`mamba2`; each has a
``*_step`` (one token, for generation) and a ``*_reference`` (float64 token loop).
Softmax attention for hybrids: :func:`softmax_attn`. Convolutions: :func:`short_conv`,
:func:`long_conv`.
"""
from .linear import *  # noqa: F401,F403
from .linear import __dict__ as _linear_ns
from .long_conv import long_conv, long_conv_reference
from .short_conv import short_conv, short_conv_reference, short_conv_step
from .softmax_attn import softmax_attn, softmax_attn_reference

__all__ = sorted([n for n in _linear_ns if not n.startswith("_") and callable(_linear_ns[n])]
                 + ["long_conv", "long_conv_reference", "short_conv", "short_conv_reference",
                    "short_conv_step", "softmax_attn", "softmax_attn_reference"])
