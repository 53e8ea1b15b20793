"""Language models built from :mod:`seqpar.layers`: :class:`HybridLM` configured by
:class:`ModelConfig` (named sizes in :data:`PRESETS`, copies via :func:`preset`)."""
from .config import PRESETS, ModelConfig, parse_pattern, preset
from .lm import Block, HybridLM

__all__ = ["PRESETS", "Block", "HybridLM", "ModelConfig", "parse_pattern", "preset"]
