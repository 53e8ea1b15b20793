#!/bin/bash
# Device run: mLSTM's Triton kernels (triton_mlstm) on one GPU: full-size check against
# float64 (outputs, final pair, every gradient; mild, strong-forget and strong-normalizer
# inputs), forward+backward time against simple_gla and SDPA, 4 vs 8 warps, a per-kernel
# profile, then the small-shape GPU unit tests.
# Usage on the device (repo root): bash bench/device/run_mlstm.sh   (writes under $OUT)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
timeout 165 python3 bench/device/check_triton.py $OUT/mlstm_check.json --ops mlstm 2>&1 | tee $OUT/mlstm_check.log
timeout 40 python3 -m seqpar.bench.ops --T 8192 32768 --ops mlstm simple_gla --peers sdpa \
    --out $OUT/ops_mlstm 2>&1 | tee $OUT/ops_mlstm.log
timeout 40 python3 bench/device/check_triton.py $OUT/mlstm_warps.json --mlstm-warps 2>&1 \
    | tee $OUT/mlstm_warps.log
timeout 20 python3 bench/device/profile_ops.py $OUT/profile_mlstm.json --ops mlstm simple_gla \
    --T 32768 2>&1 | grep -v Warn | tee $OUT/profile_mlstm.log
timeout 25 python3 -m pytest -q tests/test_triton.py -k "mlstm and not sm90" -p no:cacheprovider 2>&1 \
    | tee $OUT/pytest_mlstm_gpu.log | tail -5
