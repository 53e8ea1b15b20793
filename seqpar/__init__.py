"""seqpar: sequence mixers that parallelize over the sequence, inside a GPU and across GPUs.

``seqpar.load(path)`` returns a trained model and its tokenizer (:func:`seqpar.hub.load`);
the subpackages are ``seqpar.ops``, ``seqpar.parallel``, ``seqpar.layers``,
``seqpar.models`` and ``seqpar.train``.
"""
__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name):
    # seqpar.load is imported on first use, so that `import seqpar` stays light.
    if name == "load":
        from .hub import load

        return load
    raise AttributeError(f"module 'seqpar' has no attribute {name!r}")
