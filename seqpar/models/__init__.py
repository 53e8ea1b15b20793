"""Language models built from :mod:`seqpar.layers`: :class:`HybridLM` configured by
:class:`ModelConfig` (named sizes in :data:`PRESETS`, copies via :func:`preset`)."""
from .config import PRESETS, ModelConfig, parse_pattern, preset
from .lm import Block, HybridLM, check_token_ids
from .loss import linear_cross_entropy

__all__ = ["PRESETS", "Block", "HybridLM", "ModelConfig", "check_token_ids", "linear_cross_entropy",
           "parse_pattern", "preset"]
