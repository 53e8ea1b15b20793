"""Command-line benchmarks (top layer: may import every other seqpar layer)."""
