#!/bin/bash
# Device run: the delta family's Triton path at full size on one GPU (check against float64,
# timing against the PyTorch path and SDPA), then the GPU unit tests of every kernel.
# Usage on the device (repo root): bash bench/device/run_delta.sh   (writes under $OUT)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout 300 python3 bench/device/check_triton_delta.py $OUT/delta_check.json 2>&1 | tee $OUT/delta_check.log
timeout 110 python3 -m seqpar.bench.ops --T 8192 32768 --ops linear_attn delta_rule gated_delta_rule \
    --peers sdpa --out $OUT/ops_delta 2>&1 | tee $OUT/ops_delta.log
timeout 150 python3 -m pytest -q tests/test_triton.py tests/test_triton_delta.py -p no:cacheprovider 2>&1 \
    | tee $OUT/pytest_gpu.log | tail -15
