#!/bin/bash
# Device run: the full-size checks earlier runs' time limits cut: mLSTM's float32 cases
# (with the torch.compile check of check_triton.py) and the delta rules at K = 64
# (delta_k64.py try none: bf16 and float32). Files go straight to $OUT, so a run cut by
# its limit keeps what it wrote. Carry .whl. Usage on the device (repo root):
# bash bench/device/run_final4.sh
source bench/device/setup.sh
OUT=$FINAL && trap - EXIT
timeout 200 python3 bench/device/check_triton.py $OUT/mlstm_fp32_check.json --ops mlstm --dtype float32 2>&1 \
    | tee $OUT/mlstm_fp32_check.log
timeout 60 python3 bench/device/delta_k64.py try none 2>&1 | tee $OUT/k64_final.log
