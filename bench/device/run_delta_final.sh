#!/bin/bash
# Device run: the delta rules as shipped after the K = 64 hunt (bench/device/run_k64.sh):
# the benchmark against SDPA, then the full-size check against float64, one op per
# process (a CUDA fault poisons the rest of its process). Files go straight to $OUT (7),
# so a run cut by its limit keeps what it wrote.
# Usage on the device (repo root): bash bench/device/run_delta_final.sh
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 40 python3 -m seqpar.bench.ops --T 32768 8192 --ops delta_rule gated_delta_rule --peers sdpa \
    --out $OUT/ops_delta5 2>&1 | tee $OUT/ops_delta5.log
timeout 120 python3 bench/device/check_triton_delta.py $OUT/delta_check5_dr.json delta_rule 2>&1 \
    | tee $OUT/delta_check5_dr.log
timeout 170 python3 bench/device/check_triton_delta.py $OUT/delta_check5_gdr.json gated_delta_rule 2>&1 \
    | tee $OUT/delta_check5_gdr.log
