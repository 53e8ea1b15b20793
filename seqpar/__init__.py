"""seqpar: sequence mixers that parallelize over the sequence, inside a GPU and across GPUs."""
__version__ = "0.1.0"
