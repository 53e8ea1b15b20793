#!/bin/bash
# Device run: seqpar and flash-linear-attention 0.6.0 side by side at T = 8K for the ops FLA
# runs on Hopper with triton 3.6 (its gated ops refuse), FLA's first calls autotuning.
# Carry .whl (the FLA wheels). Usage on the device: bash bench/device/run_fla.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
# autotune results kept by fla_warm.sh, when carried: FLA skips its sweep
[ -d .triton_cache ] && export TRITON_CACHE_DIR=$PWD/.triton_cache
timeout ${FLA_S:-240} python3 -m seqpar.bench.ops --T 8192 --ops linear_attn delta_rule gla --peers fla --rep-ms 60 \
    --fla-T 8192 --out $OUT/ops_fla_h100 2>&1 | tee $OUT/ops_fla_h100.log
