"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

Layout: ``<out>/checkpoints/step_000123/`` holds the DCP files (model and optimizer
shards, scheduler, data position, per-rank RNG states, step) and ``meta.json`` (step,
model configuration, tokenizer, parallel layout; readable without torch.distributed).

Atomicity: every rank writes into ``.tmp-step_000123``; once DCP has finished (its
metadata file is the last thing written), rank 0 adds ``meta.json`` and renames the
directory to ``step_000123``. Only names matching ``step_<digits>`` are ever read, so a
save killed midway leaves a ``.tmp-*`` directory that is ignored (and removed by the next
save) and the previous checkpoint stays the newest. The last ``keep`` are kept.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .config import ConfigError

_NAME = re.compile(r"^step_(\d+)$")
META = "meta.json"


def checkpoint_root(out: Path) -> Path:
    return out / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints under ``out``, oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _NAME.match(p.name)) and (p / META).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(resume: str, out: Path) -> Path:
    """``'latest'`` -> the newest checkpoint in ``out``; a checkpoint directory -> itself;
    a run directory -> its newest checkpoint."""
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise ConfigError(f"--resume: expected a checkpoint under {checkpoint_root(out)}, "
                              "got none (pass --out of the run to continue, or a checkpoint path)")
        return found[-1]
    path = Path(resume)
    if (path / META).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise ConfigError(f"--resume: expected a checkpoint directory (with {META}) or a run "
                          f"directory holding checkpoints, got {str(path)!r}")
    return found[-1]


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def check_compatible(meta: dict, path: Path, model: dict, tokenizer: dict) -> None:
    """Refuse a checkpoint whose model or tokenizer differ from this run's, naming every
    difference."""
    diffs = [f"{k}: {meta['model'].get(k)!r} in the checkpoint, {model.get(k)!r} now"
             for k in sorted(set(meta["model"]) | set(model)) if meta["model"].get(k) != model.get(k)]
    diffs += [f"tokenizer {k}: {meta['tokenizer'].get(k)!r} in the checkpoint, {tokenizer.get(k)!r} now"
              for k in sorted(set(meta["tokenizer"]) | set(tokenizer))
              if meta["tokenizer"].get(k) != tokenizer.get(k)]
    if diffs:
        raise ConfigError(f"--resume: expected a checkpoint of the same model and tokenizer, got "
                          f"{path} with " + "; ".join(diffs)
                          + " (resume with the options it was trained with, or start a new --out)")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def save(out: Path, step: int, state: dict, meta: dict, keep: int) -> Path:
    """Write ``state`` (a DCP state dict) as checkpoint ``step`` on every rank
    collectively; rank 0 publishes it by rename and prunes to the newest ``keep``."""
    root = checkpoint_root(out)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-{final.name}"
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale)
    _barrier()
    with _single_process_ok():
        dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _is_rank0():
        with (tmp / META).open("w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            # Same step saved again (a resumed run re-saving): swap, never leave no copy.
            old = root / f".tmp-old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    _barrier()
    return final


def load(path: Path, state: dict) -> None:
    """Fill ``state`` in place from the checkpoint at ``path`` (collective)."""
    with _single_process_ok():
        dcp.load(state, checkpoint_id=str(path))


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns when no process group exists; one process is a supported run here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
