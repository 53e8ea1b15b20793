"""The ``seqpar`` command: ``seqpar train``, ``seqpar generate``, ``seqpar export`` and
``seqpar bench {ops,sp,train,longest,profile,attn}``.

Each subcommand hands the rest of the command line to its program's ``main(argv)``, so
``seqpar train --help`` shows the training options. Under torchrun, start the module
instead: ``torchrun --nproc-per-node 2 -m seqpar.train ...``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

from . import __version__

# Packages each command needs beyond the ops' own (torch, numpy), and the extra that
# installs them: `pip install seqpar` alone runs the ops, not the programs.
NEEDS = {"train": (("rich", "matplotlib"), "train"), "bench": (("matplotlib",), "bench")}
COMMANDS = {"train": "seqpar.train", "generate": "seqpar.generate", "export": "seqpar.hub"}
BENCHMARKS = {"ops": "seqpar.bench.ops", "sp": "seqpar.bench.sp", "train": "seqpar.bench.train",
              "longest": "seqpar.bench.longest", "profile": "seqpar.bench.profile",
              "attn": "seqpar.bench.attn"}
USAGE = """usage: seqpar {train,generate,export,bench} ... | seqpar --version

  seqpar train [options]            train a hybrid language model (seqpar train --help)
  seqpar generate RUN --prompt TEXT sample text from a trained model (seqpar generate --help)
  seqpar export RUN --out DIR       write a trained model in the Hugging Face layout
  seqpar bench {ops,sp,train,longest,profile,attn} ...   benchmarks (seqpar bench --help)
"""
BENCH_USAGE = """usage: seqpar bench {ops,sp,train,longest,profile,attn} [options]

  seqpar bench ops [options]      time the single-device ops
  seqpar bench sp [options]       time sequence parallelism (torchrun, or --simulate P)
  seqpar bench train [options]    training tokens/s, MFU, memory and host syncs per preset
  seqpar bench longest [options]  the longest context that trains
  seqpar bench profile [options]  where a training step's or an op's time goes
  seqpar bench attn [options]     softmax_attn against every SDPA backend
"""


def _missing_packages(command: str) -> bool:
    """Print one line naming what ``command`` needs and how to install it; True if any
    package is missing."""
    packages, extra = NEEDS[command]
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        print(f"seqpar {command}: error: needs {' and '.join(missing)} "
              f"(pip install 'seqpar[{extra}]')", file=sys.stderr)
    return bool(missing)


def _bench(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(BENCH_USAGE, end="")
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        got = repr(argv[0]) if argv else "nothing"
        print(f"seqpar bench: error: expected one of {', '.join(BENCHMARKS)}, got {got}\n{BENCH_USAGE}",
              file=sys.stderr, end="")
        return 2
    if _missing_packages("bench"):
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:]) or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"seqpar {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        if command in NEEDS and _missing_packages(command):
            return 2
        return importlib.import_module(COMMANDS[command]).main(rest)
    if command == "bench":
        return _bench(rest)
    print(f"seqpar: error: expected a command among {', '.join([*COMMANDS, 'bench'])}, got "
          f"{command!r}\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
