#!/bin/bash
# Device run: kernel-time profiles of the diag ops (seqpar and FLA 0.6.0) and the GPU unit
# tests of the diag kernels. Carry .whl (FLA wheels). Writes under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
timeout 100 python3 bench/device/profile_ops.py $OUT/profile_diag.json --ops linear_attn simple_gla mlstm delta_rule \
    --T 8192 32768 2>&1 | tee $OUT/profile_diag.log
timeout 200 python3 -m pytest -q tests/test_triton.py -p no:cacheprovider --tb=short > $OUT/pytest_triton_gpu.log 2>&1
grep -E "passed|failed|errors over" $OUT/pytest_triton_gpu.log | cut -c1-600
timeout 200 python3 bench/device/profile_ops.py $OUT/profile_fla.json --ops linear_attn --T 8192 --peer fla 2>&1 \
    | tee $OUT/profile_fla.log
