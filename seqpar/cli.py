"""The ``seqpar`` command: ``seqpar train ...`` and
``seqpar bench {ops,sp,train,longest,profile,attn} ...``.

Each subcommand hands the rest of the command line to its program's ``main(argv)``, so
``seqpar train --help`` shows the training options. Under torchrun, start the module
instead: ``torchrun --nproc-per-node 2 -m seqpar.train ...``.
"""
from __future__ import annotations

import importlib
import sys

BENCHMARKS = {"ops": "seqpar.bench.ops", "sp": "seqpar.bench.sp", "train": "seqpar.bench.train",
              "longest": "seqpar.bench.longest", "profile": "seqpar.bench.profile",
              "attn": "seqpar.bench.attn"}
USAGE = """usage: seqpar {train,bench} ...

  seqpar train [options]          train a hybrid language model (seqpar train --help)
  seqpar bench ops [options]      time the single-device ops
  seqpar bench sp [options]       time sequence parallelism (under torchrun)
  seqpar bench train [options]    training tokens/s, MFU, memory and host syncs per preset
  seqpar bench longest [options]  the longest context that trains
  seqpar bench profile [options]  where a training step's or an op's time goes
  seqpar bench attn [options]     softmax_attn against every SDPA backend
"""


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        got = repr(argv[0]) if argv else "nothing"
        print(f"seqpar bench: error: expected one of {', '.join(BENCHMARKS)}, got {got}", file=sys.stderr)
        return 2
    name = BENCHMARKS[argv[0]]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is None or not name.startswith(e.name):
            raise
        print(f"seqpar bench {argv[0]}: error: not available yet in this version of seqpar "
              f"(the module {name} is missing)", file=sys.stderr)
        return 2
    return module.main(argv[1:]) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train_main

        return train_main(rest)
    if command == "bench":
        return _bench(rest)
    print(f"seqpar: error: expected a command among train, bench, got {command!r}\n{USAGE}",
          file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
