"""Where the time of one op's forward+backward goes: a torch.profiler table of GPU
kernels, per op and shape, so kernel work targets the kernels that dominate.

Run on the device: ``python bench/device/profile_ops.py OUT.json --ops linear_attn
--T 8192 [--peer fla]``. Shapes as ``seqpar bench ops`` (B T = 32K tokens, 16 heads of
128, bf16). Prints each kernel's total CUDA time per forward+backward (averaged over
the profiled repetitions) and writes them to OUT.json.
"""
import argparse
import json
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from seqpar.bench.ops import fla_fn, make_inputs, seqpar_fn


def kernel_table(fn, xs, reps=5):
    """Mean CUDA time per call (ms) of each kernel in ``fn(*xs).backward``."""
    def step():
        fn(*xs).float().sum().backward()
        for x in xs:
            x.grad = None
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / reps / 1e3, e.count // reps)
            for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--ops", nargs="+", required=True)
    p.add_argument("--T", type=int, nargs="+", default=[8192])
    p.add_argument("--peer", choices=["fla"], default=None)
    args = p.parse_args()
    result = []
    for T in args.T:
        B = max(1, 32768 // T)
        for op in args.ops:
            impls = [("seqpar", seqpar_fn(op))]
            if args.peer == "fla":
                impls.append(("fla", fla_fn(op)))
            for impl, fn in impls:
                xs = make_inputs(op, B, T, 16, 128, "cuda")
                try:
                    rows = kernel_table(fn, xs)
                except Exception as e:  # report and go on: one failing peer must not hide the rest
                    print(f"{impl} {op} T={T}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                total = sum(r[1] for r in rows)
                print(f"\n== {impl} {op} B={B} T={T}: {total:.3f} ms of kernels per fwd+bwd", flush=True)
                for name, ms, n in rows[:14]:
                    print(f"  {ms:8.3f} ms  x{n:<3d} {name[:110]}", flush=True)
                result.append(dict(impl=impl, op=op, B=B, T=T, total_ms=total,
                                   kernels=[dict(name=n, ms=ms, calls=c) for n, ms, c in rows]))
    json.dump(dict(command=" ".join(sys.argv), gpu=torch.cuda.get_device_name(),
                   torch=torch.__version__, rows=result), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
