"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): written atomically, verified
before they are read.

Layout: ``<out>/checkpoints/step_000123/`` holds the DCP files (model and optimizer
shards, scheduler, data position, per-rank RNG states, step), ``tokenizer.json`` (a copy
of ``--tokenizer``'s file, when the run has one) and ``meta.json`` (step, model
configuration, tokenizer, parallel layout, and the size and sha256 of every other file;
readable without torch.distributed).

Atomicity: every rank writes into ``.tmp-step_000123``; once DCP has finished (its
metadata file is the last thing written), the ranks hash the files (each a stripe of
them), rank 0 adds ``meta.json`` and renames the directory to ``step_000123``. Only names
matching ``step_<digits>`` are ever read, so a save killed midway leaves a ``.tmp-*``
directory that is ignored (and removed by the next save) and the previous checkpoint
stays the newest.

Integrity: :func:`choose` checks a checkpoint against its ``meta.json`` (every file
present, of its recorded size and sha256) before anything is loaded. A damaged newest
checkpoint is moved aside to ``damaged-step_000123`` (kept for inspection, never read)
and the next older one is tried; if none verifies, the resume is refused. Pruning to the
last ``keep`` runs only after a new checkpoint is published with its hashes, so the
newest verified checkpoint is never deleted before a newer one exists.
"""
from __future__ import annotations

import contextlib
import hashlib
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
# DCP's global plan; without it nothing in the directory can be read.
DCP_METADATA = ".metadata"
DAMAGED_PREFIX = "damaged-"
# A copy of the run's tokenizers file (runs with --tokenizer), so a checkpoint loads alone.
TOKENIZER = "tokenizer.json"
_BLOCK = 1 << 22


def checkpoint_root(out: Path) -> Path:
    return out / "checkpoints"


def step_of_name(name: str) -> int | None:
    """The step of a checkpoint directory name ``step_<digits>``, else None."""
    m = _NAME.match(name)
    return None if m is None else int(m.group(1))


def step_of(path: Path) -> int:
    return step_of_name(path.name)


def list_checkpoints(out: Path) -> list[Path]:
    """Published checkpoint directories under ``out`` (verified or not), oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _NAME.match(p.name) and p.is_dir()), key=step_of)


def candidates(resume: str, out: Path) -> list[Path]:
    """The checkpoints a ``--resume`` may use, newest first: ``'latest'`` -> every
    checkpoint in ``out``; a run directory -> every checkpoint in it; a checkpoint
    directory -> itself only (a damaged one is then refused, never swapped for another)."""
    if resume == "latest":
        found = list_checkpoints(out)
        if not found:
            raise ConfigError(f"--resume: expected a checkpoint under {checkpoint_root(out)}, "
                              "got none (pass --out of the run to continue, or a checkpoint path)")
        return found[::-1]
    path = Path(resume)
    if _NAME.match(path.name) and path.is_dir():
        return [path]
    found = list_checkpoints(path)
    if not found:
        raise ConfigError(f"--resume: expected a checkpoint directory (step_N) or a run "
                          f"directory holding checkpoints, got {str(path)!r}")
    return found[::-1]


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def try_read_meta(path: Path) -> dict | None:
    """``meta.json`` of ``path`` when it is readable and describes a model, else None."""
    _, meta = _structure_problem(path, sizes=False)
    return meta


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` on one process)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _hash_files(path: Path) -> dict[str, dict]:
    """Size and sha256 of every file of ``path`` but ``meta.json``; each rank hashes a
    stripe of the files and all ranks get the union (collective)."""
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and p.name != META)
    rank, world = _rank_world()
    mine = {n: {"bytes": (path / n).stat().st_size, "sha256": sha256(path / n)}
            for n in names[rank::world]}
    files = {}
    for part in _gather(mine):
        files.update(part)
    return dict(sorted(files.items()))


def _structure_problem(path: Path, sizes: bool = True) -> tuple[str | None, dict | None]:
    """What is wrong with ``path`` that needs no hashing (its description, and with
    ``sizes`` every listed file's presence and size): ``(problem or None, meta)``."""
    if not (path / META).is_file():
        return f"{META}: missing (the checkpoint cannot be checked)", None
    try:
        meta = read_meta(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{META}: unreadable ({e}; truncated?)", None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), dict) for k in ("model", "tokenizer")):
        return f"{META}: not a seqpar checkpoint description", None
    files = meta.get("files")
    if files is None or not sizes:
        return None, meta  # saved before seqpar recorded hashes: nothing to compare with
    if not isinstance(files, dict) or DCP_METADATA not in files:
        return f"{META}: its file list is malformed or lacks {DCP_METADATA}", None
    for name, rec in files.items():
        f = path / name
        if not f.is_file():
            return f"{name}: missing", meta
        size = f.stat().st_size
        if size != rec.get("bytes"):
            return f"{name}: {size} bytes, expected {rec.get('bytes')} (truncated or rewritten)", meta
    return None, meta


def verify(path: Path, collective: bool = True) -> tuple[str | None, dict | None]:
    """Check ``path`` against its ``meta.json``. ``collective`` under torch.distributed:
    the ranks hash a stripe of the files each and agree on the answer; otherwise this
    process checks everything. Returns ``(problem, meta)``: ``problem`` is None when the
    checkpoint verifies, else one phrase naming the file and what is wrong; ``meta`` is
    None when unreadable."""
    problem, meta = _structure_problem(path)
    bad = []
    if problem is None and meta is not None and meta.get("files") is not None:
        names = sorted(meta["files"])
        rank, world = _rank_world() if collective else (0, 1)
        bad = [n for n in names[rank::world] if sha256(path / n) != meta["files"][n]["sha256"]]
    answers = _gather((problem, bad)) if collective else [(problem, bad)]
    problem = next((p for p, _ in answers if p is not None), None)
    bad = sorted(n for _, part in answers for n in part)
    if problem is None and bad:
        problem = (f"{bad[0]}: content differs from the sha256 recorded in {META}"
                   + (f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""))
    return problem, meta


def choose(found: list[Path], check_meta) -> tuple[Path, dict, list[str]]:
    """The newest checkpoint of ``found`` (newest first) that verifies (collective).

    ``check_meta(meta, path)`` raises :class:`ConfigError` for a checkpoint of another
    model. Damaged checkpoints newer than the chosen one are moved aside (rank 0) to
    ``damaged-step_N``. Returns ``(path, meta, notes)``, ``notes`` one line per damaged
    checkpoint and one saying which checkpoint resumes. Raises :class:`ConfigError`
    (one line, every checkpoint and its problem) when none verifies.
    """
    problems = []
    for path in found:
        problem, meta = verify(path)
        if problem is None:
            break
        problems.append((path, problem))
    else:
        where = found[0].parent
        raise ConfigError(
            f"--resume: expected a checkpoint that verifies, got none in {where}: "
            + "; ".join(f"{p.name}: {msg}" for p, msg in problems)
            + " (nothing was loaded; start over with --overwrite, or restore the files)")
    check_meta(meta, path)
    notes = []
    for bad, problem in problems:
        aside = bad.with_name(DAMAGED_PREFIX + bad.name)
        notes.append(f"checkpoint {bad.name} is damaged: {problem}; moved aside to {aside.name}")
    if problems:
        rank, _ = _rank_world()
        if rank == 0:
            for bad, _ in problems:
                aside = bad.with_name(DAMAGED_PREFIX + bad.name)
                if aside.exists():
                    shutil.rmtree(aside)
                bad.rename(aside)
        _barrier()
        notes.append(f"resuming from {path.name}, the newest checkpoint that verifies")
    elif meta.get("files") is None:
        notes.append(f"checkpoint {path.name} has no file hashes (saved by an older seqpar); "
                     "resuming from it unverified")
    return path, meta, notes


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


def _fsync_write(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save(out: Path, step: int, state: dict, meta: dict, keep: int) -> Path:
    """Write ``state`` (a DCP state dict) as checkpoint ``step`` on every rank
    collectively; rank 0 records every file's size and sha256 in ``meta.json``,
    publishes the checkpoint by rename and then prunes the checkpoints not newer than
    it to the newest ``keep`` (newer ones are left alone)."""
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
    tokenizer = (meta.get("config") or {}).get("tokenizer")
    if tokenizer is not None and _is_rank0():
        shutil.copyfile(tokenizer, tmp / TOKENIZER)
    _barrier()
    files = _hash_files(tmp)
    if _is_rank0():
        _fsync_write(tmp / META, json.dumps(dict(meta, files=files), indent=2))
        if final.exists():
            # Same step saved again (a resumed run re-saving): swap, never leave no copy.
            old = root / f".tmp-old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        problem, _ = _structure_problem(final)
        if problem is None:
            older = [p for p in list_checkpoints(out) if step_of(p) <= step]
            for old in older[:-keep]:
                shutil.rmtree(old)
    _barrier()
    if _is_rank0() and problem is not None:
        raise RuntimeError(f"checkpoint {final} does not verify right after saving ({problem}); "
                           "nothing was pruned")
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
