"""Training configuration: the command line, per-preset defaults and every check that
must pass before any work starts.

A bad configuration raises :class:`ConfigError` (a ``ValueError``) naming the option,
what it expects and what it got; ``seqpar train`` prints it and exits with status 2
before loading data or touching a process group.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from .._checks import check_positive_int, fail
from ..layers import MIXERS
from ..models import PRESETS, ModelConfig, preset

# File kinds read from a --data folder; anything else there (images, archives) is skipped.
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".cpp", ".rs",
                 ".js", ".ts", ".go", ".java", ".tex", ".html", ".csv", ".toml", ".yaml", ".yml"}

# Sequences of packed documents per data-parallel rank, context length and schedule that
# suit each preset. ``tiny`` is sized so that the README's main job
# (torchrun --nproc-per-node 2 -m seqpar.train --preset tiny --sp 2) finishes in well
# under five minutes on two CPU cores with a clearly falling loss.
PRESET_TRAINING: dict[str, dict] = {
    "tiny": dict(steps=300, seq_len=256, batch_size=4, lr=3e-3, warmup=30, eval_every=100,
                 save_every=100, log_every=10, eval_batches=4),
    "125m": dict(steps=20_000, seq_len=2048, batch_size=8, lr=6e-4, warmup=1000,
                 eval_every=1000, save_every=1000, log_every=10, eval_batches=16),
    "350m": dict(steps=40_000, seq_len=2048, batch_size=8, lr=3e-4, warmup=2000,
                 eval_every=1000, save_every=1000, log_every=10, eval_batches=16),
    "1b": dict(steps=60_000, seq_len=4096, batch_size=4, lr=2e-4, warmup=2000,
               eval_every=1000, save_every=1000, log_every=10, eval_batches=16,
               activation_checkpointing=True),
}


SP_STRATEGIES = ("scan", "allgather", "ring", "alltoall")


class ConfigError(ValueError):
    """A bad option, found before any work."""


def config_fail(name: str, expected: str, got) -> NoReturn:
    fail(name, expected, got, ConfigError)


@dataclass
class TrainConfig:
    """Everything ``seqpar train`` needs. ``None`` fields take the preset's value
    (:data:`PRESET_TRAINING`) in :func:`resolve`.

    Attributes:
        preset: model size, a key of ``seqpar.models.PRESETS``.
        model: overrides of ``ModelConfig`` fields (``--mixers``, ``--set key=value``).
        data: text file, folder or ``.jsonl`` file; None trains on the standard library.
        tokenizer: a Hugging Face ``tokenizers`` JSON file; None is the byte tokenizer.
        out: run directory (default ``runs/<name>``).
        name: run name (default the preset).
        steps: optimizer steps of the whole run (the LR schedule spans them).
        stop_at: end this invocation after this step (checkpointing it), as a job with a
            time limit would; ``--resume`` continues. None runs to ``steps``.
        seq_len: tokens per sequence (the context length).
        batch_size: sequences per data-parallel rank per step, packed into one stream.
        packing: True packs documents with ``cu_seqlens`` (state resets at every
            document); False feeds plain ``(batch_size, seq_len)`` windows.
        sp: sequence-parallel degree; data-parallel degree is world size / sp.
        sp_strategy, sp_layout: ``SequenceParallel``'s strategy (None: its defaults) and
            layout ('contiguous' or 'zigzag').
        lr, min_lr_ratio, warmup, weight_decay, betas, grad_clip: AdamW with linear
            warmup to ``lr`` then cosine decay to ``min_lr_ratio * lr``.
        activation_checkpointing: recompute each block in backward.
        compile: ``torch.compile`` each block (regional compilation); None: on CUDA,
            off on CPU.
        dtype: 'auto' (bf16 autocast on GPU, float32 on CPU), 'bf16' or 'fp32'.
        seed: model init and data order.
        eval_docs: documents held out for the evaluation loss.
        eval_every, eval_batches: evaluate every so many steps on so many batches.
        log_every: steps between metric records.
        save_every, keep: checkpoint period and how many checkpoints to keep.
        resume: 'latest' (newest checkpoint in ``out``) or a checkpoint directory.
        overwrite: start afresh in an ``out`` that holds checkpoints, deleting them.
        progress: show the rich progress bar (rank 0).
        threads: CPU threads per process; None chooses (see ``--threads``).
    """

    preset: str = "tiny"
    model: dict = field(default_factory=dict)
    data: str | None = None
    tokenizer: str | None = None
    out: str | None = None
    name: str | None = None
    steps: int | None = None
    stop_at: int | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    packing: bool = True
    sp: int = 1
    sp_strategy: str | None = None
    sp_layout: str = "contiguous"
    lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    activation_checkpointing: bool | None = None
    compile: bool | None = None
    dtype: str = "auto"
    seed: int = 0
    eval_docs: int = 8
    eval_every: int | None = None
    eval_batches: int | None = None
    log_every: int | None = None
    save_every: int | None = None
    keep: int = 2
    resume: str | None = None
    overwrite: bool = False
    progress: bool = True
    threads: int | None = None

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / (self.name or self.preset)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    return check_positive_int(name, value, minimum, ConfigError)


def _check_world(sp: int) -> None:
    """torchrun exports WORLD_SIZE before the process starts, so a bad --sp fails here,
    before any process group exists."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % sp:
        config_fail("--sp", f"a divisor of the world size {world} (data-parallel degree = "
                    "world size / sp)", sp)


def resolve(cfg: TrainConfig) -> tuple[TrainConfig, ModelConfig]:
    """Fill preset defaults and check everything that can be checked without data or a
    process group. Returns the completed config and the model config (its vocabulary
    size is set later from the tokenizer)."""
    if cfg.preset not in PRESETS:
        config_fail("--preset", "one of " + ", ".join(PRESETS), repr(cfg.preset))
    defaults = PRESET_TRAINING[cfg.preset]
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    if cfg.activation_checkpointing is None:
        cfg.activation_checkpointing = False
    if cfg.eval_every is None:
        cfg.eval_every = cfg.steps
    for name in ("steps", "seq_len", "batch_size", "sp", "eval_every", "log_every", "save_every",
                 "keep", "eval_docs"):
        _positive_int("--" + name.replace("_", "-"), getattr(cfg, name))
    for name in ("warmup", "eval_batches"):
        _positive_int("--" + name.replace("_", "-"), getattr(cfg, name), 0)
    if cfg.threads is not None:
        _positive_int("--threads", cfg.threads)
    if cfg.stop_at is not None:
        _positive_int("--stop-at", cfg.stop_at)
        if cfg.stop_at > cfg.steps:
            config_fail("--stop-at", f"a step <= --steps = {cfg.steps}", cfg.stop_at)
    if not cfg.lr > 0:
        config_fail("--lr", "a positive learning rate", cfg.lr)
    if not 0 <= cfg.min_lr_ratio <= 1:
        config_fail("--min-lr-ratio", "a number in [0, 1]", cfg.min_lr_ratio)
    if not cfg.grad_clip > 0:
        config_fail("--grad-clip", "a positive max gradient norm", cfg.grad_clip)
    if cfg.dtype not in ("auto", "bf16", "fp32"):
        config_fail("--dtype", "'auto', 'bf16' or 'fp32'", repr(cfg.dtype))
    _check_world(cfg.sp)
    if cfg.sp_layout not in ("contiguous", "zigzag"):
        config_fail("--sp-layout", "'contiguous' or 'zigzag'", repr(cfg.sp_layout))
    if cfg.sp_strategy not in (None, *SP_STRATEGIES):
        config_fail("--sp-strategy", "one of " + ", ".join(SP_STRATEGIES), repr(cfg.sp_strategy))
    tokens = cfg.batch_size * cfg.seq_len if cfg.packing else cfg.seq_len
    pieces = cfg.sp * (2 if cfg.sp_layout == "zigzag" else 1)
    if cfg.sp > 1 and tokens % pieces:
        what = ("--batch-size x --seq-len (the packed stream each data-parallel group splits)"
                if cfg.packing else "--seq-len (each rank holds seq_len / sp tokens of every row)")
        config_fail(what, f"a multiple of {pieces} (--sp {cfg.sp}, {cfg.sp_layout} layout; "
                    "nothing is padded)", tokens)
    if cfg.data is not None and not Path(cfg.data).exists():
        config_fail("--data", "an existing text file, folder or .jsonl file", repr(cfg.data))
    if cfg.tokenizer is not None and not Path(cfg.tokenizer).is_file():
        config_fail("--tokenizer", "an existing tokenizers JSON file", repr(cfg.tokenizer))
    try:
        model_cfg = preset(cfg.preset, **cfg.model)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model configuration: {e}") from None
    heads = {model_cfg.n_heads, model_cfg.n_kv_heads or model_cfg.n_heads}
    if cfg.sp_strategy == "alltoall" and "attn" in model_cfg.pattern and any(h % cfg.sp for h in heads):
        config_fail("--sp-strategy alltoall", f"attention head counts divisible by --sp = {cfg.sp} "
                    "(Ulysses splits heads over the SP ranks)", f"heads {sorted(heads)}")
    return cfg, model_cfg


def _parse_set(items: list[str]) -> dict:
    """``key=value`` pairs for ModelConfig; values are parsed as the field's type."""
    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            config_fail("--set", "key=value with key among " + ", ".join(types), repr(item))
        kind = str(types[key])
        try:
            if value == "None" and "None" in kind:
                out[key] = None
            elif "bool" in kind:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1")
            elif kind.startswith("int"):
                out[key] = int(value)
            elif kind.startswith("float"):
                out[key] = float(value)
            else:
                out[key] = value
        except ValueError:
            config_fail("--set", f"a value of type {kind} for {key}", repr(value))
    return out


class HelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to an option's help only when it says something: not for
    None or a flag's True/False, and not when the help already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or "default" in text or default is None
                or isinstance(default, bool) or default == [] or default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def report_error(text: str) -> None:
    """Print ``text`` to stderr once (rank 0 under torchrun) and hand it to torchrun's
    launcher through its error file, so that the launcher's failure summary ends with
    this line instead of a pointer to a traceback."""
    if not _rank0():
        return
    print(text, file=sys.stderr)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": text, "timestamp": int(time.time())}))


class ArgumentParser(argparse.ArgumentParser):
    """argparse that speaks once under torchrun: usage, help and errors on rank 0 only
    (every rank still exits with argparse's status)."""

    def print_usage(self, file=None):
        if _rank0():
            super().print_usage(file)

    def print_help(self, file=None):
        if _rank0():
            super().print_help(file)

    def error(self, message):
        self.print_usage(sys.stderr)
        report_error(f"{self.prog}: error: {message}")
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="seqpar train",
        description="Train a hybrid language model, on one CPU or under torchrun on many GPUs "
                    "(--sp N: sequence parallelism; the rest of the world size is data parallel). "
                    "Options marked 'preset' take the --preset's value unless given.",
        epilog="A second run into the same --out needs --resume (continue) or --overwrite "
               "(start over). Under torchrun: torchrun --nproc-per-node N -m seqpar.train ...",
        formatter_class=HelpFormatter)
    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=d.preset, help="model size: " + ", ".join(PRESETS))
    g.add_argument("--mixers", default=None,
                   help="per-layer mixer pattern, repeated over the layers, e.g. gdn,gdn,gdn,attn; "
                        "names: " + ", ".join(MIXERS) + " (default: the preset's)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ModelConfig field, e.g. --set n_layers=6 (repeatable)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="a text file (one document, any suffix), a .jsonl file (one document per "
                        "line, its 'text' field) or a folder (every file below it with suffix "
                        + " ".join(sorted(TEXT_SUFFIXES)) + "; hidden and non-UTF-8 files skipped) "
                        "(default: the Python standard library's source)")
    g.add_argument("--tokenizer", default=None, metavar="JSON",
                   help="Hugging Face tokenizers JSON file (default: UTF-8 bytes)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: preset)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="sequences per data-parallel rank per step (default: preset)")
    g.add_argument("--no-packing", dest="packing", action="store_false",
                   help="plain windows without document boundaries (default: documents packed "
                        "with cu_seqlens)")
    g.add_argument("--eval-docs", type=int, default=d.eval_docs,
                   help="documents held out for the evaluation loss")
    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--sp", type=int, default=d.sp, help="sequence-parallel degree")
    g.add_argument("--sp-strategy", default=None, choices=SP_STRATEGIES,
                   help="SequenceParallel strategy (default: scan for linear mixers, allgather "
                        "(contiguous) or ring (zigzag) for attention)")
    g.add_argument("--sp-layout", default=d.sp_layout, choices=("contiguous", "zigzag"),
                   help="how a sequence is split over the SP ranks")
    g.add_argument("--dtype", default=d.dtype, choices=("auto", "bf16", "fp32"),
                   help="auto: bf16 autocast on GPU, float32 on CPU")
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="recompute each block in backward")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: $OMP_NUM_THREADS if set, which "
                        "torchrun sets to 1; else one per 256 of model width, at most the cores "
                        "of this process over the processes on this machine)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each block (default: on for CUDA, off on CPU; --no-compile "
                        "turns it off)")
    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, default=None,
                   help="total optimizer steps, which the schedule spans (default: preset)")
    g.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="end this invocation after this step, checkpointing it (default: --steps)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: preset)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                   help="final learning rate of the cosine decay, as a fraction of --lr")
    g.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps (default: preset)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay of matrices (none on vectors)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip,
                   help="largest global gradient norm")
    g.add_argument("--seed", type=int, default=d.seed, help="model init and data order")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    g.add_argument("--name", default=None, help="run name (default: the preset)")
    g.add_argument("--log-every", type=int, default=None,
                   help="steps between metric records (default: preset)")
    g.add_argument("--eval-every", type=int, default=None,
                   help="steps between evaluations (default: preset)")
    g.add_argument("--eval-batches", type=int, default=None,
                   help="batches per evaluation; 0 skips evaluation (default: preset)")
    g.add_argument("--save-every", type=int, default=None,
                   help="steps between checkpoints, and one at the end (default: preset)")
    g.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep")
    g.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from the newest checkpoint in --out that verifies, or from PATH "
                        "(a run or checkpoint directory)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --out that already holds checkpoints, deleting them")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="log lines instead of a progress bar (default: a bar on a terminal)")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> :class:`TrainConfig` (not yet resolved)."""
    ns = vars(build_parser().parse_args(argv))
    model = _parse_set(ns.pop("set"))
    mixers = ns.pop("mixers")
    if mixers is not None:
        model["pattern"] = mixers
    return TrainConfig(model=model, **ns)
