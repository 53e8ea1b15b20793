#!/usr/bin/env bash
# Sequence parallelism on one GPU (issue 14), in one device call:
#   1. tests/test_sp_gpu.py: the Triton kernels under SP on 2 (and 4) gloo processes sharing
#      the GPU, every op, layout, strategy, batch and packed, against one device;
#   2. seqpar bench sp --simulate: each rank's forward+backward with communication stubbed
#      out, beside the op without SP, for the linear family (P = 2 and 8, T_local 8K and
#      32K) and softmax attention (P = 2, T_local 8K and 16K).
#
#   bash bench/device/sp_one_gpu.sh     # on the device, repository root; results in $OUT
#
# Environment: SP_STAGES (default "test linear attn"), SP_WORLDS (test worlds, default "2 4"),
# SP_MIXERS (the linear stage's ops, default all six; a call's 10 minutes hold about four).
set -u
set -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/sp_one_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
STAGES=${SP_STAGES:-test linear attn}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

for stage in $STAGES; do
    case $stage in
    test)
        sel=$(printf ' or %s' ${SP_WORLDS:-2 4}); sel=${sel# or }
        timeout ${SP_TEST_TIMEOUT:-400} python3 -m pytest -q -m gpu tests/test_sp_gpu.py -k "$sel" -p no:cacheprovider \
            2>&1 | tail -n 40 | tee "$OUT/sp_gpu_test.txt" ;;
    linear)
        timeout ${SP_BENCH_TIMEOUT:-420} python3 -m seqpar.bench.sp --simulate 2,8 --t-local 8192,32768 \
            --mixers ${SP_MIXERS:-linear_attn,simple_gla,gla,delta_rule,gated_delta_rule,mlstm} \
            --warmup 3 --reps 10 --out "$OUT/sp_local_linear.json" 2>&1 | tail -n 20 ;;
    attn)
        timeout 300 python3 -m seqpar.bench.sp --simulate 2 --t-local 8192,16384 \
            --mixers softmax_attn --warmup 3 --reps 10 --out "$OUT/sp_local_attn.json" 2>&1 | tail -n 20 ;;
    esac
done
