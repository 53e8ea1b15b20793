"""``seqpar train``: data pipeline, SP/DP training steps equal to one process, exact
resume, atomic checkpoints, bad configurations and the ``seqpar`` command.

Distributed checks run in one 2-rank gloo group (process start and ``import torch``
cost seconds each); the workers return results that the tests below read. Models are
tiny (d_model 32) on a synthetic corpus of short documents, so packed batches have many
document boundaries, several of them crossing the shard boundary.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.filesystem import FileSystemWriter

import seqpar
from conftest import rel_err, small_cfg, write_corpus
from seqpar import cli
from seqpar.generate import build_parser as generate_parser
from seqpar.layers import MIXERS
from seqpar.train import TrainConfig, Trainer, build_loaders, loop, main, prepare, run
from seqpar.train import checkpoint as ckpt
from seqpar.train.config import build_parser
from seqpar.train.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    HFTokenizer,
    Loader,
    WindowSampler,
    load_documents,
    pack_windows,
    split_documents,
    stdlib_files,
    token_stream,
)
from seqpar.train.distributed import DistEnv, cpu_threads, mesh_env
from seqpar.train.loop import lr_factor

TOL = 1e-5
# Parameter updates of the first AdamW step are g / (|g| + eps): elements whose gradient is
# near eps turn float32 summation-order noise (~1e-7 in the gradients) into ~1e-5 in the
# update; a wrong shard or a rank that skipped its update errs by O(1). (Clipping is
# checked through the global gradient norm, at TOL: Adam's first step hardly sees it.)
TOL_UPDATE = 1e-3
ALL_MIXERS = ",".join(MIXERS)  # every mixer
@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one thread is faster and steadier than several."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    return out


def _params(model) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}


def step_errors(data: Path, out: Path, env: DistEnv, pattern: str, packing: bool,
                batch_size: int, seq_len: int, ac: bool = False) -> dict[str, float]:
    """Relative errors of loss and every gradient of one step under ``env`` (with
    activation checkpointing if ``ac``) against one process on the whole global batch
    (rank 0 computes the reference)."""
    plan = prepare(small_cfg(data, out, pattern, packing=packing, batch_size=batch_size,
                             sp=env.sp, seq_len=seq_len, activation_checkpointing=ac,
                             grad_clip=0.5))
    cfg = plan.cfg
    trainer = Trainer(cfg, plan.model_cfg, env)
    train, _ = build_loaders(cfg, plan.tokenizer, env)
    loss = trainer.forward_backward(train.batch(1))
    grads = _grads(trainer.model)
    norm = trainer.optimizer_step()
    params = _params(trainer.model)
    if env.rank != 0:
        return {}
    single = DistEnv(device=torch.device("cpu"))
    ref_cfg = TrainConfig(**{**cfg.__dict__, "batch_size": batch_size * env.dp, "sp": 1,
                             "activation_checkpointing": False})
    ref = Trainer(ref_cfg, plan.model_cfg, single)
    ref_train, _ = build_loaders(ref_cfg, plan.tokenizer, single)
    batch = ref_train.batch(1)
    if packing:
        cu = batch.cu_seqlens.tolist()
        assert any(c % seq_len for c in cu), "documents should end inside windows"
        if env.sp > 1:
            assert seq_len * batch_size // 2 not in cu, "a document should cross the shard boundary"
    ref_loss = ref.forward_backward(batch)
    ref_grads = _grads(ref.model)
    ref_norm = ref.optimizer_step()
    ref_params = _params(ref.model)
    errs = {"loss": rel_err(loss, ref_loss), "grad_norm": rel_err(norm, ref_norm)}
    errs.update({k: rel_err(grads[k], ref_grads[k]) for k in ref_grads})
    init = _params(Trainer(ref_cfg, plan.model_cfg, single).model)
    errs.update({f"update/{k}": rel_err(params[k] - init[k], ref_params[k] - init[k])
                 for k in ref_params})
    assert ref_norm > cfg.grad_clip, "clipping should be active in this check"
    return errs


def resume_losses(data: Path, root: Path, env: DistEnv) -> dict:
    """Losses of an uninterrupted 8-step run, and of a run that crashes at step 6 after
    its step-4 checkpoint and is resumed."""
    n = 4
    base = dict(steps=2 * n, save_every=n, sp=env.sp)
    full = run(small_cfg(data, root / "full", ALL_MIXERS, **base), env)
    crash_at = n + 2
    original = Trainer.step

    def crashing(self, batch):
        if self.scheduler.last_epoch + 1 == crash_at:
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch)

    Trainer.step = crashing
    try:
        run(small_cfg(data, root / "cut", ALL_MIXERS, **base), env)
    except KeyboardInterrupt:
        pass
    finally:
        Trainer.step = original
    resumed = run(small_cfg(data, root / "cut", ALL_MIXERS, resume="latest", **base), env)
    records = [json.loads(x) for x in (root / "cut" / "metrics.jsonl").read_text().splitlines()]
    # Rank 1's shard of the newest checkpoint damaged: the ranks agree to fall back.
    bad = root / "cut" / "checkpoints" / f"step_{2 * n:06d}" / "__1_0.distcp"
    if env.rank == 0:
        raw = bytearray(bad.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        bad.write_bytes(bytes(raw))
    env.barrier()
    fallback = run(small_cfg(data, root / "cut", ALL_MIXERS, resume="latest",
                             **dict(base, steps=n + 2)), env)
    return {"full": (full.steps, full.losses, full.eval_loss),
            "resumed": (resumed.steps, resumed.losses, resumed.eval_loss),
            "logged_steps": [r["step"] for r in records if "loss" in r],
            "fallback": (fallback.steps, [p.name for p in ckpt.list_checkpoints(root / "cut")])}


def _worker(rank, world, store_dir):
    os.environ["WORLD_SIZE"] = str(world)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    root = Path(store_dir)
    data = write_corpus(root / "corpus.jsonl")
    cases = {
        "sp2/packed": lambda: step_errors(data, root / "a", mesh_env(2), ALL_MIXERS, True, 1, 64),
        "sp2/rows/ac": lambda: step_errors(data, root / "b", mesh_env(2), ALL_MIXERS, False, 2, 64,
                                           ac=True),
        "dp2/packed": lambda: step_errors(data, root / "c", mesh_env(1), ALL_MIXERS, True, 2, 32),
        "resume/sp2": lambda: resume_losses(data, root / "r", mesh_env(2)),
    }
    out = {}
    for name, fn in cases.items():
        try:
            out[name] = fn()
        except Exception:  # noqa: BLE001 - reported by the test of this case
            out[name] = traceback.format_exc()
        dist.barrier()
    if rank == 0:
        torch.save(out, root / "results.pt")
    dist.destroy_process_group()


_RESULTS: dict = {}


def dist_results() -> dict:
    if not _RESULTS:
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_worker, args=(2, d), nprocs=2)
            _RESULTS.update(torch.load(Path(d) / "results.pt", weights_only=False))
    return _RESULTS


def _result(name):
    r = dist_results()[name]
    if isinstance(r, str):
        pytest.fail(f"{name} raised:\n{r}")
    return r


# ---------------------------------------------------------------- distributed training

@pytest.mark.dist
@pytest.mark.parametrize("case", ["sp2/packed", "sp2/rows/ac", "dp2/packed"])
def test_step_matches_single_process(case):
    """Loss, every gradient, the gradient norm and every parameter update of one clipped
    AdamW step with FSDP2 and sp = 2 (packed documents: every mixer but Hyena; plain
    rows: every mixer, with activation checkpointing) or dp = 2 equal one process on the
    global batch: the loss is the global token mean, gradients are summed over ranks."""
    errs = _result(case)
    names = {k.split(".")[2] for k in errs if k.startswith("blocks.") and k.count(".") > 2}
    assert "mixer" in names
    bad = {k: v for k, v in errs.items() if not v < (TOL_UPDATE if k.startswith("update/") else TOL)}
    assert not bad, f"{case}: relative errors over {TOL}: {bad}"
    worst = {kind: max(v for k, v in errs.items() if k.startswith("update/") == (kind == "update"))
             for kind in ("loss/gradients", "update")}
    print(f"{case}: max relative error {worst} over {len(errs)} values")


@pytest.mark.dist
def test_resume_continues_exactly():
    """8 steps uninterrupted == 4 steps, checkpoint, crash at step 6, resume, 4 steps (sp = 2);
    then a damaged shard of rank 1 in the newest checkpoint makes both ranks fall back."""
    r = _result("resume/sp2")
    full_steps, full_losses, full_eval = r["full"]
    steps, losses, eval_loss = r["resumed"]
    assert full_steps == list(range(1, 9)) and steps == list(range(5, 9))
    assert losses == full_losses[4:], (losses, full_losses)
    assert eval_loss == full_eval
    assert full_losses[-1] < full_losses[0]
    assert r["logged_steps"] == list(range(1, 9))
    # The damaged step-8 checkpoint is set aside; step 4 verifies and resumes.
    assert r["fallback"] == ([5, 6], ["step_000004", "step_000006"])


# ---------------------------------------------------------------- checkpoints (one process)

def test_save_killed_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    data = write_corpus(tmp_path / "corpus.jsonl")
    cfg = small_cfg(data, tmp_path / "run", "gdn,attn", steps=6, save_every=3)
    full = run(small_cfg(data, tmp_path / "full", "gdn,attn", steps=6, save_every=3))
    writes = []
    original = FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        writes.append(1)
        result = original(self, plan, planner)
        if len(writes) == 2:
            result.wait()
            raise RuntimeError("killed while writing the checkpoint")
        return result

    monkeypatch.setattr(FileSystemWriter, "write_data", write_then_die)
    with pytest.raises(BaseException, match="killed while writing"):  # DCP wraps it
        run(cfg)
    monkeypatch.undo()
    out = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_000003"]
    assert list((out / "checkpoints").glob(".tmp-step_000006")), "the torn save stays aside"
    resumed = run(TrainConfig(**{**cfg.__dict__, "resume": "latest"}))
    assert resumed.steps == [4, 5, 6]
    assert resumed.losses == full.losses[3:]
    assert not list((out / "checkpoints").glob(".tmp-*")), "the next save cleans up"
    assert (out / "loss.png").stat().st_size > 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 7))
    assert any("eval_loss" in r for r in records)


KILL_DURING_SECOND_SAVE = """
import os, signal, sys
from torch.distributed.checkpoint.filesystem import FileSystemWriter
from seqpar.train import main

original, calls = FileSystemWriter.write_data, []

def write_then_die(self, plan, planner):
    calls.append(1)
    result = original(self, plan, planner)
    if len(calls) == 2:
        result.wait()
        os.kill(os.getpid(), signal.SIGKILL)  # no exception handler or finally block runs
    return result

FileSystemWriter.write_data = write_then_die
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_process_killed_during_save_keeps_previous_checkpoint(tmp_path):
    data = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), "--mixers", "gdn", "--set", "n_layers=1",
            "--set", "d_model=32", "--set", "n_heads=2", "--set", "head_dim=16", "--seq-len", "32",
            "--batch-size", "1", "--steps", "4", "--save-every", "2", "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_SAVE, *argv],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_000002"]
    assert main(argv + ["--resume"]) == 0
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_000002", "step_000004"]


def test_keeps_last_k(tmp_path):
    data = write_corpus(tmp_path / "corpus.jsonl")
    run(small_cfg(data, tmp_path / "run", "gdn", steps=4, save_every=1, keep=2))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step_000003", "step_000004"]
    meta = ckpt.read_meta(tmp_path / "run" / "checkpoints" / "step_000004")
    assert meta["step"] == 4 and meta["sample"] == 4 * 2 and meta["model"]["pattern"] == "gdn"


# ---------------------------------------------------------------- bad configurations

@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a bad configuration gets as far as loading data or a model."""
    def boom(*a, **k):
        raise AssertionError("work started before the configuration was refused")
    monkeypatch.setattr(loop, "load_documents", boom)
    monkeypatch.setattr(loop, "setup", boom)


@pytest.mark.parametrize("argv, env, message", [
    (["--sp", "2"], {"WORLD_SIZE": "3"}, "--sp: expected a divisor of the world size 3"),
    (["--sp", "2", "--seq-len", "33", "--batch-size", "1"], {"WORLD_SIZE": "2"},
     "expected a multiple of 2"),
    (["--sp", "2", "--seq-len", "33", "--no-packing"], {"WORLD_SIZE": "2"}, "--seq-len"),
    (["--sp", "2", "--seq-len", "34", "--batch-size", "1", "--sp-layout", "zigzag"],
     {"WORLD_SIZE": "2"}, "expected a multiple of 4"),
    (["--mixers", "gdn,transformer"], {}, "'transformer'"),
    (["--sp", "2", "--sp-strategy", "alltoall", "--set", "n_heads=3"], {"WORLD_SIZE": "2"},
     "head counts divisible by --sp = 2"),
    (["--data", "/no/such/path"], {}, "--data: expected an existing"),
    (["--steps", "10", "--stop-at", "11"], {}, "--stop-at"),
    (["--set", "d_model=wide"], {}, "--set"),
    (["--resume"], {}, "--resume: expected a checkpoint"),
])
def test_bad_config_fails_before_work(argv, env, message, tmp_path, monkeypatch, capsys, no_work):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(argv + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqpar train: error: ") and message in err, err


def test_incompatible_resume_fails_before_work(tmp_path, monkeypatch, capsys):
    data = write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "run"
    run(small_cfg(data, out, "gdn", steps=1, save_every=1))
    argv = ["--data", str(data), "--out", str(out), "--preset", "tiny", "--mixers", "gdn",
            "--set", "d_model=48", "--set", "n_heads=2", "--set", "head_dim=16", "--set", "n_layers=1"]
    monkeypatch.setattr(loop, "load_documents", lambda *a: pytest.fail("work started"))
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "same model" in err and "d_model: 32 in the checkpoint, 48 now" in err, err
    assert main(argv) == 2, "an existing run is not overwritten without --overwrite"
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------- data

def test_pack_windows_boundaries_and_targets():
    eos = 9
    w = np.array([[1, 2, eos, 3, 4, 5, eos, 6, 7],
                  [eos, 1, 2, 3, eos, eos, 4, 5, 6]], dtype=np.int32)
    x, y, cu = pack_windows(w, eos, packing=True)
    assert x.shape == y.shape == (1, 16)
    assert x[0].tolist() == w[0, :-1].tolist() + w[1, :-1].tolist()
    # Documents start after every end-of-text token and at every window start.
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 7, 8, 9, 13, 14, 16]
    expect_y = np.concatenate([w[0, 1:], w[1, 1:]]).astype(np.int64)
    expect_y[np.concatenate([w[0, :-1], w[1, :-1]]) == eos] = IGNORE_INDEX
    assert y[0].tolist() == expect_y.tolist()
    xr, yr, cur = pack_windows(w, eos, packing=False)
    assert xr.shape == (2, 8) and cur is None and (yr == IGNORE_INDEX).sum() == 5


def test_loader_partitions_global_batch_and_seeks():
    stream = np.arange(1000, dtype=np.int32) % 200
    sampler = WindowSampler(stream, 10, seed=3, shuffle=True)
    one = Loader(sampler, batch_size=4, eos_id=999, packing=False, dp_rank=0, dp=1)
    two = [Loader(sampler, batch_size=2, eos_id=999, packing=False, dp_rank=d, dp=2) for d in (0, 1)]
    for step in (0, 5, 30):  # 30 steps * 4 samples crosses an epoch of 99 windows
        whole = one.batch(step).input_ids
        parts = torch.cat([ld.batch(step).input_ids for ld in two])
        assert torch.equal(whole, parts)
    other = Loader(sampler, batch_size=1, eos_id=999, packing=False, dp_rank=0, dp=1)
    other.seek(7, one.position(7))
    assert torch.equal(other.batch(7).input_ids, one.batch(7).input_ids[:1])


def test_documents_split_and_tokens(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha")
    (tmp_path / "d" / "b.md").write_text("")
    (tmp_path / "d" / ".hidden.txt").write_text("no")
    (tmp_path / "d" / "c.bin").write_bytes(b"\xff\xfe")
    write_corpus(tmp_path / "d" / "e.jsonl", n=3)
    docs = load_documents(str(tmp_path / "d"))
    assert docs[0] == "alpha" and len(docs) == 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="'text'"):
        load_documents(str(bad))
    train, held = split_documents([str(i) for i in range(100)], 8)
    assert len(held) == 8 and not set(train) & set(held) and len(train) == 92
    tok = ByteTokenizer()
    s = token_stream(["hé", "x"], tok)
    assert s.tolist() == [104, 195, 169, 256, 120, 256] and tok.decode(s) == "héx"


def test_tokenizer_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="optional extra: pip install seqpar[tokenizers]")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    def make(specials):
        tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(["def f(x): return x"] * 20, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["[UNK]", *specials]))
        path = tmp_path / f"tok{len(specials)}.json"
        tok.save(str(path))
        return path

    data = write_corpus(tmp_path / "corpus.jsonl")
    path = make(["<|endoftext|>"])
    plan = prepare(TrainConfig(data=str(data), tokenizer=str(path), out=str(tmp_path / "run")))
    tok = plan.tokenizer
    moved = tmp_path / "elsewhere.json"
    moved.write_bytes(path.read_bytes())
    assert HFTokenizer(str(moved)).describe() == tok.describe(), "identity is the file's content"
    assert tok.eos_id == 1 and plan.model_cfg.vocab_size % 64 == 0
    assert plan.model_cfg.vocab_size >= tok.vocab_size
    s = token_stream(["def f(x)", "return x"], tok)
    assert (s == tok.eos_id).sum() == 2 and tok.decode(s[:int(np.argmax(s == tok.eos_id))]) == "def f(x)"
    with pytest.raises(ValueError, match="end-of-text token"):
        prepare(TrainConfig(tokenizer=str(make([])), out=str(tmp_path / "run2")))


def test_default_corpus_is_the_standard_library():
    files = stdlib_files()
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert files == sorted(files, key=lambda p: p.as_posix())


def test_lr_schedule():
    f = [lr_factor(s, warmup=10, steps=110, min_ratio=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0
    assert f[60] == pytest.approx(0.55) and f[110] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[9:], f[10:]))


# ---------------------------------------------------------------- the seqpar command

def test_cli(capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    assert cli.main(["bench", "sp"]) == 2
    assert "needs matplotlib (pip install 'seqpar[bench]')" in capsys.readouterr().err
    assert cli.main(["train"]) == 2
    assert "pip install 'seqpar[train]'" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.main(["bench", "nothing"]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert "expected a command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0 and "--sp" in capsys.readouterr().out
    assert cli.main(["bench", "--help"]) == 0 and "seqpar bench ops" in capsys.readouterr().out
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"seqpar {seqpar.__version__}"
    assert cli.main(["--help"]) == 0 and "seqpar generate" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "generate", "export"])
def test_help_has_text_for_every_option_and_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: True)" not in text
    assert "(default: False)" not in text and "(default: [])" not in text
    parser = {"train": build_parser, "generate": generate_parser}.get(command)
    if parser is not None:
        for action in parser()._actions:
            assert action.help, f"{action.option_strings} has no help text"
    assert not re.search(r"\(default: [^)]*\)\s*\(default:", text), "a default shown twice"


def test_argparse_errors_and_help_print_on_rank_0_only(monkeypatch, capsys, tmp_path):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    assert e.value.code == 2 and capsys.readouterr().err == "" and not error_file.exists()
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        main(["--bogus"])
    err = capsys.readouterr().err
    assert err.count("unrecognized arguments: --bogus") == 1
    assert err.rstrip().splitlines()[-1] == "seqpar train: error: unrecognized arguments: --bogus"
    # torchrun's failure summary shows the launcher this line as the root cause.
    assert json.loads(error_file.read_text())["message"] == err.rstrip().splitlines()[-1]
    assert main(["--steps", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--steps: expected an int >= 1" in json.loads(error_file.read_text())["message"]


def test_cpu_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert cpu_threads(None, 128) == 1 and torch.get_num_threads() == 1
    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(None, 1 << 20) == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert cpu_threads(None, 1 << 20) == 1
    assert cpu_threads(2, 128) == 2 and torch.get_num_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cpu_threads(None, 1 << 20) is None, "an explicit OMP_NUM_THREADS is left alone"


def test_binary_and_small_data_are_refused_with_reasons(tmp_path, capsys):
    nul = tmp_path / "zeros.txt"
    nul.write_bytes(bytes(5000))
    noise = tmp_path / "noise.bin"
    noise.write_bytes(bytes(random.Random(0).randrange(256) for _ in range(5000)))
    for path in (nul, noise):
        assert main(["--data", str(path), "--out", str(tmp_path / "r")]) == 2
        assert "expected a UTF-8 text file" in capsys.readouterr().err
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"\x00" * 100)
    (folder / "b.txt").write_text("print('hello')\n" * 50)
    assert load_documents(str(folder)) == ["print('hello')\n" * 50], "binary files are skipped"
    short = tmp_path / "short.txt"
    short.write_text("a short file\n")
    assert main(["--data", str(short), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "training split (the first nine tenths of the only document) has 12" in err, err
    few = write_corpus(tmp_path / "few.jsonl", n=10)
    assert main(["--data", str(few), "--out", str(tmp_path / "r3"), "--seq-len", "100"]) == 2
    assert "evaluation split (2 of 10 documents held out: --eval-docs" in capsys.readouterr().err
