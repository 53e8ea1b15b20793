"""Checkpoint integrity: every file's sha256 in ``meta.json``, verification before
loading, fallback to the newest checkpoint that verifies, refusal when none does, and
pruning that never loses the newest verified checkpoint.

One small run (2 layers, d_model 32) saves step 2 and stops at step 4 of 6; each case
damages a copy of it and resumes. A resume that falls back to step 2 must give exactly the
losses of an uninterrupted 6-step run from step 3 on: nothing trains on damaged weights.
(The 2-rank case, a shard of rank 1 damaged, runs in ``test_train.py``'s gloo worker.)
Budget: ~15 s.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import flip_bytes, small_cfg, write_corpus
from seqpar.train import checkpoint as ckpt
from seqpar.train import main, run
from seqpar.train.config import ConfigError

PATTERN = "gdn,attn"
SHARD = "__0_0.distcp"


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run stopped at step 4 of 6 (checkpoints 2 and 4) and the losses of the same run
    uninterrupted."""
    root = tmp_path_factory.mktemp("ckpt")
    data = write_corpus(root / "corpus.jsonl")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = run(small_cfg(data, root / "full", PATTERN, steps=6, save_every=2))
        run(small_cfg(data, root / "cut", PATTERN, steps=6, save_every=2, stop_at=4))
    finally:
        torch.set_num_threads(n)
    return data, root / "cut", full.losses


def copy_run(base, tmp_path) -> tuple[Path, Path]:
    data, cut, _ = base
    out = tmp_path / "run"
    shutil.copytree(cut, out)
    return data, out


def step_dir(out: Path, step: int) -> Path:
    return ckpt.checkpoint_root(out) / f"step_{step:06d}"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGE = {
    "flipped shard bytes": (lambda d: flip_bytes(d / SHARD), f"{SHARD}: content differs from the sha256"),
    "truncated shard": (lambda d: truncate(d / SHARD), f"{SHARD}: "),
    "missing .metadata": (lambda d: (d / ".metadata").unlink(), ".metadata: missing"),
    "truncated meta.json": (lambda d: truncate(d / "meta.json"), "meta.json: unreadable"),
    "missing shard": (lambda d: (d / SHARD).unlink(), f"{SHARD}: missing"),
    "missing meta.json": (lambda d: (d / "meta.json").unlink(), "meta.json: missing"),
}


def test_meta_records_every_file_and_it_verifies(base):
    _, cut, _ = base
    path = step_dir(cut, 4)
    files = ckpt.read_meta(path)["files"]
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "meta.json")
    assert sorted(files) == on_disk and ".metadata" in files and SHARD in files
    for name, rec in files.items():
        assert rec["bytes"] == (path / name).stat().st_size and rec["sha256"] == ckpt.sha256(path / name)
    assert ckpt.verify(path) == (None, ckpt.read_meta(path))


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_latest_falls_back_to_the_newest_that_verifies(case, base, tmp_path, capsys):
    damage, message = DAMAGE[case]
    data, out = copy_run(base, tmp_path)
    damage(step_dir(out, 4))
    problem, _ = ckpt.verify(step_dir(out, 4))
    assert problem is not None and problem.startswith(message), problem
    capsys.readouterr()
    resumed = run(small_cfg(data, out, PATTERN, steps=6, save_every=2, resume="latest"))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith(("checkpoint ", "resuming "))]
    assert len(lines) == 2 and message in lines[0] and "step_000004" in lines[0], err
    assert "resuming from step_000002" in lines[1], err
    assert resumed.steps == [3, 4, 5, 6]
    assert resumed.losses == base[2][2:], "trained on the checkpoint that verifies, exactly"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_000004", "step_000006"]
    assert (ckpt.checkpoint_root(out) / "damaged-step_000004").is_dir(), "kept aside for inspection"
    for path in ckpt.list_checkpoints(out):
        assert ckpt.verify(path)[0] is None


def test_none_verifies_refuses_in_one_line_and_changes_nothing(base, tmp_path, capsys, monkeypatch):
    data, out = copy_run(base, tmp_path)
    flip_bytes(step_dir(out, 4) / SHARD)
    (step_dir(out, 2) / ".metadata").unlink()
    monkeypatch.setattr(ckpt, "load", lambda *a: pytest.fail("a damaged checkpoint was loaded"))
    argv = ["--data", str(data), "--out", str(out), "--mixers", PATTERN, "--set", "n_layers=2",
            "--set", "d_model=32", "--set", "n_heads=2", "--set", "head_dim=16", "--set", "chunk_size=16",
            "--set", "max_seq_len=64", "--seq-len", "32", "--batch-size", "2", "--steps", "6",
            "--no-progress", "--resume"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("seqpar train: error: --resume: expected a checkpoint that verifies") \
        and f"step_000004: {SHARD}: content differs" in err and "step_000002: .metadata: missing" in err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_000002", "step_000004"]


def test_named_damaged_checkpoint_is_refused_not_replaced(base, tmp_path):
    data, out = copy_run(base, tmp_path)
    truncate(step_dir(out, 4) / SHARD)
    with pytest.raises(ConfigError, match=f"step_000004: {SHARD}: .* bytes, expected"):
        run(small_cfg(data, out, PATTERN, steps=6, save_every=2, resume=str(step_dir(out, 4))))


def test_checkpoint_without_hashes_resumes_with_a_warning(base, tmp_path, capsys):
    """Checkpoints written before hashes were recorded still resume, saying so."""
    data, out = copy_run(base, tmp_path)
    meta_path = step_dir(out, 4) / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    resumed = run(small_cfg(data, out, PATTERN, steps=6, save_every=2, resume="latest"))
    assert resumed.steps == [5, 6] and resumed.losses == base[2][4:]
    assert "step_000004 has no file hashes" in capsys.readouterr().err


def test_prune_keeps_the_new_checkpoint_and_leaves_newer_ones(base, tmp_path):
    """A newer checkpoint that was not verified never takes the slot of the one just saved;
    with keep=1 the older verified one goes only once the new one is published."""
    data, out = copy_run(base, tmp_path)
    stale = step_dir(out, 4).rename(step_dir(out, 9))
    run(small_cfg(data, out, PATTERN, steps=6, save_every=3, keep=1,
                  resume=str(step_dir(out, 2))))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_000006", stale.name]


def test_finished_run_resumes_to_nothing(base, tmp_path, capsys):
    data, out = copy_run(base, tmp_path)
    cfg = small_cfg(data, out, PATTERN, steps=4, save_every=2, resume="latest")
    assert run(cfg).steps == []
    err = capsys.readouterr().err
    assert "no steps left of 4" in err and "5..4" not in err
    assert "nothing to do: step_000004 is at step 4" in err
