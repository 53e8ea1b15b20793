"""``seqpar bench profile``: where the time goes, as ``torch.profiler`` tables.

``train``: training steps as ``seqpar train`` runs them (its Trainer, data, compiled
blocks and bf16 autocast on CUDA). Any ``seqpar train`` option after the profiler's own
selects the run::

    seqpar bench profile train --out prof.json --preset 125m --seq-len 4096
    seqpar bench profile train --out prof.json --preset tiny --steps 2 --warm 1    # CPU

It prints the wall time per step and the device time per step (their difference is
time the GPU waits for the host), then the operators and kernels with the most device
time and the most host time per step.

``ops``: one op's forward+backward, kernel by kernel, at the shapes of ``seqpar bench
ops`` (B T = ``--tokens`` tokens, ``--heads`` heads of ``--head-dim``, bf16 on CUDA)::

    seqpar bench profile ops --ops gated_delta_rule linear_attn --T 8192 --out ops.json
    seqpar bench profile ops --ops softmax_attn --T 8192 32768 --out attn.json

``softmax_attn`` is the op through :func:`seqpar.ops.softmax_attn`; ``sdpa`` is PyTorch's
SDPA on the same causal input; ``--peer fla`` adds flash-linear-attention's kernels
where importable.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .sp import environment, write_json


def _activities(device: torch.device):
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rows(prof, reps: int, shapes: bool = False) -> list[dict]:
    """Per-step averages of every event: host time (inclusive), self device time, calls;
    with ``shapes``, one row per operator and input shapes."""
    out = []
    for e in prof.key_averages(group_by_input_shape=shapes):
        name = e.key + (f" {e.input_shapes}" if shapes and e.input_shapes else "")
        out.append({"name": name, "cpu_ms": e.cpu_time_total / reps / 1e3,
                    "self_device_ms": getattr(e, "self_device_time_total", 0) / reps / 1e3,
                    "device_ms": getattr(e, "device_time_total", 0) / reps / 1e3,
                    "calls": e.count // reps})
    return out


def _print_top(rows: list[dict], key: str, title: str, n: int) -> None:
    print(f"-- {title}")
    for r in sorted(rows, key=lambda r: -r[key])[:n]:
        print(f"{r[key]:9.3f} ms {r['calls']:6d}x  {r['name'][:160]}")


def profile_train(args, train_argv: list[str]) -> dict:
    """Profile ``args.steps`` training steps after ``args.warm`` unprofiled ones."""
    from ..train import Trainer, build_loaders, parse_args, prepare
    from ..train.distributed import setup, teardown

    plan = prepare(parse_args(train_argv))
    env = setup(1)
    try:
        loader, _ = build_loaders(plan.cfg, plan.tokenizer, env)
        trainer = Trainer(plan.cfg, plan.model_cfg, env)
        for i in range(args.warm):
            trainer.step(trainer.to_device(loader.batch(i)))
        _sync(env.device)
        with profile(activities=_activities(env.device), record_shapes=args.shapes) as prof:
            t0 = time.perf_counter()
            for i in range(args.warm, args.warm + args.steps):
                trainer.step(trainer.to_device(loader.batch(i)))
            _sync(env.device)
            wall = (time.perf_counter() - t0) / args.steps * 1e3
        rows = _rows(prof, args.steps)
        device_ms = sum(r["self_device_ms"] for r in rows)
        tokens = plan.cfg.batch_size * plan.cfg.seq_len
        print(f"step: wall {wall:.1f} ms, device {device_ms:.1f} ms ({tokens} tokens, compile "
              f"{trainer.compiled})")
        _print_top(rows, "self_device_ms", "self device time per step", args.rows)
        _print_top(rows, "cpu_ms", "host time per step (inclusive)", args.rows)
        by_shape = _rows(prof, args.steps, shapes=True) if args.shapes else []
        if by_shape:
            _print_top(by_shape, "self_device_ms", "self device time per step, by input shapes",
                       args.rows)
        return {"what": "train", "train_argv": train_argv, "compile": trainer.compiled,
                "tokens_per_step": tokens, "wall_ms_per_step": wall, "device_ms_per_step": device_ms,
                "top_device": sorted(rows, key=lambda r: -r["self_device_ms"])[:args.rows],
                "top_cpu": sorted(rows, key=lambda r: -r["cpu_ms"])[:args.rows],
                "top_device_by_shape": sorted(by_shape, key=lambda r: -r["self_device_ms"])[:args.rows]}
    finally:
        teardown(env)


def _op_callable(op: str, impl: str):
    """(inputs maker, fn) for one op and implementation."""
    from .. import ops
    from .ops import fla_fn, make_inputs, sdpa_fn

    if op in ("softmax_attn", "sdpa"):
        def make(B, T, H, D, device, dtype):
            gen = torch.Generator(device=device).manual_seed(0)
            return [torch.randn(B, T, H, D, generator=gen, device=device, dtype=dtype).requires_grad_()
                    for _ in range(3)]
        if op == "sdpa":
            return make, sdpa_fn
        return make, lambda q, k, v: ops.softmax_attn(q, k, v, causal=True)[0]

    def make_lin(B, T, H, D, device, dtype):
        return make_inputs(op, B, T, H, D, device, dtype=dtype)

    if impl == "fla":
        return make_lin, fla_fn(op)
    f = getattr(ops, op)
    return make_lin, lambda *xs: f(*xs)[0]


def profile_ops(args) -> dict:
    """Kernel table of each op's forward+backward."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = []
    for T in args.T:
        B = max(1, args.tokens // T)
        for op in args.ops:
            impls = ["seqpar"] + (["fla"] if args.peer == "fla" and op not in ("softmax_attn", "sdpa")
                                  else [])
            for impl in impls:
                try:
                    make, fn = _op_callable(op, impl)
                    xs = make(B, T, args.heads, args.head_dim, device, dtype)

                    def step():
                        fn(*xs).float().sum().backward()  # noqa: B023 -- run in this iteration
                        for x in xs:  # noqa: B023
                            x.grad = None

                    for _ in range(args.warm):
                        step()
                    _sync(device)
                    with profile(activities=_activities(device)) as prof:
                        for _ in range(args.steps):
                            step()
                        _sync(device)
                except Exception as e:  # noqa: BLE001 - one failing peer must not hide the rest
                    print(f"{impl} {op} T={T}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows = _rows(prof, args.steps)
                key = "self_device_ms" if device.type == "cuda" else "cpu_ms"
                rows = sorted((r for r in rows if r[key] > 0), key=lambda r: -r[key])
                total = sum(r["self_device_ms"] for r in rows) if device.type == "cuda" else None
                print(f"\n== {impl} {op} B={B} T={T}: "
                      + (f"{total:.3f} ms of kernels per fwd+bwd" if total is not None else "host times"),
                      flush=True)
                for r in rows[:args.rows]:
                    print(f"  {r[key]:8.3f} ms  x{r['calls']:<3d} {r['name'][:110]}", flush=True)
                result.append({"impl": impl, "op": op, "B": B, "T": T, "kernel_ms": total,
                               "rows": rows[:args.rows]})
    return {"what": "ops", "device": device.type, "dtype": str(dtype).replace("torch.", ""),
            "heads": args.heads, "head_dim": args.head_dim, "tokens": args.tokens, "rows": result}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar bench profile", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="training steps (other options go to seqpar train; "
                       "--warm and --steps are the profiler's)")
    t.add_argument("--out", required=True, help="JSON file")
    t.add_argument("--warm", type=int, default=10,
                   help="unprofiled steps first (kernel variants compile on first use)")
    t.add_argument("--steps", type=int, default=3, help="profiled steps")
    t.add_argument("--rows", type=int, default=30, help="rows per table")
    t.add_argument("--shapes", action="store_true",
                   help="also a table by operator and input shapes (record_shapes)")
    o = sub.add_parser("ops", help="one op's forward+backward, kernel by kernel")
    o.add_argument("--out", required=True, help="JSON file")
    o.add_argument("--ops", nargs="+", required=True,
                   help="linear-family op names, softmax_attn, or sdpa")
    o.add_argument("--T", type=int, nargs="+", default=[8192])
    o.add_argument("--tokens", type=int, default=32768, help="B T per call")
    o.add_argument("--heads", type=int, default=16)
    o.add_argument("--head-dim", type=int, default=128)
    o.add_argument("--peer", choices=["fla"], default=None)
    o.add_argument("--device", default=None)
    o.add_argument("--warm", type=int, default=3)
    o.add_argument("--steps", type=int, default=5)
    o.add_argument("--rows", type=int, default=14)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = build_parser().parse_known_args(argv)
    if args.what == "ops":
        if rest:
            print(f"seqpar bench profile ops: error: unrecognized arguments {rest}", file=sys.stderr)
            return 2
        data = profile_ops(args)
    else:
        with tempfile.TemporaryDirectory() as run_dir:  # nothing is written there
            data = profile_train(args, [a for a in rest if a != "--"] + ["--out", run_dir])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_json(Path(args.out), {"benchmark": "seqpar bench profile", "command":
                                " ".join(["seqpar bench profile"] + argv), **environment(device, 1),
                                **data})
    return 0


if __name__ == "__main__":
    sys.exit(main())
