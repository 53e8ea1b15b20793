#!/bin/bash
# Device run after run_wy.sh, with N, dv's state-free part and dk's first part stored
# 16-bit: the benchmark against SDPA and FLA side by side, a kernel profile, the state
# passes' launch settings tried at T = 32K (B = 1: a quarter of the programs of T = 8K),
# and the 16-bit kernels at K = 64 (delta_k64.py). Carry .whl and .triton_cache.
# Usage on the device (repo root): bash bench/device/run_wy2.sh (results: setup.sh).
source bench/device/setup.sh
timeout 150 python3 -m seqpar.bench.ops --T 8192 32768 --ops delta_rule gated_delta_rule --peers sdpa fla \
    --fla-T 8192 --rep-ms 60 --out $OUT/ops_wy2 2>&1 | tee $OUT/ops_wy2.log
timeout 60 python3 bench/device/profile_ops.py $OUT/profile_wy2.json --ops delta_rule gated_delta_rule \
    --T 8192 32768 2>&1 | grep -v Warn | tee $OUT/profile_wy2.log
timeout 110 python3 bench/device/check_triton_delta.py --tune $OUT/tune_wy2.json 1 32768 2>&1 | tee $OUT/tune_wy2.log
timeout 60 python3 bench/device/delta_k64.py try none 2>&1 | tee $OUT/k64_16bit.log
