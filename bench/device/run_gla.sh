#!/bin/bash
# Device run: GLA's Triton kernels (per-key gate) at full size on one GPU (check against
# float64, forward+backward time, stage times), then `seqpar bench ops` for gla with SDPA.
# Total under 240 s: the check's float32 T = 8192 cases (float64 references) take most.
# Usage on the device (repo root): bash bench/device/run_gla.sh   (writes under $OUT)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
timeout 175 python3 bench/device/check_triton_gla.py $OUT/gla_check.json 2>&1 | tee $OUT/gla_check.log
timeout 60 python3 -m seqpar.bench.ops --T 8192 32768 --ops gla --peers sdpa \
    --out $OUT/ops_gla 2>&1 | tee $OUT/ops_gla.log
