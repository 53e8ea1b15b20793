"""Full-size GPU check of the Triton linear-family kernels against float64 references.

Run on the device: ``python bench/device/check_triton.py OUT.json``. Each case compares
outputs, final states and every gradient (tests/test_triton.errors, reference in float64
on the GPU); thresholds: bf16 inputs 2e-2, float32 1e-3 (tf32 allowed). Also compiles a
simple_gla call with torch.compile(fullgraph=True) (inductor) and compares with eager.
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_triton import OPS, _inputs, _leaves, errors  # noqa: E402
from conftest import rel_err  # noqa: E402

from seqpar import ops  # noqa: E402

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-3}


def cases(op):
    for dtype in (torch.bfloat16, torch.float32):
        for T, B, cuts in ((1, 2, ()), (63, 2, ()), (2048, 2, ()), (8192, 1, ()),
                           (8192, 1, (1, 63, 2100, 5000))):
            for strong in ((False,) if op == "linear_attn" else (False, True)):
                yield dict(B=B, T=T, H=2, K=128, V=128, cuts=cuts, strong=strong,
                           initial=True, dtype=dtype, seed=T + len(cuts) + strong)
        yield dict(B=2, T=2048, H=2, K=64, V=128, cuts=(), strong=False, initial=False,
                   dtype=dtype, seed=11)


def compile_check():
    torch._dynamo.reset()
    xs, state = _inputs("simple_gla", 2, 1000, 4, 128, 128, 2, False, True, torch.bfloat16, 5)
    xs, state = _leaves(xs, state)

    def f(q, k, v, g, s):
        o, S = ops.simple_gla(q, k, v, g, initial_state=s, output_final_state=True)
        return (o.float() ** 2).sum() + S.sum()

    eager = torch.autograd.grad(f(*xs, state), xs + [state])
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*xs, state), xs + [state])
    return max(rel_err(a, b) for a, b in zip(got, eager))


def main(out):
    rows, ok = [], True
    for op in OPS:
        for case in cases(op):
            t0 = time.time()
            try:
                errs = errors(op, **case, ref_device="cuda")
                err = None
            except Exception as e:  # record and go on: one failure must not hide the rest
                errs, err = {}, repr(e)[:300]
            tol = TOL[case["dtype"]]
            passed = err is None and all(e < tol for e in errs.values())
            ok &= passed
            row = dict(op=op, **{k: (str(v) if k == "dtype" else v) for k, v in case.items()},
                       tol=tol, passed=passed, error=err, errs=errs, seconds=time.time() - t0)
            rows.append(row)
            worst = max(errs.values()) if errs else float("nan")
            print(f"{'PASS' if passed else 'FAIL'} {op:11s} {str(case['dtype'])[6:]:8s} T={case['T']:5d} "
                  f"cuts={len(case['cuts'])} strong={case['strong']} K={case['K']} worst={worst:.2e} "
                  f"{err or ''}", flush=True)
    try:
        cerr = compile_check()
        print(f"compile fullgraph (inductor) vs eager grads: {cerr:.2e}", flush=True)
    except Exception as e:
        cerr = repr(e)[:500]
        print("compile check failed:", cerr, flush=True)
        ok = False
    Path(out).write_text(json.dumps(dict(
        command="python bench/device/check_triton.py", gpu=torch.cuda.get_device_name(),
        torch=torch.__version__, triton=__import__("triton").__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), all_passed=ok,
        compile_check=cerr, cases=rows), indent=1))
    return ok


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1]) else 1)
