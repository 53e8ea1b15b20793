"""The training step's speed rules on CPU, and the training benchmarks run tiny.

A step reads nothing back from the device (no ``.item()``, ``.tolist()``, ``int()`` /
``float()`` / ``bool()`` of a tensor) outside the log steps; batch ids are checked on the
host; ``--compile`` defaults to off on CPU. ``seqpar bench train``, ``attn``, ``profile``
and ``longest`` run end to end at tiny sizes and write their JSON.
"""
from __future__ import annotations

import contextlib
import json
import traceback

import pytest
import torch

from seqpar import cli
from seqpar.train import TrainConfig, Trainer, parse_args, resolve
from seqpar.train.data import Batch
from seqpar.train.distributed import DistEnv

READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")


def _trainer(**model):
    cfg, model_cfg = resolve(TrainConfig(preset="tiny", model=dict(n_layers=3, pattern="gdn,attn,hyena",
                                                                   **model), warmup=2))
    return Trainer(cfg, model_cfg, DistEnv(device=torch.device("cpu")))


def _batch(vocab, cuts=(0, 5, 6, 40, 64)):
    gen = torch.Generator().manual_seed(len(cuts))
    ids = torch.randint(0, vocab, (1, 65), generator=gen)
    return Batch(ids[:, :-1], ids[:, 1:], torch.tensor(cuts, dtype=torch.int32))


@contextlib.contextmanager
def _host_reads():
    """The tensor-to-host reads made inside, as ``name at file:line``; except those of
    ``torch.optim``'s CPU AdamW, which reads its step counter (a CPU tensor; on CUDA the
    trainer takes the fused AdamW, whose counters stay on the device)."""
    reads, saved = [], {name: getattr(torch.Tensor, name) for name in READS}

    def spy(name):
        def read(self, *a, **kw):
            stack = traceback.extract_stack()[:-1]
            if not any("torch/optim/" in f.filename for f in stack):
                reads.append(f"{name} at {stack[-1].filename}:{stack[-1].lineno}")
            return saved[name](self, *a, **kw)
        return read

    for name in READS:
        setattr(torch.Tensor, name, spy(name))
    try:
        yield reads
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)


def test_step_reads_nothing_back():
    """Packed training steps with different documents read no tensor value on the host
    (the batch's host offsets are registered by ``to_device``, before the step)."""
    trainer = _trainer()
    trainer.step(trainer.to_device(_batch(256)))  # first-call work aside
    for cuts in ((0, 5, 6, 40, 64), (0, 30, 64), (0, 64)):
        batch = trainer.to_device(_batch(256, cuts))
        with _host_reads() as reads:
            loss, grad_norm = trainer.step(batch)
        assert reads == [], (cuts, reads)
        assert loss.dim() == 0 and grad_norm.dim() == 0 and torch.isfinite(loss)


def test_ids_are_checked_on_the_host():
    trainer = _trainer()
    bad = _batch(256)
    bad.input_ids[0, 3] = 10_000
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 256\)"):
        trainer.to_device(bad)


def test_compile_flag():
    assert parse_args(["--no-compile"]).compile is False
    assert parse_args(["--compile"]).compile is True
    assert parse_args([]).compile is None
    assert _trainer().compiled is False  # CPU default


def _run(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err[-2000:]
    return out.out


def test_bench_train_tiny(tmp_path, capsys):
    out = tmp_path / "train.json"
    text = _run(["bench", "train", "--preset", "tiny", "--seq-len", "32", "--batch-size", "2",
                 "--warmup", "1", "--steps", "2", "--threads", "1", "--out", str(out)], capsys)
    data = json.loads(out.read_text())
    assert "6 N" in data["mfu_formula"] and "MFU" in text
    runs = data["runs"]
    assert [r["mixers"] for r in runs] == ["gdn,gdn,gdn,attn", "attn"]
    for r in runs:
        assert r["tokens_per_s"] > 0 and r["mfu"] is None and r["compile"] is False
        assert len(r["losses"]) == 3 and r["flops_per_token"] > 6 * r["matmul_params"]
    assert runs[0]["model"]["d_model"] == runs[1]["model"]["d_model"]
    assert runs[0]["model"]["n_layers"] == runs[1]["model"]["n_layers"]


def test_bench_train_scaling(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    _run(["bench", "train", "--shape", "mqar", "--seq-len", "16", "--scaling", "1,3", "--no-packing",
          "--reference", "none", "--warmup", "1", "--steps", "1", "--threads", "1", "--out", str(out)],
         capsys)
    (s,) = json.loads(out.read_text())["scaling"]
    assert s["mixers"] == "gdn" and s["batch_sizes"] == [1, 3] and s["ratio"] > 0
    assert s["linear_ratio"] == 3


def test_bench_attn_tiny(tmp_path, capsys):
    out = tmp_path / "attn.json"
    _run(["bench", "attn", "--T", "64", "--heads", "2", "--head-dim", "8", "--reps", "1",
          "--warmup", "1", "--out", str(out)], capsys)
    (row,) = json.loads(out.read_text())["rows"]
    assert row["ratio"] > 0 and row["ratio_packed"] > 0
    assert all(e < 1e-5 for e in row["rel_err"].values()), row["rel_err"]


def test_bench_profile_tiny(tmp_path, capsys):
    out = tmp_path / "prof.json"
    _run(["bench", "profile", "train", "--out", str(out), "--warm", "1", "--steps", "1", "--rows", "3",
          "--preset", "tiny", "--seq-len", "32", "--batch-size", "1"], capsys)
    data = json.loads(out.read_text())
    assert data["what"] == "train" and len(data["top_cpu"]) == 3


def test_bench_longest_tiny(tmp_path, capsys):
    """The search (a torchrun child on CPU) with memory simulated to run out above 512."""
    out = tmp_path / "longest.json"
    rc = cli.main(["bench", "longest", "search", "--preset", "tiny", "--first", "256", "--last", "1024",
                   "--granularity", "256", "--warm", "64", "--oom-above", "512", "--budget", "240",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    res = json.loads(out.read_text())["p1"]
    assert res["longest_ok"] == 512 and res["smallest_failed"] == 768


def test_bench_lists_subcommands(capsys):
    assert cli.main([]) == 2
    assert "seqpar bench" in capsys.readouterr().err
    assert cli.main(["bench", "--help"]) == 0
    usage = capsys.readouterr().out
    for name in ("ops", "sp", "train", "longest", "profile", "attn"):
        assert f"seqpar bench {name}" in usage
