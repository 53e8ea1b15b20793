"""``seqpar train``: train a hybrid language model on one CPU or under torchrun.

``python -m seqpar.train --preset tiny`` trains on the Python standard library's source
with no download; ``torchrun --nproc-per-node N -m seqpar.train --sp S`` shards each
sequence over S ranks and the batch over N / S. See ``docs/train.md``.
"""
import os
import sys

from .config import PRESET_TRAINING, ConfigError, TrainConfig, parse_args, resolve
from .loop import Plan, RunResult, Trainer, build_loaders, prepare, run

__all__ = ["PRESET_TRAINING", "ConfigError", "Plan", "RunResult", "TrainConfig", "Trainer",
           "build_loaders", "main", "parse_args", "prepare", "resolve", "run"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a bad configuration,
    printed without a traceback on rank 0)."""
    try:
        run(parse_args(argv))
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"seqpar train: error: {e}", file=sys.stderr)
        return 2
    return 0
