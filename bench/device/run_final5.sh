#!/bin/bash
# Device run closing the launch-settings tune (tune_delta.py rounds 1-2): the delta rule
# beside FLA at T = 8K, `seqpar bench ops` for every op at T = 2K-128K against SDPA, and the
# full-size checks of the delta rules against float64 as shipped (one op per process: a
# CUDA fault poisons the rest of its process). Carry .whl and .triton_cache.
# Usage on the device (repo root): bash bench/device/run_final5.sh (results: setup.sh).
source bench/device/setup.sh
timeout 60 python3 -m seqpar.bench.ops --T 8192 --ops delta_rule --peers fla --fla-T 8192 \
    --rep-ms 60 --out $OUT/ops_fla5 2>&1 | tee $OUT/ops_fla5.log
timeout 150 python3 -m seqpar.bench.ops --T 32768 8192 131072 2048 --peers sdpa \
    --out $OUT/ops_final4 2>&1 | tee $OUT/ops_final4.log
timeout 140 python3 bench/device/check_triton_delta.py $OUT/delta_check9_dr.json delta_rule 2>&1 \
    | tee $OUT/delta_check9_dr.log
timeout 200 python3 bench/device/check_triton_delta.py $OUT/delta_check9_gdr.json gated_delta_rule 2>&1 \
    | tee $OUT/delta_check9_gdr.log
