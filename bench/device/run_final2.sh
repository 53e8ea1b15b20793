#!/bin/bash
# Device run closing this round of kernel work: `seqpar bench ops` for every op at
# T = 2K-128K against SDPA; seqpar and FLA side by side at T = 8K for linear_attn and
# delta_rule (FLA's autotune results carried in .triton_cache, see fla_warm.sh); then the
# full-size checks against float64 of the delta rules, GLA and mLSTM's strong-normalizer
# cases (the ones earlier runs did not reach). Carry .whl and .triton_cache.
# Usage on the device (repo root): bash bench/device/run_final2.sh (results come back as
# $OUT/results.tgz: setup.sh).
source bench/device/setup.sh
timeout 150 python3 -m seqpar.bench.ops --T 32768 8192 131072 2048 --peers sdpa \
    --out $OUT/ops_final2 2>&1 | tee $OUT/ops_final2.log
timeout 80 python3 -m seqpar.bench.ops --T 8192 --ops linear_attn delta_rule --peers fla --fla-T 8192 \
    --rep-ms 60 --out $OUT/ops_fla3 2>&1 | tee $OUT/ops_fla3.log
timeout 200 python3 bench/device/check_triton_delta.py $OUT/delta_check4.json 2>&1 | tee $OUT/delta_check4.log
timeout 90 python3 bench/device/check_triton_gla.py $OUT/gla_check4.json 2>&1 | tee $OUT/gla_check4.log
timeout 60 python3 bench/device/check_triton.py $OUT/mlstm_norm_check.json --ops mlstm --strong norm 2>&1 \
    | tee $OUT/mlstm_norm_check.log
