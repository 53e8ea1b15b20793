#!/bin/bash
# Device run for the FLA-style WY backward of the delta rules (dW = -dv' S^T formed in the
# dq/dk kernel, dv' stored 16-bit by the reverse pass): the benchmark against SDPA and FLA
# side by side, a kernel profile, the state passes' launch settings tried
# (check_triton_delta.py --tune), then the full-size checks against float64, one op per
# process. Carry .whl and .triton_cache. Usage on the device (repo root):
# bash bench/device/run_wy.sh (results come back as $OUT/results.tgz: setup.sh).
source bench/device/setup.sh
timeout 90 python3 -m seqpar.bench.ops --T 8192 32768 --ops delta_rule gated_delta_rule --peers sdpa fla \
    --fla-T 8192 --rep-ms 60 --out $OUT/ops_wy 2>&1 | tee $OUT/ops_wy.log
timeout 60 python3 bench/device/profile_ops.py $OUT/profile_wy.json --ops delta_rule gated_delta_rule \
    --T 8192 32768 2>&1 | grep -v Warn | tee $OUT/profile_wy.log
timeout 120 python3 bench/device/check_triton_delta.py --tune $OUT/tune_wy.json 2>&1 | tee $OUT/tune_wy.log
timeout 110 python3 bench/device/check_triton_delta.py $OUT/delta_check6_dr.json delta_rule 2>&1 \
    | tee $OUT/delta_check6_dr.log
timeout 140 python3 bench/device/check_triton_delta.py $OUT/delta_check6_gdr.json gated_delta_rule 2>&1 \
    | tee $OUT/delta_check6_gdr.log
