"""Compile the linear family's Triton kernels for sm_90 (H100 / H200) on a machine without a
GPU, and check what Triton's CPU interpreter cannot show: shared memory over the hardware
limit, and register spills in the 16-bit configurations.

``python tests/sm90.py {mlstm,gla,delta}`` compiles one kernel file's kernels with their
launch settings, prints one line per kernel (shared bytes, ptxas registers and spills) and
exits 1 if any fails its limits. It must run with ``TRITON_INTERPRET=0`` (the kernels are
then real ``JITFunction`` objects that ``triton.compile`` accepts), so the tests start it
as a subprocess (``conftest.assert_sm90_compiles``); it is a helper, not a test module.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SM90_SHARED = 232448  # bytes of shared memory one block may use on H100 / H200

# Spill allowance in the bf16 configuration, in bytes of spill stores. Where the setting
# chosen by timing on an H100 spills into L1, the allowance says so: the delta rules'
# sequential state passes and WY backward at 4 warps. PRINT_ONLY kernels are reported, not
# judged (the shared bf16 dqk_kernel spills at its chosen setting).
NO_SPILLS, WY_BWD_SPILLS, STATE_SPILLS, PRINT_ONLY = 0, 256, 1024, None


def _ptxas():
    """The ptxas Triton itself runs for sm_90: its bundled ``ptxas`` up to 3.8, its newer
    ``ptxas-blackwell`` from 3.9 (whose PTX the older one rejects)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return Path(get_ptxas(90).path)


def compile_kernel(fn, constexprs, opts, make_source, K, prec):
    """Compile one kernel for sm_90 and run ptxas on it. ``make_source(fn, signature,
    constexprs)`` returns the ``ASTSource`` (it may retype arguments); the default
    signature types plan pointers int32, ``scale`` float32 and every other pointer
    float32. Returns a row: kernel, K, prec, launch, shared bytes, ptxas register/spill
    line."""
    import triton
    from triton.backends.compiler import GPUTarget

    index = {n: i for i, n in enumerate(fn.arg_names)}
    sig = {n: ("constexpr" if n in constexprs else "i32" if n in ("NT", "TT") else
               "*i32" if n in ("coff", "offs", "cidx") else "fp32" if n == "scale" else "*fp32")
           for n in fn.arg_names}
    src = make_source(fn, sig, {(index[n],): v for n, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.TemporaryDirectory() as d:
        ptx = Path(d) / "k.ptx"
        ptx.write_text(kernel.asm["ptx"])
        err = subprocess.run([str(_ptxas()), "-v", "--gpu-name=sm_90a", str(ptx), "-o", os.devnull],
                             capture_output=True, text=True).stderr
    info = "; ".join(line.split(" info    : ")[-1].strip() for line in err.splitlines()
                     if "registers" in line or "spill" in line)
    launch = f"{opts.get('num_warps', 4)}w{opts.get('num_stages', 3)}s"
    return dict(kernel=fn.__name__, K=K, prec=prec, launch=launch, shared=kernel.metadata.shared,
                ptxas=info)


def spill_bytes(ptxas_line: str) -> int:
    return int(ptxas_line.split(" bytes spill stores")[0].rsplit(" ", 1)[-1])


def _report(rows, fits) -> bool:
    ok = True
    for r in rows:
        good = fits(r)
        ok &= good
        print(f"{'OK  ' if good else 'FAIL'} {r['kernel']:24s} K={r['K']:3d} {r['prec']:6s} "
              f"{r['launch']} shared={r['shared']} {r['ptxas']}", flush=True)
    return ok


# ---- the delta rules (triton_delta.py, with triton_diag's output and dq/dk kernels) ----

# Arguments stored in 16 bits in a bf16 compile: the inputs, their gradients and the
# intermediates N's copy an, W, U, the per-chunk states h and their gradients dsl, v', dv',
# its state-free part dvl, dW and dk's first part. A and the gate terms stay float32.
_DELTA_BF16 = ("q", "k", "v", "beta", "do", "dq", "dk", "dv", "dbeta", "an", "w", "u", "h", "vn",
               "dsl", "dvn", "dvl", "dw", "dk_part")
_DIAG_BF16 = ("a", "b", "y", "h", "out", "q", "k", "v", "do", "dh", "dq", "dk", "dvn", "dw")


def _split_meta(meta):
    """A launch dict that holds tiles too -> (tile constexprs, launch options)."""
    tiles = {n: v for n, v in meta.items() if n in ("BK", "BV")}
    return tiles, {n: v for n, v in meta.items() if n not in ("BK", "BV")}


def _delta_kernels(td, K, dtype):
    """(kernel, constexprs, launch options, 16-bit arguments, spill allowance) of every
    kernel of the delta path at head dim K and V = 128 for inputs of ``dtype``."""
    from seqpar.ops.linear.triton_common import BK, BV, dqk_kernel, pair_kernel

    bk, bs = td._k_tile(K), td.BV_STATE
    chunk = dict(H=16, K=K, V=128, BT=td.BT, USE_G=True)
    state = {**chunk, "BK": bk, "BV": bs}
    # both pipeline depths of the sequential passes (they differ for 16-bit inputs only)
    metas = {str(m): m for m in (td._state_meta(dtype, idle) for idle in (False, True))}.values()
    state_opts = [dict(num_warps=m["num_warps"], num_stages=m["num_stages"]) for m in metas]
    opts = dict(num_warps=td.NUM_WARPS)
    diag = {**chunk, "BK": BK, "BV": BV}
    a_kernel = {n: chunk[n] for n in ("H", "K", "BT", "USE_G")}
    dv_tiles, dv_launch = _split_meta(td.DV_LOCAL_META)
    wy_tiles, wy_launch = _split_meta(td.WY_BWD_META)
    return [
        (td._wy_a_kernel, {**a_kernel, "BK": bk}, opts, _DELTA_BF16, NO_SPILLS),
        (td._wy_wu_kernel, {**chunk, "BD": bs, "STORE_N": True}, opts, _DELTA_BF16, NO_SPILLS),
        *[(td._fwd_kernel, {**state, "HAS_H0": True}, o, _DELTA_BF16, STATE_SPILLS)
          for o in state_opts],
        (td._dv_local_kernel, {**chunk, **dv_tiles}, dv_launch, _DELTA_BF16, NO_SPILLS),
        *[(td._bwd_kernel, {**state, "HAS_DHT": True}, o, _DELTA_BF16, STATE_SPILLS)
          for o in state_opts],
        (td._wy_bwd_kernel, {**chunk, **wy_tiles}, wy_launch, _DELTA_BF16, WY_BWD_SPILLS),
        (pair_kernel, {**diag, "BACKWARD": False}, opts, _DIAG_BF16, PRINT_ONLY),
        (dqk_kernel, {**diag, "DW": True}, td._dqk_meta(dtype, True), _DIAG_BF16, PRINT_ONLY),
    ]


def check_delta() -> bool:
    """bf16 inputs (PREC 'tf32') at K = 64 and 128, float32 inputs ('tf32x3', the larger
    shared-memory footprint) at K = 128; V = 128. Fails on shared memory over the limit or
    bf16 spills over the kernel's allowance."""
    from triton.compiler.compiler import ASTSource

    from seqpar.ops.linear import triton_delta as td

    rows = []
    for K, prec in ((64, "tf32"), (128, "tf32"), (128, "tf32x3")):
        dtype = torch.bfloat16 if prec == "tf32" else torch.float32
        for fn, consts, opts, bf16, max_spill in _delta_kernels(td, K, dtype):
            def source(fn, signature, constexprs, bf16=bf16, prec=prec):
                if prec == "tf32":
                    signature = {**signature,
                                 **{n: "*bf16" for n in bf16 if signature.get(n) == "*fp32"}}
                return ASTSource(fn=fn, signature=signature, constexprs=constexprs)

            row = compile_kernel(fn, {**consts, "PREC": prec}, dict(opts), source, K, prec)
            row["max_spill"] = max_spill if prec == "tf32" else PRINT_ONLY
            rows.append(row)
    rows.append(compile_kernel(td._inverse_kernel, dict(BT=td.BT, PREC="tf32x3"),
                               dict(td.INVERSE_META), ASTSource, td.BT, "tf32x3"))
    rows[-1]["max_spill"] = NO_SPILLS
    return _report(rows, lambda r: r["shared"] <= SM90_SHARED and (
        r["max_spill"] is None or spill_bytes(r["ptxas"]) <= r["max_spill"]))


# ---- GLA (triton_gla.py) ----

def _gla_source(dtype):
    """``ASTSource`` with triton_gla's argument types: float32 gates, initial and final
    states, gate gradients and the diagonal-block shares of dq and dk; inputs, their
    gradients, per-chunk states, A and dA in ``dtype``."""
    from triton.compiler.compiler import ASTSource

    f32 = ("g", "gc", "dg", "dq_d", "dk_d", "h0", "ht", "dht", "dh0")

    def source(fn, signature, constexprs):
        sig = {n: t if t == "constexpr" or n in ("offs", "cidx", "coff", "scale")
               or n in f32 else f"*{dtype}" for n, t in signature.items()}
        return ASTSource(fn=fn, signature=sig, constexprs=constexprs)

    return source


def check_gla() -> bool:
    """Every kernel configuration at K = 64 and 128 (bf16) and 128 (float32), V = 128.
    Fails on shared memory over the limit, or on bf16 spills in a kernel at its shipped
    tiles; the alternative 32-wide key tiles and _dqk_kernel's 64-wide one (it spills and
    is still the faster, ``BK_DQK``) are printed, not judged."""
    from seqpar.ops.linear import triton_gla as tg

    rows = []
    state, chunk = dict(num_warps=tg.NUM_WARPS), tg.CHUNK_LAUNCH
    # K sets loop trip counts (unrolling), not tiles: the float32 configuration (shared
    # memory only) at the largest K
    for K, prec, dtype in ((64, "tf32", "bf16"), (128, "tf32", "bf16"), (128, "tf32x3", "fp32")):
        dims = dict(H=16, K=K, BT=tg.BT, BK=tg.BK)
        tiles = dict(dims, V=128, BV=tg.BV, PREC=prec)
        scan = dict(dims, V=128, BV=tg.BV_STATE, PREC=prec)
        configs = [
            (tg._cumsum_kernel, dims, state),
            (tg._state_kernel, dict(scan, HAS_H0=True), state),
            (tg._state_bwd_kernel, dict(scan, HAS_DHT=True, HAS_H0=True), state),
            (tg._intra_kernel, dict(dims, BC=tg.BC, PREC=prec), chunk),
            (tg._diag_kernel, dict(dims, BC=tg.BC), dict(num_warps=tg.DIAG_WARPS)),
            *[(tg._out_kernel, dict(tiles, BACKWARD=bwd), chunk) for bwd in (False, True)],
            (tg._dA_kernel, dict(H=16, V=128, BT=tg.BT, BV=tg.BV, PREC=prec), chunk),
            (tg._dqk_diag_kernel, dict(dims, BC=tg.BC), dict(num_warps=tg.DIAG_WARPS)),
            (tg._dqk_kernel, dict(tiles, BK=tg.BK_DQK, BC=tg.BC), chunk),
        ]
        alternatives = [(tg._state_kernel, dict(scan, BK=32, HAS_H0=True), state),
                        (tg._state_bwd_kernel, dict(scan, BK=32, HAS_DHT=True, HAS_H0=True), state),
                        (tg._dqk_kernel, dict(tiles, BK=32, BC=tg.BC), chunk)]
        for i, (fn, constexprs, opts) in enumerate(configs + alternatives):
            row = compile_kernel(fn, constexprs, opts, _gla_source(dtype), K, prec)
            row["kernel"] += "".join(f" {f}" for f, v in constexprs.items() if v is True)
            if fn in (tg._state_kernel, tg._state_bwd_kernel, tg._dqk_kernel):
                row["kernel"] += f" BK={constexprs['BK']}"
            row["strict"] = i < len(configs) and fn is not tg._dqk_kernel
            rows.append(row)
    return _report(rows, lambda r: r["shared"] <= SM90_SHARED and (
        r["prec"] != "tf32" or not r["strict"] or " 0 bytes spill stores" in r["ptxas"]))


# ---- mLSTM (triton_mlstm.py) ----

# Argument types of the mLSTM kernels in a bf16 compile (compile_kernel types every other
# pointer *fp32: states, gates and their gradients).
_MLSTM_BF16 = {n: "*bf16" for n in ("q", "k", "v", "do", "x", "y", "a", "b", "out", "dq", "dk")}
_MLSTM_TYPES = {"offs": "*i32", "cidx": "*i32", "coff": "*i32", "scale": "fp32", "TT": "i32",
                "NH": "i32"}


def check_mlstm() -> bool:
    """triton_mlstm's kernels, bf16 (tf32: split products) and float32 (tf32x3) inputs,
    K = V = 128, with their launch settings. Fails on shared memory over the limit (its
    float32 _dqk_kernel at 3 stages is close to it); spills are printed, not judged, as
    for triton_diag's kernels."""
    from triton.compiler.compiler import ASTSource

    from seqpar.ops.linear import triton_mlstm as tm
    from seqpar.ops.linear.triton_common import BK, BT, BV, BV_STATE

    tiles = dict(H=16, K=128, V=128, BT=BT, BK=BK)
    kernels = [
        (tm._state_kernel, dict(BV=BV_STATE, HAS_S0=True)),
        (tm._state_bwd_kernel, dict(BV=BV_STATE, HAS_S0=True, HAS_DT=True)),
        (tm._pair_kernel, dict(BV=BV, BACKWARD=False, rm=None)),
        (tm._pair_kernel, dict(BV=BV, BACKWARD=True, hn=None, out32=None, u=None)),
        (tm._dqk_kernel, dict(BV=BV)),
    ]
    rows = []
    for prec in ("tf32", "tf32x3"):
        types = {**_MLSTM_TYPES, **(_MLSTM_BF16 if prec == "tf32" else {})}

        def source(fn, signature, constexprs, types=types):
            index = {n: i for i, n in enumerate(fn.arg_names)}
            fixed = {n: t for n, t in types.items() if n in index and signature[n] != "constexpr"}
            return ASTSource(fn=fn, signature={**signature, **fixed}, constexprs=constexprs)

        dtype = torch.bfloat16 if prec == "tf32" else torch.float32
        for fn, consts in kernels:
            opts = tm._dqk_meta(dtype) if fn is tm._dqk_kernel else dict(num_warps=tm.NUM_WARPS)
            row = compile_kernel(fn, {**tiles, **consts, "PREC": prec}, opts, source, 128, prec)
            row["kernel"] += "/bwd" if consts.get("BACKWARD") else ""
            rows.append(row)
    return _report(rows, lambda r: r["shared"] <= SM90_SHARED)


CHECKS = {"mlstm": check_mlstm, "gla": check_gla, "delta": check_delta}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CHECKS:
        sys.exit(f"usage: python tests/sm90.py {{{','.join(CHECKS)}}}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("tests/sm90.py: needs TRITON_INTERPRET=0 (the interpreter cannot compile)")
    sys.exit(0 if CHECKS[sys.argv[1]]() else 1)
