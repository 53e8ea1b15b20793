"""``seqpar bench longest``: training at long context, the longest sequence that trains
and tokens/s with MFU.

Both use the trainer's own pieces (:class:`seqpar.train.Trainer`: the model with its
blocks compiled on CUDA (``--compile``/``--no-compile``), FSDP2 over the ranks,
activation checkpointing (``--ac``, default on), bf16 autocast, fused AdamW, the chunked
loss that never forms whole float32 logits; its FLOP count and the peak FLOP/s table for
MFU) on batches of random tokens, batch 1, unpacked, with sequence parallelism over all
ranks (``--sp`` = world size).

``search``: the longest context that trains (forward + backward + optimizer step, the
optimizer state already allocated) on ``--nproc`` devices::

    seqpar bench longest search --preset 1b --nproc 1 --budget 300 --out longest.json
    seqpar bench longest search --preset tiny --first 256 --last 2048 --granularity 256 \
        --warm 128 --oom-above 1024 --budget 60 --out /tmp/longest.json   # CPU, seconds

It doubles T from ``--first`` until a step runs out of memory, then bisects coarsely
(to within ``max(--granularity, T/8)``). After two successful sizes it fits peak memory
against T (linear: activations and KV grow with T, weights and optimizer state do not)
and jumps straight to just under the predicted limit instead of doubling past it; and
it fits step time (``a T + b T^2``: attention is quadratic) to skip a size that cannot
finish within the time budget, saying so (``time_bounded``). Each attempt series runs in
a torchrun child: a rank that runs out of memory records it and exits (its peers may be
waiting inside a collective, so it cannot carry on), torchrun ends the others, and the
search starts a fresh child for the next size. On one device the child catches the error,
frees memory and carries on.

``throughput``: tokens/s and MFU of training steps at ``--seq-len`` (default 32K) under
torchrun::

    torchrun --nproc-per-node 2 -m seqpar.bench.longest throughput --out train.json

MFU is the trainer's: ``Trainer.flops_per_token`` x tokens/s / (peak x world size),
activation recomputation not counted as useful work.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .sp import environment, write_json

KIB = 1024


# ---- the trainer on random tokens ----

def _build(args, seq_len: int):
    """A Trainer for ``args`` at ``seq_len`` (used for the FLOP count), and its env."""
    from ..train.config import TrainConfig, resolve
    from ..train.distributed import setup
    from ..train.loop import Trainer

    cfg = TrainConfig(preset=args.preset, seq_len=seq_len, batch_size=1, packing=False,
                      sp=int(os.environ.get("WORLD_SIZE", "1")), sp_strategy=args.sp_strategy,
                      sp_layout=args.sp_layout, activation_checkpointing=args.ac,
                      compile=args.compile, steps=10**9, warmup=1, progress=False)
    cfg, model_cfg = resolve(cfg)
    env = setup(cfg.sp)
    return Trainer(cfg, model_cfg, env), env


def _batch(trainer, T: int, step: int):
    """Random tokens (1, T) on the trainer's device, as the trainer moves batches."""
    from ..train.data import Batch

    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(0, trainer.model.config.vocab_size, (1, T + 1), generator=gen)
    return trainer.to_device(Batch(ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), None))


def _sync(env):
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def _peak_gb(env) -> dict:
    if env.device.type != "cuda":
        from ..train.metrics import memory_gb

        return {"peak_rss_gb": memory_gb(env.device)}
    return {"peak_allocated_gb": torch.cuda.max_memory_allocated(env.device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(env.device) / 1e9}


def _capacity_gb(env) -> float | None:
    if env.device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(env.device).total_memory / 1e9


def _is_oom(e: BaseException) -> bool:
    """Out of device memory, whichever layer noticed: PyTorch's allocator, cuBLAS or NCCL."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "OUT_OF_MEMORY"))


def _timed_step(trainer, env, T: int, step: int, oom_above: int | None) -> float:
    """One optimizer step at T tokens; returns seconds."""
    batch = _batch(trainer, T, step)
    _sync(env)
    t0 = time.perf_counter()
    if oom_above is not None and T > oom_above:
        raise torch.OutOfMemoryError(f"simulated: T = {T} > --oom-above {oom_above}")
    loss, _ = trainer.step(batch)
    loss.item()
    _sync(env)
    return time.perf_counter() - t0


# ---- the search ----

def _round_down(x: float, gran: int) -> int:
    return int(x // gran) * gran


def _fit_line(points):
    """Least-squares ``y = a + b x`` through (x, y) points; None with fewer than two x."""
    if len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - b * mx, b


def predict_seconds(oks: list[dict], T: int) -> float | None:
    """Step time at T from successful attempts: ``t = a T + b T^2`` fitted as t/T
    linear in T (None with fewer than two sizes)."""
    fit = _fit_line([(r["T"], r["seconds"] / r["T"]) for r in oks])
    if fit is None:
        return None
    a, b = fit
    return max(a + b * T, max(r["seconds"] / r["T"] for r in oks)) * T


def predict_limit(oks: list[dict], capacity_gb: float | None) -> int | None:
    """T at which peak reserved memory fills the device, by a line through the two
    largest successful sizes (None without a capacity or two sizes)."""
    key = "peak_reserved_gb"
    pts = sorted((r["T"], r[key]) for r in oks if key in r)[-2:]
    fit = _fit_line(pts) if capacity_gb else None
    if fit is None or fit[1] <= 0:
        return None
    a, b = fit
    return int((capacity_gb - a) / b)


def search_state(records: list[dict]) -> tuple[dict, set, set]:
    """Sizes that trained on every rank (with the record of the rank using the most
    memory), sizes that failed on some rank, and sizes skipped for lack of time."""
    by_t: dict[int, list[dict]] = {}
    for r in records:
        by_t.setdefault(r["T"], []).append(r)
    ok, bad, skipped = {}, set(), set()
    for T, rs in by_t.items():
        attempts = [r for r in rs if r["status"] != "skipped_time"]
        if len(attempts) < len(rs):
            skipped.add(T)
        if any(r["status"] in ("oom", "error") for r in attempts):
            bad.add(T)
        elif attempts:
            ok[T] = max(attempts, key=lambda r: r.get("peak_reserved_gb", r.get("peak_rss_gb", 0)))
    return ok, bad, skipped


def next_size(records: list[dict], start: int, maximum: int, gran: int,
              capacity_gb: float | None) -> int | None:
    """The next T to try, or None when the search is done."""
    ok, bad, skipped = search_state(records)
    if any(r.get("tried_instead") is None for r in records if r["status"] == "skipped_time"):
        return None
    if not ok:
        return None if bad else start
    lo = max(ok)
    hi = min((t for t in bad if t > lo), default=None)
    pred = predict_limit([ok[t] for t in sorted(ok)], capacity_gb)
    step = max(gran, lo // 8)  # the bracket width at which the search stops
    guess = None if pred is None else _round_down(0.97 * pred, gran)
    if hi is None:
        if lo >= maximum:
            return None
        # Jump to just under the memory model's limit, or, once there, one step past it.
        nxt = guess if guess is not None and guess > lo else lo + step if pred is not None else 2 * lo
        return min(nxt, 2 * lo, maximum)
    if hi - lo <= step:
        return None
    # The memory model's guess while it lies inside the bracket, else the midpoint.
    inside = guess is not None and lo + gran <= guess <= hi - gran
    mid = guess if inside else _round_down((lo + hi) / 2, gran)
    return mid if lo < mid < hi else None


def fit_in_time(oks: list[dict], T: int, left: float, gran: int) -> tuple[int | None, float | None]:
    """The largest size <= T (a multiple of ``gran``, above every size that trained)
    whose predicted step fits in ``left`` seconds, with its prediction; ``(None, guess)``
    when none does. Without a time model, ``(T, None)``."""
    lo = max((r["T"] for r in oks), default=0)
    guess = predict_seconds(oks, T)
    if guess is None:
        return T, None
    while guess * 1.3 + 5 > left:
        T = _round_down(T * 0.8, gran)
        if T <= lo:
            return None, guess
        guess = predict_seconds(oks, T)
    return T, guess


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def worker(args) -> int:
    """Child under torchrun: warm up the optimizer state at a small size, then try sizes
    until the search is done, the deadline comes or (with several ranks) memory runs out."""
    trainer, env = _build(args, args.first)
    records_path = Path(args.records)
    world = env.world
    capacity = _capacity_gb(env)
    warm = args.warm
    _timed_step(trainer, env, warm, 0, None)
    step = 1
    while True:
        # Rank 0 decides (the ranks' clocks and reads of the records file may differ).
        decision = torch.zeros(1, dtype=torch.int64, device=env.device)
        if env.rank == 0:
            records = _read(records_path)
            want = next_size(records, args.first, args.last, args.granularity, capacity)
            T, guess, left = None, None, args.deadline - time.time()
            if want is not None:
                T, guess = fit_in_time(list(search_state(records)[0].values()), want, left,
                                       args.granularity)
                if T != want:
                    # Recorded so the result says the search was cut by time, not memory.
                    _append(records_path, {"T": want, "world": world, "rank": 0,
                                           "status": "skipped_time", "predicted_s": guess,
                                           "left_s": left, "tried_instead": T})
            decision[0] = T or 0
        if world > 1:
            torch.distributed.broadcast(decision, 0)
        T = int(decision[0])
        if T == 0:
            return 0
        base = {"T": T, "world": world, "rank": env.rank}
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        failed = None
        try:
            seconds = _timed_step(trainer, env, T, step, args.oom_above)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not _is_oom(e):
                raise
            failed = f"{type(e).__name__}: {str(e)[:300]}"
        step += 1
        if failed is not None:
            _append(records_path, dict(base, status="oom", message=failed))
            if world > 1:
                # Peers may be blocked in a collective of this step: leave, and let
                # torchrun end them; the search starts a fresh child.
                sys.stdout.flush()
                os._exit(3)
            trainer.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if env.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        _append(records_path, dict(base, status="ok", seconds=seconds, **_peak_gb(env)))
        if world > 1:
            torch.distributed.barrier()


def _child_command(args, rest: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", str(args.nproc), "-m", "seqpar.bench.longest", "worker", *rest]


def _common_argv(args) -> list[str]:
    out = ["--preset", args.preset, "--sp-layout", args.sp_layout,
           "--ac" if args.ac else "--no-ac"]
    if args.compile is not None:
        out.append("--compile" if args.compile else "--no-compile")
    if args.sp_strategy:
        out += ["--sp-strategy", args.sp_strategy]
    return out


def search(args) -> dict:
    """Launch workers until the search is done or the budget is spent; write the JSON."""
    t0 = time.time()
    deadline = t0 + args.budget
    out_path = Path(args.out)
    # The attempts end up in the JSON; their working file stays out of the output folder.
    records_path = Path(tempfile.gettempdir()) / f"seqpar_longest_{os.getpid()}_p{args.nproc}.jsonl"
    records_path.unlink(missing_ok=True)
    result = {"benchmark": "seqpar bench longest (search)", "command": " ".join(
        ["seqpar bench longest"] + args.argv), **_env_summary(args),
        "nproc": args.nproc, "preset": args.preset, "activation_checkpointing": args.ac,
        "compile": args.compile,
        "sp_strategy": args.sp_strategy, "sp_layout": args.sp_layout, "batch": 1,
        "first": args.first, "last": args.last, "granularity": args.granularity,
        "budget_s": args.budget, "method": "doubling from start, then coarse bisection between "
        "the largest size that trained and the smallest that ran out of memory (jumping to the "
        "memory model's prediction when it has one); one optimizer step per size after a warm-up "
        "step that allocates the optimizer state"}
    children = []
    while True:
        left = deadline - time.time()
        records = _read(records_path)
        if left < 20 or (records and next_size(records, args.first, args.last, args.granularity,
                                               None) is None):
            break
        rest = [*_common_argv(args), "--records", str(records_path), "--deadline", str(deadline),
                "--first", str(args.first), "--last", str(args.last),
                "--granularity", str(args.granularity), "--warm", str(args.warm)]
        if args.oom_above is not None:
            rest += ["--oom-above", str(args.oom_above)]
        cmd = _child_command(args, rest)
        print(f"[{time.time() - t0:6.1f}s] longest (P={args.nproc}): {' '.join(cmd)}", flush=True)
        try:
            proc = subprocess.run(cmd, timeout=max(left, 1), capture_output=True, text=True)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as e:
            rc, tail = "timeout", _text(e.stdout)[-1500:] + _text(e.stderr)[-1500:]
        new = _read(records_path)[len(records):]
        children.append({"rc": rc, "attempts": len(new)})
        print(f"[{time.time() - t0:6.1f}s] child rc={rc}: "
              + (", ".join(f"T={r['T']} rank {r['rank']} {r['status']}" for r in new) or "no attempts"),
              flush=True)
        if rc == 0:
            break
        if not any(r["status"] == "oom" for r in new):
            # Neither done nor out of memory: a crash or the deadline; keep its output.
            children[-1]["output_tail"] = tail
            print(tail, flush=True)
            break
    records = _read(records_path)
    records_path.unlink(missing_ok=True)
    ok, bad, skipped = search_state(records)
    result.update({
        "longest_ok": max(ok) if ok else None,
        "smallest_failed": min((t for t in bad if not ok or t > max(ok)), default=None),
        "time_bounded": bool(skipped) or (deadline - time.time() < 20 and not bad),
        "attempts": records, "children": children, "seconds": time.time() - t0})
    write_json(out_path, _merge(out_path, f"p{args.nproc}", result))
    print(f"longest (P={args.nproc}): trained {result['longest_ok']} tokens; smallest failed "
          f"{result['smallest_failed']}; time-bounded {result['time_bounded']}", flush=True)
    return result


def _text(x) -> str:
    if x is None:
        return ""
    return x.decode(errors="replace") if isinstance(x, bytes) else x


def _merge(path: Path, key: str, value: dict) -> dict:
    """The JSON at ``path`` with ``key`` set (several runs share one file)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    return data


def _env_summary(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device, args.nproc)
    env.pop("world_size")
    return env


# ---- throughput ----

def throughput(args) -> dict:
    """Timed training steps at ``--seq-len`` under torchrun; rank 0 writes the JSON."""
    from ..train.metrics import peak_flops

    trainer, env = _build(args, args.seq_len)
    row = {"world": env.world, "sp": env.sp, "seq_len": args.seq_len, "preset": args.preset,
           "activation_checkpointing": args.ac, "compile": trainer.compiled,
           "sp_strategy": args.sp_strategy,
           "sp_layout": args.sp_layout, "params": trainer.num_params,
           "flops_per_token": trainer.flops_per_token, "warmup": args.warmup, "steps": args.steps}
    try:
        for i in range(args.warmup):
            _timed_step(trainer, env, args.seq_len, i, None)
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(env.device)
        times = [_timed_step(trainer, env, args.seq_len, args.warmup + i, None) for i in range(args.steps)]
        times.sort()
        step_s = times[len(times) // 2]
        tok_s = args.seq_len / step_s  # batch 1 per data-parallel group; dp = world / sp = 1
        peak = peak_flops(env.device)
        row.update({"step_s": step_s, "step_s_all": times, "tokens_per_s": tok_s,
                    "mfu": None if peak is None else trainer.flops_per_token * tok_s / (peak * env.world),
                    "peak_flops_per_gpu": peak, **_peak_gb(env)})
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if env.world > 1:
            print(row["error"], flush=True)
            os._exit(3)
    if env.rank == 0:
        launcher = (f"torchrun --nproc-per-node {env.world}" if "LOCAL_RANK" in os.environ
                    else "python")
        row["command"] = " ".join([launcher, "-m seqpar.bench.longest"] + args.argv)
        row.update(environment(env.device, env.world))
        out = Path(args.out)
        data = json.loads(out.read_text()) if out.exists() else {}
        data["runs"] = [r for r in data.get("runs", [])
                        if (r.get("world"), r.get("activation_checkpointing")) != (env.world, args.ac)]
        data["runs"].append(row)
        write_json(out, data)
        mfu = row.get("mfu")
        print(f"throughput P={env.world} T={args.seq_len}: "
              + (row["error"] if "error" in row else
                 f"{row['tokens_per_s']:.0f} tokens/s, step {row['step_s']:.3f} s, MFU "
                 + ("n/a" if mfu is None else f"{100 * mfu:.1f}%")), flush=True)
    if env.distributed:
        torch.distributed.destroy_process_group()
    return row


# ---- command line ----

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar bench longest",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", default="1b", help="seqpar.models preset")
    common.add_argument("--sp-strategy", default=None, choices=("scan", "allgather", "ring", "alltoall"))
    common.add_argument("--sp-layout", default="contiguous", choices=("contiguous", "zigzag"))
    common.add_argument("--ac", dest="ac", action="store_true", default=True,
                        help="activation checkpointing (default on)")
    common.add_argument("--no-ac", dest="ac", action="store_false")
    common.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the blocks (default: the trainer's, on for CUDA)")
    sizes = argparse.ArgumentParser(add_help=False)
    # (No option may be a prefix of a torchrun option, e.g. --max of --max-restarts:
    # torchrun would take it.)
    sizes.add_argument("--first", type=int, default=32 * KIB, help="first size")
    sizes.add_argument("--last", type=int, default=16 * KIB * KIB, help="largest size tried")
    sizes.add_argument("--granularity", type=int, default=32 * KIB, help="sizes are multiples of this")
    sizes.add_argument("--warm", type=int, default=4 * KIB,
                       help="tokens of the warm-up step that allocates the optimizer state")
    sizes.add_argument("--oom-above", type=int, default=None,
                       help="treat sizes above this as out of memory (exercises the search without a GPU)")
    s = sub.add_parser("search", parents=[common, sizes], help="longest trainable context")
    s.add_argument("--nproc", type=int, default=1, help="devices (SP degree)")
    s.add_argument("--budget", type=float, default=300.0, help="seconds for the whole search")
    s.add_argument("--out", required=True, help="JSON file (results keyed 'p<nproc>')")
    w = sub.add_parser("worker", parents=[common, sizes], help="internal: one torchrun child of search")
    w.add_argument("--records", required=True)
    w.add_argument("--deadline", type=float, required=True)
    t = sub.add_parser("throughput", parents=[common], help="tokens/s and MFU (under torchrun)")
    t.add_argument("--seq-len", type=int, default=32 * KIB)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--out", required=True, help="JSON file (one row per world size and AC setting)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    if args.command == "search":
        result = search(args)
        return 0 if result["longest_ok"] is not None else 1
    if args.command == "worker":
        return worker(args)
    throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
