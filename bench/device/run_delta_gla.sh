#!/bin/bash
# Device run after the delta rules went to 16-bit operands and intermediates
# (seqpar/ops/linear/triton_delta.py) and GLA's backward stopped recomputing the states:
# the benchmark against SDPA, kernel tables of seqpar's delta rules and FLA's DeltaNet,
# the delta rules' sequential passes at 4 and 8 warps, GLA's stage times and full-size
# check, then the delta rules' full-size check against float64 (one PASS/FAIL line per
# case; the checks are cut by their time limits).
# Carry .whl and .triton_cache (FLA's autotune results from fla_warm.sh).
# Usage on the device (repo root): bash bench/device/run_delta_gla.sh; everything comes
# back as $OUT/results.tgz (the device returns at most 8 files).
FINAL=$OUT OUT=/tmp/res && mkdir -p $OUT
trap 'tar czf $FINAL/results.tgz -C $OUT .' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
[ -d .triton_cache ] && export TRITON_CACHE_DIR=$PWD/.triton_cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout 60 python3 -m seqpar.bench.ops --T 8192 32768 --ops delta_rule gated_delta_rule gla \
    --peers sdpa --out $OUT/ops_delta3 2>&1 | tee $OUT/ops_delta3.log
timeout 60 python3 bench/device/profile_ops.py $OUT/profile_delta3.json --ops gated_delta_rule delta_rule \
    --T 32768 8192 2>&1 | tee $OUT/profile_delta3.log
timeout 60 python3 bench/device/profile_ops.py $OUT/profile_fla_delta.json --ops delta_rule --T 8192 \
    --peer fla 2>&1 | tee $OUT/profile_fla_delta.log
timeout 60 python3 - <<'PY' 2>&1 | tee $OUT/delta_warps.log
from triton.testing import do_bench
from seqpar.bench.ops import make_inputs, seqpar_fn
from seqpar.ops.linear import triton_delta as td
import torch
for T in (8192, 32768):
    for warps in (4, 8):
        td.STATE_WARPS = warps
        for op in ("delta_rule", "gated_delta_rule"):
            xs = make_inputs(op, 32768 // T, T, 16, 128, torch.device("cuda"))
            fn = seqpar_fn(op)
            def step():
                fn(*xs).float().sum().backward()
            print(f"T={T} {op} state passes at {warps} warps: fwd+bwd "
                  f"{do_bench(step, return_mode='median'):.3f} ms", flush=True)
PY
timeout 130 python3 bench/device/check_triton_gla.py $OUT/gla_check3.json 2>&1 | tee $OUT/gla_check3.log
timeout 150 python3 bench/device/check_triton_delta.py $OUT/delta3_check.json 2>&1 \
    | tee $OUT/delta3_check.log
