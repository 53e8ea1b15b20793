#!/bin/bash
# Device run: flash-linear-attention 0.6.0's first calls at T = 8K (they autotune for
# minutes), keeping the autotune results so that a later run skips the sweep. Triton
# stores them as *.autotune.json under TRITON_CACHE_DIR (FLA_CACHE_RESULTS defaults to 1);
# they come back as $OUT/fla_autotune.tgz: unpack it into .triton_cache at the repo root,
# carry .triton_cache and .whl, and bench/device/run_fla.sh finds them.
# Usage on the device: bash bench/device/fla_warm.sh   (carry .whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=$PWD/.triton_cache
timeout ${FLA_S:-470} python3 -m seqpar.bench.ops --T 8192 --ops linear_attn delta_rule gla --peers fla --rep-ms 60 \
    --fla-T 8192 --out $OUT/ops_fla_warm_h100 2>&1 | tee $OUT/ops_fla_warm_h100.log
(cd $PWD && find .triton_cache -name '*.autotune.json' | tar czf $OUT/fla_autotune.tgz -T -)
ls -la $OUT
