#!/bin/bash
# Device run 3: GPU tests after the tile fix, and FLA 0.6.0 at T = 8K for the ops it runs
# on Hopper + triton 3.6 (its first call autotunes). Carry .whl. Writes under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest -q tests/test_triton.py -p no:cacheprovider --tb=short > $OUT/pytest_gpu.log 2>&1
grep -E "passed|failed|errors over" $OUT/pytest_gpu.log | cut -c1-600
timeout 330 python3 -m seqpar.bench.ops --T 8192 --ops linear_attn gla delta_rule gated_delta_rule \
    --peers fla --fla-T 8192 --fallback-T --out $OUT/ops_fla_h100 2>&1 | tee $OUT/fla.log
