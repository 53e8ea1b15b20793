#!/bin/bash
# Device run after the delta rules' WY preprocessing and its backward moved to Triton
# (seqpar/ops/linear/triton_delta.py): a kernel table of one gated_delta_rule
# forward+backward (B=1, T=32768, H=16, K=V=128, bf16), the benchmark against SDPA, then
# the full-size check against float64 (fwd+bwd time against the PyTorch path first, then
# one PASS/FAIL line per case; its float64 references took 207 s on an H100, so even with
# 220 s it may be cut after most cases: its log keeps the lines it reached).
# Usage on the device (repo root): bash bench/device/run_delta2.sh   (writes under $OUT)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout 45 python3 bench/device/profile_ops.py $OUT/profile_delta2.json --ops gated_delta_rule \
    --T 32768 2>&1 | tee $OUT/profile_delta2.log
timeout 70 python3 -m seqpar.bench.ops --T 8192 32768 --ops delta_rule gated_delta_rule \
    --peers sdpa --out $OUT/ops_delta2 2>&1 | tee $OUT/ops_delta2.log
timeout 220 python3 bench/device/check_triton_delta.py $OUT/delta2_check.json 2>&1 \
    | tee $OUT/delta2_check.log
