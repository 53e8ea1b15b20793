"""``seqpar train``: train a hybrid language model on one CPU or under torchrun.

``python -m seqpar.train --preset tiny`` trains on the Python standard library's source
with no download; ``torchrun --nproc-per-node N -m seqpar.train --sp S`` shards each
sequence over S ranks and the batch over N / S. See ``docs/train.md``.
"""
from .config import PRESET_TRAINING, ConfigError, TrainConfig, parse_args, report_error, resolve
from .distributed import cpu_threads
from .loop import Plan, RunResult, Trainer, build_loaders, prepare, run

__all__ = ["PRESET_TRAINING", "ConfigError", "Plan", "RunResult", "TrainConfig", "Trainer",
           "build_loaders", "main", "parse_args", "prepare", "resolve", "run"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a bad configuration:
    one line on rank 0, no traceback, also handed to torchrun's failure summary). Sets
    the CPU threads (``--threads``) before any work."""
    try:
        cfg = parse_args(argv)
        cpu_threads(cfg.threads, resolve(cfg)[1].d_model)
        run(cfg)
    except ConfigError as e:
        report_error(f"seqpar train: error: {e}")
        return 2
    return 0
