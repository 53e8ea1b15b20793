#!/bin/bash
# Device run 1: GPU tests, full-size checks against float64, a short timing smoke.
# Usage on the device (repo root): bash bench/device/run_check.sh   (writes under $OUT)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout 150 python3 -m pytest -q -x tests/test_triton.py -p no:cacheprovider 2>&1 | tail -5
timeout 330 python3 bench/device/check_triton.py $OUT/ops_check.json 2>&1 | tee $OUT/check.log
timeout 90 python3 -m seqpar.bench.ops --T 8192 32768 --ops linear_attn simple_gla mlstm --peers sdpa \
    --fallback-T --out $OUT/ops_smoke 2>&1 | tee $OUT/smoke.log
