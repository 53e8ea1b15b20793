"""Single-device sequence mixers. Each takes ``sp=`` to run sequence-parallel.

Linear family (returns ``(o, final_state)``): :func:`linear_attn`, :func:`simple_gla`,
:func:`gla`, :func:`delta_rule`, :func:`gated_delta_rule`, :func:`mlstm`; each has a
``*_step`` (one token, for generation) and a ``*_reference`` (float64 token loop).
Softmax attention for hybrids: :func:`softmax_attn`. Convolutions: :func:`short_conv`,
:func:`long_conv`.
"""
from .linear import *  # noqa: F401,F403
from .linear import __dict__ as _linear_ns

__all__ = sorted(n for n in _linear_ns if not n.startswith("_") and callable(_linear_ns[n]))
