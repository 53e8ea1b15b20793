"""Full-size GPU check of the delta family's Triton path against float64 references, and
its forward+backward time against the PyTorch chunk path.

Run on the device: ``python bench/device/check_triton_delta.py OUT.json [OP ...]``
(default: both delta rules). Each case compares outputs, final states and every gradient
(tests/test_triton_delta.errors, reference in float64 on the GPU); thresholds: bf16
inputs 2e-2, float32 1e-3 (tf32 allowed). Then times forward+backward of
gated_delta_rule and delta_rule at B T = 32K (B=4, T=8192, 16 heads, K=V=128, bf16) with
backend='triton' and backend='torch', first, so that a run cut short still has it. Exit
status 0 only if every case passed.

``python bench/device/check_triton_delta.py --compile-only`` needs no GPU: it compiles
the kernels for sm_90 (H100/H200) with their launch settings and fails if one needs more
shared memory than the hardware has or spills registers in the bf16 configuration, the
failures Triton's CPU interpreter cannot show (tests/test_triton_delta.py runs it; the
GPU run leaves it out, as it needs no GPU and takes minutes of compiling).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from seqpar import ops

SM90_SHARED = 232448  # bytes of shared memory one block may use on H100 / H200

TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-3}


# Argument types for a bf16 compile: the inputs, their gradients and the stored
# intermediates N's copy an, W, U, the per-chunk states h, their gradients dsl, v', dv', its
# state-free part dvl, dW and dk's first part are bf16; A and the gate terms are float32.
_BF16 = ("q", "k", "v", "beta", "do", "dq", "dk", "dv", "dbeta", "an", "w", "u", "h", "vn",
         "dsl", "dvn", "dvl", "dw", "dk_part")
_BF16_DIAG = ("a", "b", "y", "h", "out", "q", "k", "v", "do", "dh", "dq", "dk", "dvn", "dw")


# Bytes of register spill stores allowed in the bf16 configuration, where a setting that
# spills into L1 was timed faster on an H100 than one that does not: the sequential state
# passes at 4 warps (4-692 bytes; 0-88 at 8 warps) and the WY backward at 4 warps (48-124
# bytes; none at 8; bench/results/tune_delta_h100.log). The diagonal family's kernels are
# printed only (check_triton.py: its own bf16 _dqk_kernel spills).
NO_SPILLS, WY_BWD_SPILLS, STATE_SPILLS, PRINT_ONLY = 0, 256, 1024, None


def _kernels(td, K, dtype):
    """(kernel, constexprs, launch options, bf16 arguments, allowed spill bytes) of every
    kernel of the delta path at head dim K and V = 128 for inputs of ``dtype``; PREC is
    added by the caller."""
    from seqpar.ops.linear import triton_diag as tdg
    from seqpar.ops.linear.triton_common import BK, BV

    bk, bs = td._k_tile(K), td.BV_STATE
    chunk = dict(H=16, K=K, V=128, BT=td.BT, USE_G=True)
    state = {**chunk, "BK": bk, "BV": bs}
    # both pipeline depths of the sequential passes (they differ for 16-bit inputs only)
    metas = {str(m): m for m in (td._state_meta(dtype, idle) for idle in (False, True))}.values()
    state_opts = [dict(num_warps=m["num_warps"], num_stages=m["num_stages"]) for m in metas]
    opts = dict(num_warps=td.NUM_WARPS)
    diag = {**chunk, "BK": BK, "BV": BV}
    a_kernel = {n: chunk[n] for n in ("H", "K", "BT", "USE_G")}
    return [
        (td._wy_a_kernel, {**a_kernel, "BK": bk}, opts, _BF16, NO_SPILLS),
        (td._wy_wu_kernel, {**chunk, "BD": bs, "STORE_N": True}, opts, _BF16, NO_SPILLS),
        *[(td._fwd_kernel, {**state, "HAS_H0": True}, o, _BF16, STATE_SPILLS)
          for o in state_opts],
        (td._dv_local_kernel, {**chunk, **_tiles(td.DV_LOCAL_META)}, _launch(td.DV_LOCAL_META),
         _BF16, NO_SPILLS),
        *[(td._bwd_kernel, {**state, "HAS_DHT": True}, o, _BF16, STATE_SPILLS)
          for o in state_opts],
        (td._wy_bwd_kernel, {**chunk, **_tiles(td.WY_BWD_META)}, _launch(td.WY_BWD_META),
         _BF16, WY_BWD_SPILLS),
        (tdg._pair_kernel, {**diag, "BACKWARD": False}, opts, _BF16_DIAG, PRINT_ONLY),
        (tdg._dqk_kernel, {**diag, "DW": True}, td._dqk_meta(dtype, True),
         _BF16_DIAG, PRINT_ONLY),
    ]


def _tiles(meta):
    return {n: v for n, v in meta.items() if n in ("BK", "BV")}


def _launch(meta):
    return {n: v for n, v in meta.items() if n not in ("BK", "BV")}


def _spill_bytes(ptxas_line: str) -> int:
    return int(ptxas_line.split(" bytes spill stores")[0].rsplit(" ", 1)[-1])


def compile_sm90():
    """Compile every kernel of the delta path for sm_90 on this machine (no GPU needed)
    with its launch settings: bf16 inputs (PREC 'tf32') at K = 64 and 128, float32 inputs
    ('tf32x3', the larger shared-memory footprint) at K = 128; V = 128. Returns rows
    (kernel, K, precision, shared bytes, ptxas register / spill line) and whether all fit:
    shared memory under the limit, bf16 spills within :func:`_kernels`' allowance."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    from seqpar.ops.linear import triton_delta as td

    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    rows, ok = [], True
    for K, prec in ((64, "tf32"), (128, "tf32"), (128, "tf32x3")):
        dtype = torch.bfloat16 if prec == "tf32" else torch.float32
        for fn, consts, opts, bf16, max_spill in _kernels(td, K, dtype):
            def source(fn, signature, constexprs, bf16=bf16):
                if prec == "tf32":
                    signature = {**signature, **{n: "*bf16" for n in bf16 if signature.get(n) == "*fp32"}}
                return ASTSource(fn=fn, signature=signature, constexprs=constexprs)

            row = _compile(fn, {**consts, "PREC": prec}, dict(opts), ptxas, GPUTarget, source, K, prec)
            row["max_spill"] = max_spill if prec == "tf32" else PRINT_ONLY
            rows.append(row)
    rows.append(_compile(td._inverse_kernel, dict(BT=td.BT, PREC="tf32x3"),
                         dict(td.INVERSE_META), ptxas, GPUTarget, ASTSource, td.BT, "tf32x3"))
    rows[-1]["max_spill"] = NO_SPILLS
    for r in rows:
        fits = r["shared"] <= SM90_SHARED and (r["max_spill"] is None
                                               or _spill_bytes(r["ptxas"]) <= r["max_spill"])
        ok &= fits
        print(f"{'OK  ' if fits else 'FAIL'} {r['kernel']:17s} K={r['K']:3d} {r['prec']:6s} {r['launch']} "
              f"shared={r['shared']} {r['ptxas']}", flush=True)
    return rows, ok


def _compile(fn, constexprs, opts, ptxas, GPUTarget, ASTSource, K, prec):
    import triton

    index = {n: i for i, n in enumerate(fn.arg_names)}
    sig = {n: ("constexpr" if n in constexprs else "i32" if n in ("NT", "TT") else
               "*i32" if n in ("coff", "offs", "cidx") else "fp32" if n == "scale" else "*fp32")
           for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(index[n],): v for n, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        err = subprocess.run([str(ptxas), "-v", "--gpu-name=sm_90a", str(ptx), "-o", os.devnull],
                             capture_output=True, text=True).stderr
    info = "; ".join(line.split("ptxas info    : ")[-1].strip() for line in err.splitlines()
                     if "registers" in line or "spill" in line)
    launch = f"{opts.get('num_warps', 4)}w{opts.get('num_stages', 3)}s"
    return dict(kernel=fn.__name__, K=K, prec=prec, launch=launch, shared=kernel.metadata.shared,
                ptxas=info)


def cases(op):
    """The full-size cases of every GPU check: T 1, 63, 2048, 8192 and a packed 8192
    (a one-token document), K = V = 128 and K = 64 != V, bf16 and float32, mild and
    (for gated ops) strong decays."""
    for dtype in (torch.bfloat16, torch.float32):
        for T, B, cuts in ((1, 2, ()), (63, 2, ()), (2048, 2, ()), (8192, 1, ()),
                           (8192, 1, (1, 63, 2100, 5000))):
            for strong in ((False,) if op in ("linear_attn", "delta_rule") else (False, True)):
                yield dict(B=B, T=T, H=2, K=128, V=128, cuts=cuts, strong=strong,
                           initial=True, dtype=dtype, seed=T + len(cuts) + strong)
        yield dict(B=2, T=2048, H=2, K=64, V=128, cuts=(), strong=False, initial=False,
                   dtype=dtype, seed=11)


def check_case(errors, op, case) -> dict:
    """One full-size case: the errors against float64 on the GPU (``errors`` is a test
    module's ``errors``), printed as one PASS/FAIL line; returns the case's row, with
    ``passed``. An exception is recorded, not raised: one failure must not hide the
    rest."""
    t0 = time.time()
    try:
        errs, err = errors(op, **case, ref_device="cuda"), None
    except Exception as e:
        errs, err = {}, repr(e)[:300]
    tol = TOL[case["dtype"]]
    passed = err is None and all(e < tol for e in errs.values())
    worst = max(errs.values()) if errs else float("nan")
    print(f"{'PASS' if passed else 'FAIL'} {op:16s} {str(case['dtype'])[6:]:8s} "
          f"T={case['T']:5d} cuts={len(case['cuts'])} strong={case['strong']} "
          f"K={case['K']} worst={worst:.2e} {err or ''}", flush=True)
    return dict(op=op, **{k: (str(v) if k == "dtype" else v) for k, v in case.items()},
                tol=tol, passed=passed, error=err, errs=errs, seconds=time.time() - t0)


def fwd_bwd_ms(t, op, backend, B=4, T=8192, H=16, K=128, V=128, reps=5):
    """Median milliseconds of one forward+backward (o.sum() backward) on CUDA; t is
    :func:`_tests`."""
    from test_triton import _leaves  # the leaf builder every Triton test module shares

    xs, _ = t._inputs(op, B, T, H, K, V, B, False, False, torch.bfloat16, 0)
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


def _tests():
    """tests/test_triton_delta, imported only for the GPU checks: importing it on a
    machine without CUDA switches Triton to its interpreter."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import test_triton_delta

    return test_triton_delta


def main(out, op_names=None):
    t = _tests()
    op_names = op_names or list(t.GATES)
    timing, ok = {}, True
    for op in op_names:  # timing first: a run cut short by its time limit still has it
        for backend in ("triton", "torch"):
            try:
                timing[f"{op}/{backend}"] = fwd_bwd_ms(t, op, backend)
            except Exception as e:
                timing[f"{op}/{backend}"] = repr(e)[:300]
                ok = False
            print(f"fwd+bwd B=4 T=8192 H=16 K=V=128 bf16 {op} {backend}: "
                  f"{timing[f'{op}/{backend}']}", flush=True)
    rows = []
    for op in op_names:
        for case in cases(op):
            rows.append(check_case(t.errors, op, case))
            ok &= rows[-1]["passed"]
    Path(out).write_text(json.dumps(dict(
        command="python bench/device/check_triton_delta.py", gpu=torch.cuda.get_device_name(),
        torch=torch.__version__, triton=__import__("triton").__version__,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), all_passed=ok,
        timing_ms=timing, cases=rows), indent=1))
    return ok


if __name__ == "__main__":
    if sys.argv[1] == "--compile-only":
        sys.exit(0 if compile_sm90()[1] else 1)
    # ops after the output path: a CUDA fault poisons the rest of its process, so the
    # device scripts check one op per process
    sys.exit(0 if main(sys.argv[1], sys.argv[2:]) else 1)
