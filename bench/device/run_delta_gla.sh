#!/bin/bash
# Device run after the delta rules went to 16-bit operands and intermediates
# (seqpar/ops/linear/triton_delta.py) and GLA's backward stopped recomputing the states:
# the benchmark against SDPA, kernel tables of seqpar's delta rules and FLA's DeltaNet,
# GLA's stage times and full-size check, then the delta rules' full-size check against
# float64 (one PASS/FAIL line per case; the checks are cut by their time limits). Its one
# run also timed the delta rules' sequential passes at 4 and 8 warps through a module
# switch (delta_warps_h100.log); 4 won, and the switch is gone.
# Carry .whl and .triton_cache (FLA's autotune results from fla_warm.sh).
# Usage on the device (repo root): bash bench/device/run_delta_gla.sh (results come back
# as $OUT/results.tgz: setup.sh).
source bench/device/setup.sh
timeout 60 python3 -m seqpar.bench.ops --T 8192 32768 --ops delta_rule gated_delta_rule gla \
    --peers sdpa --out $OUT/ops_delta3 2>&1 | tee $OUT/ops_delta3.log
timeout 60 python3 bench/device/profile_ops.py $OUT/profile_delta3.json --ops gated_delta_rule delta_rule \
    --T 32768 8192 2>&1 | tee $OUT/profile_delta3.log
timeout 60 python3 bench/device/profile_ops.py $OUT/profile_fla_delta.json --ops delta_rule --T 8192 \
    --peer fla 2>&1 | tee $OUT/profile_fla_delta.log
timeout 130 python3 bench/device/check_triton_gla.py $OUT/gla_check3.json 2>&1 | tee $OUT/gla_check3.log
timeout 150 python3 bench/device/check_triton_delta.py $OUT/delta3_check.json 2>&1 \
    | tee $OUT/delta3_check.log
