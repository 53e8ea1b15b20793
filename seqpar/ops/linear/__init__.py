"""The linear family: one affine state recurrence per token (see docs/design.md)."""
from .delta_rule import delta_rule, delta_rule_reference, delta_rule_step
from .gated_delta_rule import gated_delta_rule, gated_delta_rule_reference, gated_delta_rule_step
from .gla import gla, gla_reference, gla_step
from .linear_attn import linear_attn, linear_attn_reference, linear_attn_step
from .mamba2 import mamba2, mamba2_reference, mamba2_step
from .mlstm import mlstm, mlstm_reference, mlstm_step
from .simple_gla import simple_gla, simple_gla_reference, simple_gla_step
