"""Model configuration and presets."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from .._checks import check_positive, fail
from ..layers import MIXERS
from ..ops.validate import check_backend, check_chunk_size


def parse_pattern(pattern) -> tuple[str, ...]:
    """``"gdn,gdn,attn"`` or ``["gdn", "gdn", "attn"]`` -> ``("gdn", "gdn", "attn")``;
    every name must be a key of ``seqpar.layers.MIXERS``."""
    if isinstance(pattern, str):
        names = [p.strip() for p in pattern.split(",")]
    elif isinstance(pattern, Sequence):
        names = list(pattern)
    else:
        fail("pattern", "a comma-separated string or a list of mixer names", type(pattern).__name__)
    if not names or names == [""]:
        fail("pattern", "at least one mixer name", repr(pattern))
    for n in names:
        if n not in MIXERS:
            fail("pattern", "mixer names among " + ", ".join(repr(m) for m in MIXERS),
                 f"{n!r} in {pattern!r}")
    return tuple(names)


@dataclass
class ModelConfig:
    """Hyper-parameters of :class:`seqpar.models.HybridLM`; validated on construction
    (a bad value raises ValueError naming the field).

    Attributes:
        vocab_size: tokens in the vocabulary (256 for the byte-level tokenizer).
        d_model: residual width D.
        n_layers: decoder blocks.
        n_heads: heads of every mixer (query heads for attention).
        head_dim: per-head dimension (key = value dim for linear mixers; even for RoPE).
        n_kv_heads: key/value heads of attention layers (GQA), dividing n_heads;
            None means n_heads.
        pattern: mixer names (comma string or list) repeated cyclically over the
            layers, e.g. ``"gdn,gdn,gdn,attn"``; not longer than n_layers.
        mlp_ratio: SwiGLU hidden width / d_model, rounded up to ``mlp_multiple_of``.
        mlp_multiple_of: rounding of the SwiGLU hidden width.
        tie_embeddings: share the input embedding and the LM head.
        conv_size: width of the short causal convolutions.
        norm_eps: RMSNorm epsilon.
        init_std: standard deviation of weight init; residual-output projections use
            ``init_std / sqrt(2 n_layers)`` (GPT-2).
        rope_theta: RoPE base of attention layers.
        max_seq_len: the context length the model is built for; Hyena's filter
            normalizes lags by it. Longer inputs still run.
        chunk_size: chunk length of the linear family's PyTorch path (backend 'torch');
            the Triton kernels use their own fixed chunks.
        backend: linear-family backend ('auto', 'torch', 'triton').
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 32
    n_kv_heads: int | None = None
    pattern: str | Sequence[str] = "gdn,gdn,gdn,attn"
    mlp_ratio: float = 8 / 3
    mlp_multiple_of: int = 64
    tie_embeddings: bool = True
    conv_size: int = 4
    norm_eps: float = 1e-6
    init_std: float = 0.02
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    chunk_size: int = 64
    backend: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim",
                     "mlp_multiple_of", "conv_size", "max_seq_len"):
            check_positive(name, getattr(self, name))
        for name in ("mlp_ratio", "norm_eps", "init_std", "rope_theta"):
            check_positive(name, getattr(self, name), (int, float))
        check_chunk_size(self.chunk_size)
        check_backend(self.backend)
        if not isinstance(self.tie_embeddings, bool):
            fail("tie_embeddings", "a bool", repr(self.tie_embeddings))
        self.pattern = parse_pattern(self.pattern)
        if len(self.pattern) > self.n_layers:
            fail("pattern", f"at most n_layers = {self.n_layers} mixer names (it repeats cyclically)",
                 f"{len(self.pattern)} names")
        if self.n_kv_heads is not None:
            check_positive("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads:
                fail("n_kv_heads", f"a divisor of n_heads = {self.n_heads}", self.n_kv_heads)
        if "attn" in self.pattern and self.head_dim % 2:
            fail("head_dim", "an even number with attention layers (RoPE rotates pairs)", self.head_dim)

    @property
    def mixers(self) -> list[str]:
        """The mixer name of every layer: the pattern repeated over n_layers."""
        return [self.pattern[i % len(self.pattern)] for i in range(self.n_layers)]

    @property
    def mlp_hidden(self) -> int:
        m = self.mlp_multiple_of
        return m * -(-int(round(self.mlp_ratio * self.d_model)) // m)

    def to_dict(self) -> dict:
        """Plain-JSON form (the pattern as a comma string); ``ModelConfig(**d)`` inverts it."""
        d = dataclasses.asdict(self)
        d["pattern"] = ",".join(self.pattern)
        return d


# Sizes count the default byte-level vocabulary (256 tokens); see tests for the numbers.
PRESETS: dict[str, ModelConfig] = {
    # CPU-sized: trains in minutes on two cores.
    "tiny": ModelConfig(d_model=128, n_layers=4, n_heads=4, head_dim=32,
                        pattern="gdn,gdn,gdn,attn", chunk_size=32, max_seq_len=512),
    "125m": ModelConfig(d_model=768, n_layers=16, n_heads=12, head_dim=64,
                        pattern="gdn,gdn,gdn,attn"),
    "350m": ModelConfig(d_model=1024, n_layers=24, n_heads=16, head_dim=64,
                        pattern="gdn,gdn,gdn,attn"),
    "1b": ModelConfig(d_model=2048, n_layers=20, n_heads=16, head_dim=128,
                      pattern="gdn,gdn,gdn,attn", max_seq_len=4096),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A copy of ``PRESETS[name]`` with fields replaced by ``overrides`` (re-validated)."""
    if name not in PRESETS:
        fail("preset", "one of " + ", ".join(repr(p) for p in PRESETS), repr(name))
    return dataclasses.replace(PRESETS[name], **overrides)
