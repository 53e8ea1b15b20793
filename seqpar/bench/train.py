"""``seqpar bench train``: training throughput as ``seqpar train`` runs it.

Each run builds the trainer (:class:`seqpar.train.Trainer`: the model, compiled blocks on
CUDA, activation checkpointing as the preset says, bf16 autocast on GPU, fused AdamW)
and feeds it the trainer's own batches (the standard library's source, byte tokens,
packed documents unless ``--no-packing``). After ``--warmup`` steps (compilation and
first kernel launches happen there) it times ``--steps`` optimizer steps back to back,
with one device synchronization at the end, and reports per run:

* tokens/s and the step time;
* MFU (:data:`MFU_FORMULA`, written into the JSON as well);
* peak memory (CUDA allocator: allocated and reserved; CPU: the process's peak RSS);
* host synchronizations per step: on CUDA every synchronizing call the timed steps make
  (``torch.cuda.set_sync_debug_mode``), with the Python lines that made them;
* the loss of every step (warm-up included), for comparing runs of the same seed.

``--reference`` (default ``attn``) adds, for every preset, a plain transformer of the
same size: the same configuration with every mixer replaced by softmax attention.
``--scaling B1,B2`` runs every configuration at two batch sizes and reports the ratio of
their step times (linear cost in the batch gives ``B2 / B1``). ``--shape mqar`` is the
MQAR recall task's model: 2 layers, d_model 128, 2 heads of 64.

Examples::

    seqpar bench train --preset 125m --seq-len 4096 --batch-size 8 --out train.json
    seqpar bench train --shape mqar --mixers gdn --seq-len 64 --scaling 64,256 \\
        --threads 1 --reference none --out scaling_cpu.json
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from .sp import environment, write_json

MFU_FORMULA = (
    "MFU = flops_per_token x tokens/s / peak. flops_per_token = 6 N + the sum over layers of "
    "the mixer's sequence FLOPs per token at the context length T (forward + backward): causal "
    "softmax attention 6 H Dh T; the linear family's recurrent state work 3 x (4 or 6) x H x "
    "K x V; Hyena 45 C log2(2T). N = the weights used once per token in a multiply-add "
    "(projections, MLPs, short-conv taps, the LM head; not an untied embedding table). "
    "Attention is counted over the whole context even when packed documents are shorter, "
    "and recomputation under activation checkpointing is not counted. peak = the device's "
    "dense BF16 tensor-core peak (989 TFLOP/s for H100/H200 SXM).")

MQAR = {"d_model": 128, "n_layers": 2, "n_heads": 2, "head_dim": 64}


@functools.lru_cache(maxsize=2)
def _train_stream(data: str | None, tokenizer_path: str | None, eval_docs: int):
    """Token stream of the training documents (loaded once per process)."""
    from ..train.data import load_documents, load_tokenizer, split_documents, token_stream

    tokenizer = load_tokenizer(tokenizer_path)
    train_docs, _ = split_documents(load_documents(data), eval_docs)
    return token_stream(train_docs, tokenizer)


def _parse_set(items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as the trainer parses them."""
    from ..train.config import parse_args

    return parse_args([a for item in items for a in ("--set", item)]).model


@contextlib.contextmanager
def _count_syncs(device: torch.device):
    """Collect the synchronizing CUDA calls made inside (a list of warning records; empty
    off CUDA, where nothing synchronizes with a device)."""
    caught: list = []
    if device.type != "cuda":
        yield caught
        return
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")
            caught.extend(w for w in got if "synchroniz" in str(w.message))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device) -> dict:
    if device.type == "cuda":
        return {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9}
    from ..train.metrics import memory_gb

    return {"peak_rss_gb": memory_gb(device)}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)


def run_one(args, preset: str, pattern: str | None, batch_size: int | None) -> dict:
    """One configuration: build, warm up, time; returns its row."""
    from ..train import Trainer
    from ..train.config import TrainConfig
    from ..train.data import Loader, WindowSampler
    from ..train.distributed import DistEnv, default_device
    from ..train.loop import prepare
    from ..train.metrics import peak_flops

    model = dict(MQAR, pattern="gdn") if args.shape == "mqar" else {}
    model.update(_parse_set(args.set))
    if pattern is not None:
        model["pattern"] = pattern
    with tempfile.TemporaryDirectory() as out:
        # The preset's schedule, so that the losses equal seqpar train's at the same shape.
        cfg = TrainConfig(preset=preset, model=model, seq_len=args.seq_len, batch_size=batch_size,
                          packing=args.packing, compile=args.compile, dtype=args.dtype,
                          activation_checkpointing=args.ac, seed=args.seed, out=out,
                          progress=False)
        plan = prepare(cfg)
    cfg, model_cfg = plan.cfg, plan.model_cfg
    device = torch.device(args.device) if args.device else default_device()
    env = DistEnv(device=device)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    row = {"preset": preset, "mixers": ",".join(model_cfg.pattern), "seq_len": cfg.seq_len,
           "batch_size": cfg.batch_size, "tokens_per_step": tokens_per_step,
           "packing": cfg.packing, "activation_checkpointing": cfg.activation_checkpointing,
           "model": model_cfg.to_dict(), "warmup": args.warmup, "steps": args.steps}
    trainer = None
    torch._dynamo.reset()  # each configuration compiles afresh (no shared recompile budget)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        trainer = Trainer(cfg, model_cfg, env)
        m = trainer.model
        row.update({"compile": trainer.compiled, "params": trainer.num_params,
                    "matmul_params": m.matmul_params(), "flops_per_token": trainer.flops_per_token,
                    "mixer_flops_per_token": trainer.flops_per_token - 6.0 * m.matmul_params()})
        sampler = WindowSampler(_train_stream(cfg.data, cfg.tokenizer, cfg.eval_docs), cfg.seq_len,
                                cfg.seed, True)
        loader = Loader(sampler, batch_size=cfg.batch_size, eos_id=plan.tokenizer.eos_id,
                        packing=cfg.packing, dp_rank=0, dp=1)
        losses = []
        t_warm = time.perf_counter()
        for i in range(args.warmup):
            losses.append(trainer.step(trainer.to_device(loader.batch(i)))[0])
        _sync(device)
        row["warmup_s"] = time.perf_counter() - t_warm
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with _count_syncs(device) as syncs:
            t0 = time.perf_counter()
            for i in range(args.warmup, args.warmup + args.steps):
                losses.append(trainer.step(trainer.to_device(loader.batch(i)))[0])
        _sync(device)  # after counting: the one wait that ends the timing
        elapsed = time.perf_counter() - t0
        step_s = elapsed / args.steps
        tok_s = tokens_per_step / step_s
        peak = peak_flops(device)
        sites = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
        row.update({"step_s": step_s, "tokens_per_s": tok_s, "peak_flops": peak,
                    "mfu": None if peak is None else trainer.flops_per_token * tok_s / peak,
                    "syncs_per_step": len(syncs) / args.steps if device.type == "cuda" else None,
                    "sync_sites": dict(sites.most_common(8)),
                    "losses": [float(x) for x in losses], **_memory(device)})
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _fmt(row: dict) -> str:
    head = (f"{row['preset']:>5} {row['mixers'][:28]:<28} T={row['seq_len']:<6} "
            f"B={row['batch_size']:<4}")
    if "error" in row:
        return f"{head} {row['error'][:80]}"
    mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    mem = row.get("peak_allocated_gb", row.get("peak_rss_gb"))
    syncs = "n/a" if row["syncs_per_step"] is None else f"{row['syncs_per_step']:.1f}"
    return (f"{head} {row['tokens_per_s'] / 1e3:9.1f}k tok/s  step {1e3 * row['step_s']:8.1f} ms  "
            f"MFU {mfu:>6}  mem {mem:6.2f} GB  syncs/step {syncs}  compile {row['compile']}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar bench train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="125m", help="comma-separated presets")
    p.add_argument("--mixers", default=None, help="mixer pattern (default: the preset's)")
    p.add_argument("--reference", default="attn",
                   help="pattern of the reference model of the same size ('none': no reference)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ModelConfig field")
    p.add_argument("--shape", choices=("mqar",), default=None,
                   help="mqar: 2 layers, d_model 128, 2 heads of 64 (the MQAR recall model)")
    p.add_argument("--seq-len", type=int, default=None, help="context length (preset default)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per step, packed into one stream (preset default)")
    p.add_argument("--no-packing", dest="packing", action="store_false",
                   help="plain (batch, seq_len) windows")
    p.add_argument("--scaling", default=None, metavar="B1,B2",
                   help="run each configuration at these two batch sizes; report the step-time ratio")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the blocks (default: the trainer's, on for CUDA)")
    p.add_argument("--ac", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing (default: the preset's)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed steps first: packed batches differ in their number of "
                        "documents, and kernel launch variants chosen by it compile on first use")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    for name in ("warmup", "steps"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            print(f"seqpar bench train: error: --{name}: expected a positive count", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [args.batch_size]
    if args.scaling:
        try:
            batches = [int(b) for b in args.scaling.split(",")]
            assert len(batches) == 2 and min(batches) > 0
        except (ValueError, AssertionError):
            print(f"seqpar bench train: error: --scaling: expected two batch sizes B1,B2, got "
                  f"{args.scaling!r}", file=sys.stderr)
            return 2
    patterns = [args.mixers] + ([] if args.reference == "none" else [args.reference])
    device = torch.device(args.device) if args.device else (
        torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    result = {"benchmark": "seqpar bench train", "command": " ".join(["seqpar bench train"] + argv),
              **environment(device, 1), "threads": torch.get_num_threads(),
              "mfu_formula": MFU_FORMULA, "runs": [], "scaling": []}
    print(f"seqpar bench train on {device} ({', '.join(result['gpus']) or result['cpu']}); "
          f"{MFU_FORMULA}", flush=True)
    for preset in args.preset.split(","):
        for pattern in patterns:
            rows = []
            for b in batches:
                row = run_one(args, preset, pattern, b)
                rows.append(row)
                result["runs"].append(row)
                print(_fmt(row), flush=True)
                if args.out:
                    write_json(Path(args.out), result)
            if len(rows) == 2 and all("step_s" in r for r in rows):
                ratio = rows[1]["step_s"] / rows[0]["step_s"]
                result["scaling"].append({
                    "preset": preset, "mixers": rows[0]["mixers"], "batch_sizes": batches,
                    "step_s": [r["step_s"] for r in rows], "ratio": ratio,
                    "linear_ratio": batches[1] / batches[0]})
                print(f"scaling {rows[0]['mixers']}: step(B={batches[1]}) / step(B={batches[0]}) = "
                      f"{ratio:.2f} (linear: {batches[1] / batches[0]:.2f})", flush=True)
    if args.out:
        write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
