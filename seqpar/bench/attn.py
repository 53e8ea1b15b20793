"""``seqpar bench attn``: :func:`seqpar.ops.softmax_attn` against every PyTorch SDPA
backend on the same causal input, forward + backward.

For each ``--T`` (batch 1, ``--heads`` heads of ``--head-dim``, bf16 on CUDA):

* ``sdpa:<backend>``: ``F.scaled_dot_product_attention(is_causal=True)`` pinned to one
  backend (cuDNN, flash, efficient) with ``torch.nn.attention.sdpa_kernel``; a backend
  that refuses the input is listed under ``skipped``;
* ``softmax_attn``: the op on the same tensors (it also returns the log-sum-exp);
* ``softmax_attn packed``: the same stream as ``--docs`` packed documents of equal length
  (``cu_seqlens``), against the fastest SDPA backend on the same documents laid out as a
  batch of ``--docs`` rows (the same work; SDPA has no packed layout).

Times are medians of ``--reps`` CUDA-event timings (``time.perf_counter`` on CPU) after
``--warmup`` calls; ``ratio`` is the op's time over the fastest SDPA backend's. Each
op output is checked against SDPA's (relative L2 error).

    seqpar bench attn --T 8192 32768 --out attn.json
    seqpar bench attn --T 256 --heads 2 --head-dim 16 --out /tmp/attn.json   # CPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import ops
from .sp import environment, write_json


def _backends():
    from torch.nn.attention import SDPBackend

    names = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
    return [(n.split("_")[0].lower(), getattr(SDPBackend, n)) for n in names if hasattr(SDPBackend, n)]


def _time(fn, args, reps: int, warmup: int, device) -> float:
    """Median milliseconds of ``fn(*args)`` (forward + backward)."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def _fwd_bwd(forward):
    def run(q, k, v, do):
        o = forward(q, k, v)
        o.backward(do)
        for x in (q, k, v):
            x.grad = None
        return o
    return run


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def forward(q, k, v):  # (B, T, H, D) in and out
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), is_causal=True).transpose(1, 2)
    return forward


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def bench_T(args, T: int, device, dtype) -> dict:
    gen = torch.Generator(device=device).manual_seed(T)
    H, D, n = args.heads, args.head_dim, args.docs

    def leaf(B, L):
        return torch.randn(B, L, H, D, generator=gen, device=device, dtype=dtype).requires_grad_()

    q, k, v = leaf(1, T), leaf(1, T), leaf(1, T)
    do = torch.randn(1, T, H, D, generator=gen, device=device, dtype=dtype)
    row = {"T": T, "heads": H, "head_dim": D, "dtype": str(dtype).replace("torch.", ""),
           "docs": n, "ms": {}, "skipped": {}, "rel_err": {}}
    ref = None
    for name, backend in _backends():
        if name == "math" and device.type == "cuda":
            continue  # minutes at 32K, and never the fastest
        try:
            ms = _time(_fwd_bwd(_sdpa(backend)), (q, k, v, do), args.reps, args.warmup, device)
        except RuntimeError as e:
            row["skipped"][f"sdpa:{name}"] = str(e).splitlines()[0][:200]
            continue
        row["ms"][f"sdpa:{name}"] = ms
        if ref is None:
            ref = _sdpa(backend)(q, k, v)
    sdpa = {k_: v_ for k_, v_ in row["ms"].items() if k_.startswith("sdpa:")}
    best = min(sdpa, key=sdpa.get) if sdpa else None
    row["best_sdpa"] = best

    def op(q_, k_, v_, cu=None):
        return ops.softmax_attn(q_, k_, v_, causal=True, cu_seqlens=cu)[0]

    row["ms"]["softmax_attn"] = _time(_fwd_bwd(op), (q, k, v, do), args.reps, args.warmup, device)
    if ref is not None:
        row["rel_err"]["softmax_attn"] = _rel(op(q, k, v), ref)
        row["ratio"] = row["ms"]["softmax_attn"] / row["ms"][best]
    if n > 1 and T % n == 0:
        L = T // n
        cu = torch.arange(0, T + 1, L, device=device, dtype=torch.int32)

        def packed(q_, k_, v_):
            return op(q_, k_, v_, cu)

        row["ms"]["softmax_attn packed"] = _time(_fwd_bwd(packed), (q, k, v, do), args.reps,
                                                 args.warmup, device)
        # The same documents as a batch of n rows, for SDPA.
        qb, kb, vb = (x.detach().view(n, L, H, D).requires_grad_() for x in (q, k, v))
        dob = do.view(n, L, H, D)
        for name, backend in _backends():
            if f"sdpa:{name}" not in sdpa:
                continue
            try:
                row["ms"][f"sdpa:{name} rows"] = _time(_fwd_bwd(_sdpa(backend)), (qb, kb, vb, dob),
                                                       args.reps, args.warmup, device)
            except RuntimeError as e:
                row["skipped"][f"sdpa:{name} rows"] = str(e).splitlines()[0][:200]
        rows = {k_: v_ for k_, v_ in row["ms"].items() if k_.endswith(" rows")}
        if rows:
            best_rows = min(rows, key=rows.get)
            row["best_sdpa_rows"] = best_rows
            row["ratio_packed"] = row["ms"]["softmax_attn packed"] / rows[best_rows]
            row["rel_err"]["softmax_attn packed"] = _rel(
                packed(q, k, v).view(n, L, H, D),
                _sdpa(dict(_backends())[best_rows.split(":")[1].split()[0]])(qb, kb, vb))
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqpar bench attn", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--docs", type=int, default=4, help="packed documents per stream")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = {"benchmark": "seqpar bench attn", "command": " ".join(["seqpar bench attn"] + argv),
              **environment(device, 1), "rows": []}
    for T in args.T:
        row = bench_T(args, T, device, dtype)
        result["rows"].append(row)
        times = "  ".join(f"{k}: {v:.3f}" for k, v in row["ms"].items())
        print(f"T={T}: {times} ms; op / best SDPA ({row['best_sdpa']}): "
              f"{row.get('ratio', float('nan')):.3f}; packed / best SDPA rows: "
              f"{row.get('ratio_packed', float('nan')):.3f}; errors {row['rel_err']}", flush=True)
        if args.out:
            write_json(Path(args.out), result)
    if args.out:
        write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
