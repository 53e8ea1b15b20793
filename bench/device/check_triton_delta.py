"""Full-size GPU check of the delta family's Triton path against float64 references, and
its forward+backward time against the PyTorch chunk path.

Run on the device: ``python bench/device/check_triton_delta.py OUT.json``. Each case
compares outputs, final states and every gradient (tests/test_triton_delta.errors,
reference in float64 on the GPU); thresholds: bf16 inputs 2e-2, float32 1e-3 (tf32
allowed). Then times forward+backward of gated_delta_rule and delta_rule at B T = 32K
(B=4, T=8192, 16 heads, K=V=128, bf16) with backend='triton' and backend='torch'.
Exit status 0 only if every case passed.
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_triton_delta import GATES, _inputs, _leaves, errors  # noqa: E402

from seqpar import ops  # noqa: E402

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-3}


def cases(op):
    for dtype in (torch.bfloat16, torch.float32):
        for T, B, cuts in ((1, 2, ()), (63, 2, ()), (2048, 2, ()), (8192, 1, ()),
                           (8192, 1, (1, 63, 2100, 5000))):
            for strong in ((False,) if op == "delta_rule" else (False, True)):
                yield dict(B=B, T=T, H=2, K=128, V=128, cuts=cuts, strong=strong,
                           initial=True, dtype=dtype, seed=T + len(cuts) + strong)
        yield dict(B=2, T=2048, H=2, K=64, V=128, cuts=(), strong=False, initial=False,
                   dtype=dtype, seed=11)


def fwd_bwd_ms(op, backend, B=4, T=8192, H=16, K=128, V=128, reps=5):
    """Median milliseconds of one forward+backward (o.sum() backward) on CUDA."""
    xs, _ = _inputs(op, B, T, H, K, V, B, False, False, torch.bfloat16, 0)
    xs, _ = _leaves(xs, None)
    fn = getattr(ops, op)
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        o, _ = fn(*xs, backend=backend)
        torch.autograd.grad(o.float().sum(), xs)
        end.record()
        torch.cuda.synchronize()
        if i >= 2:  # the first calls compile the kernels
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(out):
    rows, ok = [], True
    for op in GATES:
        for case in cases(op):
            t0 = time.time()
            try:
                errs, err = errors(op, **case, ref_device="cuda"), None
            except Exception as e:  # record and go on: one failure must not hide the rest
                errs, err = {}, repr(e)[:300]
            tol = TOL[case["dtype"]]
            passed = err is None and all(e < tol for e in errs.values())
            ok &= passed
            rows.append(dict(op=op, **{k: (str(v) if k == "dtype" else v) for k, v in case.items()},
                             tol=tol, passed=passed, error=err, errs=errs,
                             seconds=time.time() - t0))
            worst = max(errs.values()) if errs else float("nan")
            print(f"{'PASS' if passed else 'FAIL'} {op:16s} {str(case['dtype'])[6:]:8s} "
                  f"T={case['T']:5d} cuts={len(case['cuts'])} strong={case['strong']} "
                  f"K={case['K']} worst={worst:.2e} {err or ''}", flush=True)
    timing = {}
    for op in GATES:
        for backend in ("triton", "torch"):
            try:
                timing[f"{op}/{backend}"] = fwd_bwd_ms(op, backend)
            except Exception as e:
                timing[f"{op}/{backend}"] = repr(e)[:300]
                ok = False
            print(f"fwd+bwd B=4 T=8192 H=16 K=V=128 bf16 {op} {backend}: "
                  f"{timing[f'{op}/{backend}']}", flush=True)
    Path(out).write_text(json.dumps(dict(
        command="python bench/device/check_triton_delta.py", gpu=torch.cuda.get_device_name(),
        torch=torch.__version__, triton=__import__("triton").__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), all_passed=ok,
        timing_ms=timing, cases=rows), indent=1))
    return ok


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1]) else 1)
