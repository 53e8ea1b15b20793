"""Full-size GPU check of the Triton linear-family kernels against float64 references.

Run on the device: ``python bench/device/check_triton.py OUT.json [--ops OP ...]``
(default: every op of tests/test_triton.OPS). Each case compares outputs, final states
and every gradient (tests/test_triton.errors, reference in float64 on the GPU);
thresholds: bf16 inputs 2e-2, float32 1e-3 (tf32 allowed); mLSTM adds a strong
normalizer (``strong='norm'``, where its gradients cancel). Also compiles a simple_gla call
with torch.compile(fullgraph=True) (inductor) and compares with eager.

``python bench/device/check_triton.py --compile-only`` needs no GPU: it compiles the
mLSTM kernels for sm_90 with check_triton_delta.py's helpers: fails on shared memory over
the limit, prints register spills. ``--mlstm-warps OUT.json`` times mLSTM at 4 and 8 warps.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from seqpar import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_triton_delta import check_case  # noqa: E402  (same directory)
from check_triton_delta import cases as shared_cases  # noqa: E402


def cases(op):
    yield from shared_cases(op)
    if op == "mlstm":  # |normalizer| >> 1, where bf16 rounding of intermediates shows
        yield dict(B=1, T=8192, H=2, K=128, V=128, cuts=(1, 63, 2100, 5000), strong="norm",
                   initial=True, dtype=torch.bfloat16, seed=8199)


# Argument types of the mLSTM kernels for a bf16 compile (check_triton_delta's
# _compile types every other argument *fp32: states, gates and their gradients).
_MLSTM_BF16 = {n: "*bf16" for n in ("q", "k", "v", "do", "x", "y", "a", "b", "out", "dq", "dk")}
_MLSTM_TYPES = {"offs": "*i32", "cidx": "*i32", "coff": "*i32", "scale": "fp32", "TT": "i32",
                "NH": "i32"}


def compile_sm90_mlstm():
    """Compile triton_mlstm's kernels for sm_90 (no GPU needed) with their launch
    settings, bf16 (tf32: split products) and float32 (tf32x3) inputs, K = V = 128.
    Returns rows and whether all fit in shared memory. Register spills are printed, not
    failed: triton_diag's kernels, at simple_gla's measured speed, spill as much (its
    bf16 _dqk_kernel: 3072 bytes)."""
    import triton
    from check_triton_delta import SM90_SHARED, _compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    from seqpar.ops.linear import triton_mlstm as tm
    from seqpar.ops.linear.triton_common import BK, BT, BV, BV_STATE

    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    tiles = dict(H=16, K=128, V=128, BT=BT, BK=BK)
    kernels = [
        (tm._state_kernel, dict(BV=BV_STATE, HAS_S0=True)),
        (tm._state_bwd_kernel, dict(BV=BV_STATE, HAS_S0=True, HAS_DT=True)),
        (tm._pair_kernel, dict(BV=BV, BACKWARD=False, rm=None)),
        (tm._pair_kernel, dict(BV=BV, BACKWARD=True, hn=None, out32=None, u=None)),
        (tm._dqk_kernel, dict(BV=BV)),
    ]
    rows, ok = [], True
    for prec in ("tf32", "tf32x3"):
        types = {**_MLSTM_TYPES, **(_MLSTM_BF16 if prec == "tf32" else {})}

        def source(fn, signature, constexprs):
            index = {n: i for i, n in enumerate(fn.arg_names)}
            fixed = {n: t for n, t in types.items() if n in index and signature[n] != "constexpr"}
            return ASTSource(fn=fn, signature={**signature, **fixed}, constexprs=constexprs)

        for fn, consts in kernels:
            row = _compile(fn, {**tiles, **consts, "PREC": prec}, dict(num_warps=tm.NUM_WARPS),
                           ptxas, GPUTarget, source, 128, prec)
            row["kernel"] += "/bwd" if consts.get("BACKWARD") else ""
            rows.append(row)
    for r in rows:
        fits = r["shared"] <= SM90_SHARED
        ok &= fits
        print(f"{'OK  ' if fits else 'FAIL'} {r['kernel']:18s} {r['prec']:6s} shared={r['shared']} "
              f"{r['ptxas']}", flush=True)
    return rows, ok


def mlstm_warps(out):
    """Forward+backward time of mlstm (bf16, B=1, T=32K, 16 heads of 128) with
    triton_mlstm's kernels at 4 warps (they spill registers on sm_90) and at 8 (they do
    not; checked at full size too), simple_gla for scale. Writes ``out`` (JSON)."""
    import test_triton as t
    from check_triton_delta import fwd_bwd_ms

    from seqpar.ops.linear import triton_mlstm as tm

    res = {"simple_gla": fwd_bwd_ms(t, "simple_gla", "triton", B=1, T=32768)}
    print(f"fwd+bwd B=1 T=32768 H=16 bf16 simple_gla: {res['simple_gla']:.3f} ms", flush=True)
    case = dict(B=1, T=8192, H=2, K=128, V=128, cuts=(1, 63, 2100, 5000), strong="norm",
                initial=True, dtype=torch.bfloat16, seed=8199)
    for warps in (4, 8):
        tm.NUM_WARPS = warps
        try:
            res[f"mlstm/warps={warps}"] = fwd_bwd_ms(t, "mlstm", "triton", B=1, T=32768)
            if warps == 8:
                res["mlstm/warps=8/errors"] = t.errors("mlstm", **case, ref_device="cuda")
        except Exception as e:  # record and go on
            res[f"mlstm/warps={warps}"] = repr(e)[:300]
        print(f"mlstm warps={warps}: {res[f'mlstm/warps={warps}']} ms "
              f"{res.get(f'mlstm/warps={warps}/errors', '')}", flush=True)
    tm.NUM_WARPS = 4
    Path(out).write_text(json.dumps(dict(gpu=torch.cuda.get_device_name(), results=res), indent=1))


def compile_check():
    from conftest import rel_err
    from test_triton import _inputs, _leaves

    torch._dynamo.reset()
    xs, state = _inputs("simple_gla", 2, 1000, 4, 128, 128, 2, False, True, torch.bfloat16, 5)
    xs, state = _leaves(xs, state)

    def f(q, k, v, g, s):
        o, S = ops.simple_gla(q, k, v, g, initial_state=s, output_final_state=True)
        return (o.float() ** 2).sum() + S.sum()

    eager = torch.autograd.grad(f(*xs, state), xs + [state])
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*xs, state), xs + [state])
    return max(rel_err(a, b) for a, b in zip(got, eager))


def main(out, op_names, strong=None, dtype=None):
    # imported here: importing tests/test_triton without CUDA switches Triton to its
    # interpreter, which --compile-only must not
    from test_triton import OPS, errors

    rows, ok = [], True
    for op in op_names or OPS:
        for case in cases(op):
            if strong is not None and str(case["strong"]) != strong:
                continue
            if dtype is not None and case["dtype"] != getattr(torch, dtype):
                continue
            rows.append(check_case(errors, op, case))
            ok &= rows[-1]["passed"]
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="JSON results path (not with --compile-only)")
    p.add_argument("--ops", nargs="+", help="ops to check (default: all)")
    p.add_argument("--strong", choices=["False", "True", "norm"],
                   help="only the cases with this input kind (e.g. norm: mLSTM's strong normalizer)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], help="only the cases of this dtype")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--mlstm-warps", action="store_true",
                   help="only time mlstm at 4 and 8 warps (see mlstm_warps), OUT.json")
    a = p.parse_args()
    if a.compile_only:
        sys.exit(0 if compile_sm90_mlstm()[1] else 1)
    if a.out is None:
        p.error("OUT.json is required")
    if a.mlstm_warps:
        sys.exit(mlstm_warps(a.out))
    sys.exit(0 if main(a.out, a.ops, a.strong, a.dtype) else 1)
