#!/bin/bash
# Device run 2: GPU tests (full log) and `seqpar bench ops` with SDPA and FLA 0.6.0.
# Needs the FLA wheels in .whl (carry .whl). Writes under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
timeout 100 python3 -m pytest -q tests/test_triton.py -p no:cacheprovider --tb=short > $OUT/pytest_gpu.log 2>&1
grep -E "passed|failed|errors over" $OUT/pytest_gpu.log | cut -c1-600
timeout 450 python3 -m seqpar.bench.ops --T 2048 32768 131072 8192 --fla-T 8192 --fallback-T 8192 \
    --out $OUT/ops_h100 2>&1 | tee $OUT/bench.log
