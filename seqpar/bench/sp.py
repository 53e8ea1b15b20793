"""``seqpar bench sp``: what sequence parallelism costs, per mixer and strategy.

One rank's compute alone, on one device and no process group (``--simulate``)::

    seqpar bench sp --simulate 2,8 --t-local 8192,32768 --out sp_local.json
    seqpar bench sp --simulate 2 --device cpu --small --out /tmp/sp_local.json

Under torchrun, one process per GPU (or per CPU process with ``--device cpu``, gloo)::

    torchrun --nproc-per-node 2 -m seqpar.bench.sp --out sp.json
    torchrun --nproc-per-node 2 -m seqpar.bench.sp --device cpu --small --out /tmp/sp.json

For every mixer (the six linear-family ops and causal softmax attention) and every SP
configuration (linear: ``scan`` / ``allgather``; softmax: ``ring`` / ``alltoall`` /
``allgather``; under the layouts of ``--layouts``, or ``--linear-layouts`` for the linear
family) it times one op call, forward plus
backward (``o.backward(do)``), with 16 heads of 128 (bf16 on CUDA, float32 on CPU):

* **weak scaling**: every rank holds ``--seq-per-gpu`` tokens (global length P x that),
  against the same op without SP on one device at ``--seq-per-gpu`` tokens;
* **strong scaling**: the global length is ``--seq-total`` (each rank holds 1/P of it),
  against the op without SP on one device at ``--seq-total`` tokens. When that equals
  P x ``--seq-per-gpu`` the SP runs are the weak-scaling ones (not repeated), compared
  with the other baseline.

The one-device baselines run in the same invocation, on every rank at once (each on its
own device, no communication), so they see the same clocks and neighbours as the SP runs.

How things are measured (also written into the JSON under ``method``):

* time: ranks meet at a barrier (after a device synchronize) before each repetition;
  CUDA events (``time.perf_counter`` on CPU) bracket forward+backward on each rank; a
  repetition's time is the maximum over ranks (a step waits for its slowest rank); the
  reported time is the median over ``--reps`` repetitions after ``--warmup``.
* communication: the same call is timed again on a ``SequenceParallel`` built on a
  :class:`~seqpar.parallel.LocalCommunicator` (every collective returns a buffer of the
  right shape at once: no transfer, no waiting for peers), so that exactly the local
  compute of the SP path remains. ``comm_ms = ms - compute_ms`` is the time that
  communication adds to the step: transfers, waiting for the previous rank in the
  ``scan`` chain and synchronization, minus whatever overlaps with compute. The
  stand-ins' local copies stay in ``compute_ms`` (for the all-gather of softmax KV that
  is a copy of the gathered size), so ``comm_ms`` errs low there. Third-party rows have
  no local mode: their ``compute_ms`` is their ``ms``.
* bytes: ``SequenceParallel.bytes_sent`` over one forward+backward, per rank, split by op;
  for the linear family also the closed form (:func:`expected_linear_bytes`).
* correctness: unless ``--no-check``, every SP configuration's output and input
  gradients are compared with the single-device op on the whole sequence (relative L2
  over all ranks).

ring-flash-attn and yunchang run as extra softmax rows when importable (they need
``flash_attn``); otherwise a note in ``skipped`` says why.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import ops
from ..ops.linear import engine as linear_engine
from ..parallel import Geometry, LocalCommunicator, SequenceParallel, shard

LINEAR = ("linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "mlstm")
MIXERS = LINEAR + ("softmax_attn",)
LINEAR_STRATEGIES = ("scan", "allgather")
ATTN_STRATEGIES = ("ring", "alltoall", "allgather")
LAYOUTS = ("contiguous", "zigzag")
# Transition shape per chunk of one batch row and head (rows, cols): scalar decay,
# per-key decay, or the K x K product of the delta rule's (I - beta k^T k) factors.
_TRANSITION = {"linear_attn": "scalar", "simple_gla": "scalar", "mlstm": "scalar",
               "gla": "key", "delta_rule": "matrix", "gated_delta_rule": "matrix"}

METHOD = {
    "time": "median over reps of the per-repetition maximum over ranks of forward+backward "
            "time of one op call (CUDA events on GPU, perf_counter on CPU); ranks synchronize "
            "and meet at a barrier before each repetition",
    "compute_ms": "the same call on a LocalCommunicator, whose collectives return buffers of "
                  "the same shapes at once (no transfer, no waiting)",
    "comm_ms": "ms - compute_ms: the time communication (transfers, waiting on peers, "
               "pipeline bubbles of the scan) adds to the step, net of overlap",
    "bytes_per_rank": "SequenceParallel.bytes_sent over one forward+backward on each rank",
    "baseline_ms": "the op without SP on one device (every rank at once, each on its own "
                   "device), weak: at seq_per_gpu tokens, strong: at seq_total tokens",
    "weak_overhead": "ms / baseline_ms - 1 (weak scaling: P devices at P*T against one at T)",
    "strong_speedup": "baseline_ms / ms (strong scaling: the same total T on P devices and on one)",
    "max_rel_err": "max over output and input gradients of the relative L2 error of the SP "
                   "result (all ranks) against the single-device op on the whole sequence",
}


# ---- inputs ----

def make_inputs(mixer: str, B: int, T: int, H: int, D: int, dtype, device, seed: int) -> list:
    """Full-sequence inputs of ``mixer`` (the same on every rank for the same seed):
    q, k, v (B, T, H, D) in ``dtype`` (q, k L2-normalized for the linear family), then
    the mixer's gates: g (B, T, H) or (B, T, H, D) float32 log decays, beta (B, T, H) in
    ``dtype``, mLSTM's i, f (B, T, H) float32 pre-activations."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)

    q, k, v = rand(B, T, H, D), rand(B, T, H, D), rand(B, T, H, D)
    if mixer != "softmax_attn":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    xs = [q.to(dtype), k.to(dtype), v.to(dtype)]
    if mixer in ("simple_gla", "gated_delta_rule"):
        xs.append(F.logsigmoid(rand(B, T, H) + 4.0))
    if mixer == "gla":
        xs.append(F.logsigmoid(rand(B, T, H, D) + 4.0))
    if mixer in ("delta_rule", "gated_delta_rule"):
        xs.append(torch.sigmoid(rand(B, T, H)).to(dtype))
    if mixer == "mlstm":
        xs += [rand(B, T, H), rand(B, T, H) + 3.0]
    return xs


def call_op(mixer: str, xs: list, sp, backend: str) -> torch.Tensor:
    """The output ``o`` of one call of ``seqpar.ops.<mixer>`` (causal for softmax)."""
    if mixer == "softmax_attn":
        return ops.softmax_attn(*xs, causal=True, sp=sp)[0]
    return getattr(ops, mixer)(*xs, sp=sp, backend=backend)[0]


# ---- closed forms ----

def expected_linear_bytes(mixer: str, strategy: str, layout: str, world: int, rank: int,
                          B: int, H: int, K: int, V: int) -> int:
    """Bytes one rank sends in one forward+backward of a linear-family op with SP.

    States are float32 (B, H, K, V') with V' = V + 1 for mLSTM (its normalizer rides
    along as an extra value column); transitions are (B, H, 1, 1), (B, H, K, 1) or
    (B, H, K, K). ``allgather`` sends every local chunk's (M, C) to the P - 1 other ranks
    forward and its state gradient backward; ``scan`` sends one state forward per local
    chunk whose successor lives on another rank and one backward per local chunk whose
    predecessor does: about one state each way per rank, whatever P.
    """
    Vs = V + 1 if mixer == "mlstm" else V
    state = B * H * K * Vs * 4
    m_cols = {"scalar": (1, 1), "key": (K, 1), "matrix": (K, K)}[_TRANSITION[mixer]]
    trans = B * H * m_cols[0] * m_cols[1] * 4
    geo = Geometry(world, rank, layout, 2 if layout == "zigzag" else 1)
    chunks = geo.chunks
    if strategy == "allgather":
        return (world - 1) * len(chunks) * (trans + 2 * state)
    n = geo.n_chunks
    fwd = sum(1 for c in chunks if c + 1 < n and geo.owner(c + 1) != rank)
    bwd = sum(1 for c in chunks if c > 0 and geo.owner(c - 1) != rank)
    return (fwd + bwd) * state


# ---- timing ----

class Bench:
    """Timing and bookkeeping shared by every measurement of one invocation."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def max_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def any_rank(self, flag: bool) -> bool:
        return self.max_over_ranks([float(flag)])[0] > 0

    def time(self, step) -> float:
        """Median over reps of the max over ranks of one ``step()`` in ms."""
        times = []
        for i in range(self.args.warmup + self.args.reps):
            self.sync()
            dist.barrier()
            ms = time_once(step, self.cuda)
            if i >= self.args.warmup:
                times.append(ms)
        return statistics.median(self.max_over_ranks(times))


def time_once(step, cuda: bool) -> float:
    """Milliseconds of one ``step()``: CUDA events on GPU, perf_counter on CPU."""
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def leaves(xs: list) -> list:
    """Detached copies of ``xs`` as autograd leaves (floating ones require grad)."""
    return [x.detach().clone().requires_grad_(x.is_floating_point()) for x in xs]


def fwd_bwd_step(mixer, xs, do, sp, backend):
    """A callable running one forward+backward of ``mixer`` on the leaves ``xs`` with
    output gradient ``do`` (``sp``: a SequenceParallel or None)."""
    def step():
        for x in xs:
            x.grad = None
        call_op(mixer, xs, sp, backend).backward(do)
    return step


def _rel_err_sq(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    a, b = a.double(), b.double()
    return float((a - b).pow(2).sum()), float(b.pow(2).sum())


class Reference:
    """Single-device output and input gradients of a mixer on the whole sequence,
    computed once per (mixer, length) and reused by every SP configuration."""

    def __init__(self):
        self._cache = {}

    def get(self, mixer, full, do_full, backend):
        key = (mixer, full[0].shape[1])
        if key not in self._cache:
            self._cache.clear()
            xs = leaves(full)
            o = call_op(mixer, xs, None, backend)
            o.backward(do_full)
            self._cache[key] = (o.detach(), [x.grad for x in xs])
        return self._cache[key]


def check_against(bench, mixer, full, do_full, xs, o, sp, backend, reference) -> float:
    """Max relative L2 error (over o and every input gradient, all ranks together) of an
    SP result against the single-device op on the whole sequence."""
    o_ref, g_ref = reference.get(mixer, full, do_full, backend)
    pairs = [(o, shard(o_ref, sp))] + [(x.grad, shard(g, sp)) for x, g in zip(xs, g_ref)
                                       if g is not None]
    sums = []
    for a, b in pairs:
        sums.extend(_rel_err_sq(a, b))
    t = torch.tensor(sums, dtype=torch.float64, device=bench.device)
    dist.all_reduce(t)
    t = t.view(-1, 2)
    return float((t[:, 0].sqrt() / t[:, 1].sqrt().clamp_min(1e-300)).max())


# ---- optional third-party softmax SP ----

def external_impls(world: int) -> tuple[dict, list[str]]:
    """Importable third-party softmax SP functions ``(q, k, v) -> o`` on shards, by name,
    with their layouts; and notes for those that are not importable."""
    found, notes = {}, []
    try:
        from ring_flash_attn import ring_flash_attn_func, zigzag_ring_flash_attn_func

        found["ring_flash_attn.ring"] = ("contiguous", lambda q, k, v: ring_flash_attn_func(q, k, v, causal=True))
        found["ring_flash_attn.zigzag"] = ("zigzag", lambda q, k, v: zigzag_ring_flash_attn_func(q, k, v, causal=True))
    except Exception as e:  # noqa: BLE001 -- any import failure means "not available here"
        notes.append(f"ring-flash-attn not run: {type(e).__name__}: {e}")
    try:
        from yunchang import LongContextAttention, set_seq_parallel_pg

        set_seq_parallel_pg(world, 1, dist.get_rank(), world)
        attn = LongContextAttention(ring_impl_type="basic")
        found["yunchang.ulysses"] = ("contiguous", lambda q, k, v: attn(q, k, v, causal=True))
    except Exception as e:  # noqa: BLE001
        notes.append(f"yunchang not run: {type(e).__name__}: {e}")
    return found, notes


# ---- the run ----

def _configs(mixer: str, args) -> list[tuple[str, str]]:
    if mixer == "softmax_attn":
        return [(s, lay) for s in ATTN_STRATEGIES for lay in args.layouts]
    return [(s, lay) for s in LINEAR_STRATEGIES for lay in args.linear_layouts]


def _nccl_version() -> str:
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def environment(device: torch.device, world: int) -> dict:
    """Versions, devices and date, for every results file."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if device.type == "cuda" else [])
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device.type, "gpus": gpus, "world_size": world,
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "nccl": _nccl_version() if device.type == "cuda" else None,
            "python": platform.python_version(), "host": platform.node(), "cpu": platform.processor()}


def write_json(path: Path, data: dict) -> None:
    """Write atomically (a killed run leaves the previous complete file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class Run:
    """One invocation: measures mixer after mixer, writing the JSON after each row."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.bench = Bench(args, device)
        self.rank, self.world = self.bench.rank, self.bench.world
        self.t0 = time.perf_counter()
        self.reference = Reference()
        self.out = {"benchmark": "seqpar bench sp", "command": " ".join(["seqpar bench sp"] + args.argv),
                    **environment(device, self.world),
                    "dtype": str(args.dtype).replace("torch.", ""), "batch": args.batch,
                    "heads": args.heads, "head_dim": args.head_dim,
                    "seq_per_gpu": args.seq_per_gpu, "seq_total": args.seq_total,
                    "warmup": args.warmup, "reps": args.reps, "method": METHOD,
                    "baselines": [], "results": [], "skipped": [], "complete": False}

    def save(self):
        if self.rank == 0 and self.args.out:
            write_json(Path(self.args.out), self.out)

    def log(self, text: str):
        if self.rank == 0:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {text}", flush=True)

    def out_of_time(self) -> bool:
        late = self.args.budget is not None and time.perf_counter() - self.t0 > self.args.budget
        return self.bench.any_rank(late)

    def shape(self, T):
        a = self.args
        return a.batch, T, a.heads, a.head_dim

    def inputs(self, mixer, T):
        B, T, H, D = self.shape(T)
        xs = make_inputs(mixer, B, T, H, D, self.args.dtype, self.device, seed=T)
        gen = torch.Generator(device=self.device).manual_seed(T + 1)
        do = torch.randn(B, T, H, D, generator=gen, device=self.device).to(self.args.dtype)
        return xs, do

    def baseline(self, mixer, T, backend) -> float:
        xs, do = self.inputs(mixer, T)
        xs = leaves(xs)
        ms = self.bench.time(fwd_bwd_step(mixer, xs, do, None, backend))
        self.out["baselines"].append({"mixer": mixer, "seq_len": T, "backend": backend, "ms": ms})
        self.save()
        self.log(f"{mixer:>16} 1 device  T={T:>8}: {ms:9.3f} ms")
        return ms

    def measure(self, mixer, impl, strategy, layout, mode, total, base_ms, backend, fn=None):
        """One SP row: time, compute-only time, bytes and (optionally) the error."""
        a = self.args
        row = {"mixer": mixer, "impl": impl, "strategy": strategy, "layout": layout, "mode": mode,
               "world_size": self.world, "seq_total": total, "seq_per_gpu": total // self.world,
               "backend": backend, "baseline_ms": base_ms}
        try:
            sp = SequenceParallel(None, layout=layout, check_shapes=False,
                                  **({"attn_strategy": strategy} if mixer == "softmax_attn"
                                     else {"linear_strategy": strategy}))
            full, do_full = self.inputs(mixer, total)
            xs = leaves([shard(x, sp) for x in full])
            do = shard(do_full, sp)
            if fn is None:
                step = fwd_bwd_step(mixer, xs, do, sp, backend)
            else:
                def step():
                    for x in xs:
                        x.grad = None
                    fn(*xs).backward(do)
            sp.reset_bytes()
            step()
            self.bench.sync()
            if fn is None:  # third-party code does not count its bytes
                per_rank = [None] * self.world
                dist.all_gather_object(per_rank, dict(sp.bytes_by_op))
                row["bytes_by_op"] = per_rank
                row["bytes_per_rank"] = [sum(d.values()) for d in per_rank]
            if mixer in LINEAR and fn is None:
                B, _, H, D = self.shape(total)
                row["expected_bytes_per_rank"] = [
                    expected_linear_bytes(mixer, strategy, layout, self.world, r, B, H, D, D)
                    for r in range(self.world)]
            if a.check:
                o = call_op(mixer, xs, sp, backend) if fn is None else fn(*xs)
                for x in xs:
                    x.grad = None
                o.backward(do)
                row["max_rel_err"] = check_against(self.bench, mixer, full, do_full, xs, o.detach(),
                                                   sp, backend, self.reference)
                del o
            row["ms"] = self.bench.time(step)
            if fn is None:
                local = SequenceParallel(layout=layout, check_shapes=False,
                                         comm=LocalCommunicator(self.world, self.rank),
                                         **({"attn_strategy": strategy} if mixer == "softmax_attn"
                                            else {"linear_strategy": strategy}))
                row["compute_ms"] = self.bench.time(fwd_bwd_step(mixer, xs, do, local, backend))
            else:
                row["compute_ms"] = row["ms"]
            row["comm_ms"] = row["ms"] - row["compute_ms"]
            if base_ms is not None:
                if mode == "weak":
                    row["weak_overhead"] = row["ms"] / base_ms - 1
                    row["efficiency"] = base_ms / row["ms"]
                else:
                    row["strong_speedup"] = base_ms / row["ms"]
                    row["efficiency"] = row["strong_speedup"] / self.world
        except Exception as e:  # noqa: BLE001 -- recorded in the row; the run goes on
            row["error"] = f"{type(e).__name__}: {e}"[:2000]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.out["results"].append(row)
        self.save()
        if "error" in row:
            self.log(f"{mixer:>16} {impl}:{strategy}/{layout} {mode}: ERROR {row['error'][:300]}")
        else:
            extra = (f" overhead {100 * row['weak_overhead']:+.1f}%" if "weak_overhead" in row else
                     f" speedup {row['strong_speedup']:.2f}x" if "strong_speedup" in row else "")
            self.log(f"{mixer:>16} {impl}:{strategy}/{layout} {mode} T/P={total // self.world}: "
                     f"{row['ms']:9.3f} ms (comm {row['comm_ms']:+.3f} ms, "
                     f"{max(row.get('bytes_per_rank') or [0]) / 1e6:.3f} MB/rank){extra}"
                     + (f" err {row['max_rel_err']:.1e}" if "max_rel_err" in row else ""))

    def modes(self):
        """(mode, global length) pairs."""
        a = self.args
        out = [("weak", a.seq_per_gpu * self.world)]
        if a.seq_total is not None:
            out.append(("strong", a.seq_total))
        return out

    def strong_from_weak(self, mixer, base_ms):
        """Strong-scaling rows when the total equals the weak run's: the SP runs are the
        same, only the one-device baseline differs (one device at the total)."""
        for row in [r for r in self.out["results"] if r["mixer"] == mixer and r["mode"] == "weak"]:
            new = {k: v for k, v in row.items() if k not in ("weak_overhead", "efficiency")}
            new.update(mode="strong", baseline_ms=base_ms, same_run_as_weak=True)
            if "ms" in new:
                new["strong_speedup"] = base_ms / new["ms"]
                new["efficiency"] = new["strong_speedup"] / self.world
            self.out["results"].append(new)
        self.save()

    def run_mixer(self, mixer):
        a = self.args
        backend = a.backend
        if mixer != "softmax_attn" and self.device.type == "cuda" and backend == "auto":
            # A kernel that fails here must not cost the whole mixer: retry on the
            # PyTorch path, and say so in the rows.
            try:
                base_weak = self.baseline(mixer, a.seq_per_gpu, backend)
            except Exception as e:  # noqa: BLE001
                self.out["skipped"].append(f"{mixer}: backend 'auto' failed ({type(e).__name__}: "
                                           f"{str(e)[:500]}); measured with backend 'torch'")
                torch.cuda.empty_cache()
                backend = "torch"
                base_weak = self.baseline(mixer, a.seq_per_gpu, backend)
        else:
            base_weak = self.baseline(mixer, a.seq_per_gpu, backend)
        bases = {"weak": base_weak}
        for mode, total in self.modes():
            if mode == "strong":
                bases["strong"] = self.baseline(mixer, total, backend)
                if total == a.seq_per_gpu * self.world:
                    self.strong_from_weak(mixer, bases["strong"])
                    continue
            for strategy, layout in _configs(mixer, a):
                if self.out_of_time():
                    return False
                self.measure(mixer, "seqpar", strategy, layout, mode, total, bases[mode], backend)
            if mixer == "softmax_attn":
                for name, (layout, fn) in self.external.items():
                    if self.out_of_time():
                        return False
                    self.measure(mixer, name, "-", layout, mode, total, bases[mode], backend, fn)
        return True

    def run(self):
        self.external, notes = (external_impls(self.world) if "softmax_attn" in self.args.mixers
                                else ({}, []))
        self.out["skipped"].extend(notes)
        for note in notes:
            self.log(note)
        for mixer in self.args.mixers:
            if self.out_of_time():
                self.out["skipped"].append(f"stopped at {mixer}: --budget {self.args.budget} s spent")
                self.log(self.out["skipped"][-1])
                break
            try:
                done = self.run_mixer(mixer)
            except Exception as e:  # noqa: BLE001 -- a baseline that fails skips its mixer
                self.out["skipped"].append(f"{mixer}: {type(e).__name__}: {str(e)[:1000]}")
                self.log(self.out["skipped"][-1])
                done = True
            if not done:
                self.out["skipped"].append(f"stopped in {mixer}: --budget {self.args.budget} s spent")
                self.log(self.out["skipped"][-1])
                break
        else:
            self.out["complete"] = True
        self.out["seconds"] = time.perf_counter() - self.t0
        self.save()
        return self.out


# ---- one simulated rank on one device ----

SIM_METHOD = {
    "sp_ms": "median over reps of forward+backward (o.backward(do)) of one op call on rank "
             "`rank` of a `world`-rank group, simulated on one device: SequenceParallel built "
             "on LocalCommunicator(world, rank), whose collectives return buffers of the right "
             "shapes at once (zeros for received states), so only that rank's compute is timed",
    "base_ms": "the same op without SP: linear family at T_local tokens; softmax attention: "
               "the causal op over the whole sequence (world x T_local tokens) divided by world, "
               "the rank's share of the causal work",
    "ratio": "sp_ms / base_ms, both measured in this run",
    "graph_*": "on CUDA, the same steps captured once in a CUDA graph and timed by replay "
               "(median): device time alone, without the host's launch overhead",
    "host_syncs": "CUDA host synchronizations during one steady-state forward+backward of the "
                  "SP call (torch.cuda.set_sync_debug_mode), null on CPU",
}


def _median_ms(step, warmup: int, reps: int, cuda: bool) -> float:
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    return statistics.median(time_once(step, cuda) for _ in range(reps))


def graph_ms(step, reps: int) -> float:
    """Median ms of replaying one ``step()`` captured in a CUDA graph (warmed up on a side
    stream first, as capture requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    ms = statistics.median(time_once(graph.replay, True) for _ in range(reps))
    del graph
    return ms


def count_host_syncs(step) -> int | None:
    """Host synchronizations CUDA reports during one ``step()`` (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def simulate(args, device: torch.device) -> dict:
    """Per-rank compute of every SP configuration against the op without SP, on one
    device (``--simulate``); returns the results dict (also written to ``--out``)."""
    cuda = device.type == "cuda"
    B, H, D = args.batch, args.heads, args.head_dim
    out = {"benchmark": "seqpar bench sp --simulate",
           "command": " ".join(["seqpar bench sp"] + args.argv),
           **environment(device, 1), "dtype": str(args.dtype).replace("torch.", ""),
           "batch": B, "heads": H, "head_dim": D, "segment": linear_engine.SEGMENT,
           "warmup": args.warmup, "reps": args.reps,
           "method": SIM_METHOD, "rows": [], "skipped": [], "complete": False}
    t0 = time.perf_counter()

    def save():
        if args.out:
            write_json(Path(args.out), out)

    def fwd_bwd(mixer, T, sp):
        xs, = [leaves(make_inputs(mixer, B, T, H, D, args.dtype, device, seed=T))]
        do = torch.randn(B, T, H, D, device=device).to(args.dtype)
        return fwd_bwd_step(mixer, xs, do, sp, args.backend)

    for mixer in args.mixers:
        for T in args.t_local:
            base_cache = {}
            for P in args.simulate:
                # softmax attention: this rank's share of the causal op over the whole
                # sequence; the linear family: the op at the rank's own length
                whole, share = (P * T, P) if mixer == "softmax_attn" else (T, 1)
                if whole not in base_cache:
                    base_cache[whole] = _median_ms(fwd_bwd(mixer, whole, None), args.warmup,
                                                   args.reps, cuda)
                    if cuda and args.graphs:
                        base_cache["graph", whole] = graph_ms(fwd_bwd(mixer, whole, None), args.reps)
                base = base_cache[whole] / share
                for strategy, layout in _configs(mixer, args):
                    for rank in sorted({0, 1 % P, P - 1}):
                        row = {"op": mixer, "strategy": strategy, "layout": layout, "world": P,
                               "rank": rank, "T_local": T, "base_ms": base}
                        try:
                            sp = SequenceParallel(
                                layout=layout, comm=LocalCommunicator(P, rank),
                                **({"attn_strategy": strategy} if mixer == "softmax_attn"
                                   else {"linear_strategy": strategy}))
                            step = fwd_bwd(mixer, T, sp)
                            row["sp_ms"] = _median_ms(step, args.warmup, args.reps, cuda)
                            row["ratio"] = row["sp_ms"] / base
                            row["host_syncs"] = count_host_syncs(step)
                            if ("graph", whole) in base_cache:
                                row["graph_base_ms"] = base_cache["graph", whole] / share
                                row["graph_sp_ms"] = graph_ms(step, args.reps)
                                row["graph_ratio"] = row["graph_sp_ms"] / row["graph_base_ms"]
                        except Exception as e:  # noqa: BLE001 -- recorded in the row; the run goes on
                            row["error"] = f"{type(e).__name__}: {e}"[:2000]
                        out["rows"].append(row)
                        save()
                        print(f"[{time.perf_counter() - t0:6.1f}s] {mixer:>16} {strategy:>9}/"
                              f"{layout:<10} P={P} rank={rank} T_local={T}: "
                              + (f"{row['sp_ms']:8.3f} ms vs {base:8.3f} ms = {row['ratio']:.3f}x"
                                 f" syncs={row['host_syncs']}"
                                 + (f" graphs {row['graph_ratio']:.3f}x" if "graph_ratio" in row else "")
                                 if "error" not in row
                                 else "ERROR " + row["error"][:300]), flush=True)
                        if args.budget is not None and time.perf_counter() - t0 > args.budget:
                            out["skipped"].append(f"stopped after {mixer} P={P} T={T}: "
                                                  f"--budget {args.budget} s spent")
                            out["seconds"] = time.perf_counter() - t0
                            save()
                            return out
    out["complete"] = True
    out["seconds"] = time.perf_counter() - t0
    save()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seqpar bench sp",
        description="Time sequence parallelism per mixer and strategy (run under torchrun); "
                    "see the module docstring for how each number is measured.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: CUDA (NCCL) when available, else CPU (gloo)")
    p.add_argument("--simulate", default=None, metavar="P[,P...]",
                   help="no process group: time ranks 0, 1 and P-1 of a P-rank group on this one "
                        "device with communication stubbed out (LocalCommunicator), beside the op "
                        "without SP; comma-separated world sizes")
    p.add_argument("--no-graphs", dest="graphs", action="store_false",
                   help="with --simulate on CUDA: skip the CUDA-graph timings")
    p.add_argument("--t-local", default="8192,32768",
                   help="with --simulate: comma-separated tokens per rank")
    p.add_argument("--mixers", default=",".join(MIXERS), help="comma-separated, among " + ", ".join(MIXERS))
    p.add_argument("--layouts", default="contiguous,zigzag",
                   help="comma-separated SP layouts (softmax attention, and the linear family "
                        "unless --linear-layouts is given)")
    p.add_argument("--linear-layouts", default=None,
                   help="comma-separated SP layouts for the linear family (default: --layouts)")
    p.add_argument("--seq-per-gpu", type=int, default=32768, help="tokens per rank (weak scaling)")
    p.add_argument("--seq-total", type=int, default=None,
                   help="global tokens for strong scaling (default 4 x --seq-per-gpu; 0: none)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto: bf16 on CUDA, float32 on CPU")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                   help="linear-family backend")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing each SP result with the single-device op")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds; no new measurement starts after this (the JSON says where it stopped)")
    p.add_argument("--small", action="store_true",
                   help="CPU-sized shapes: 4 heads of 16, 64 tokens per rank, strong total 256, "
                        "1 warmup, 2 reps (explicit options still win)")
    p.add_argument("--segment", type=int, default=None,
                   help="tokens per segment of the linear family's state-only passes (a "
                        "multiple of 64; default: the library's, "
                        "seqpar.ops.linear.engine.SEGMENT); for tuning")
    p.add_argument("--out", default=None, help="JSON file (rank 0 writes it after every row)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if args.small:
        for opt, value in (("--heads", 4), ("--head-dim", 16), ("--seq-per-gpu", 64),
                           ("--seq-total", 256), ("--warmup", 1), ("--reps", 2)):
            if opt not in given:
                setattr(args, opt[2:].replace("-", "_"), value)
    args.mixers = [m.strip() for m in args.mixers.split(",") if m.strip()]
    for m in args.mixers:
        if m not in MIXERS:
            p.error(f"--mixers: expected names among {', '.join(MIXERS)}, got {m!r}")
    if args.linear_layouts is None:
        args.linear_layouts = args.layouts
    for name in ("layouts", "linear_layouts"):
        values = [x.strip() for x in getattr(args, name).split(",") if x.strip()]
        for x in values:
            if x not in LAYOUTS:
                p.error(f"--{name.replace('_', '-')}: expected names among {', '.join(LAYOUTS)}, got {x!r}")
        setattr(args, name, values)
    for name in ("seq_per_gpu", "batch", "heads", "head_dim", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup: expected an int >= 0, got {args.warmup}")
    if args.segment is not None and (args.segment < 64 or args.segment % 64):
        p.error(f"--segment: expected a positive multiple of 64, got {args.segment}")
    if args.simulate is not None:
        try:
            args.simulate = [int(x) for x in args.simulate.split(",") if x.strip()]
            args.t_local = [int(x) for x in args.t_local.split(",") if x.strip()]
        except ValueError:
            p.error(f"--simulate / --t-local: expected comma-separated ints, got "
                    f"{args.simulate!r} / {args.t_local!r}")
        if not args.simulate or min(args.simulate) < 1 or not args.t_local or min(args.t_local) < 1:
            p.error(f"--simulate / --t-local: expected positive ints, got {args.simulate} / {args.t_local}")
        if args.small and "--t-local" not in given:
            args.t_local = [64]
    args.argv = list(argv)
    return args


def _init(args) -> torch.device:
    """Join (or, without torchrun, create) the process group; returns this rank's device."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``seqpar bench sp`` (and ``python -m seqpar.bench.sp``)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.segment is not None:
        linear_engine.SEGMENT = args.segment
    if args.simulate is not None:
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        args.dtype = ({"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
                      if args.dtype != "auto" else torch.bfloat16 if use_cuda else torch.float32)
        simulate(args, device)
        return 0
    device = _init(args)
    if args.dtype == "auto":
        args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        args.dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if args.seq_total is None:
        args.seq_total = 4 * args.seq_per_gpu
    elif args.seq_total == 0:
        args.seq_total = None
    try:
        Run(args, device).run()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
