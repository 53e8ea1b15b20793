#!/bin/bash
# Device run: locate the delta rules' K = 64 fault (bench/device/delta_k64.py), try one
# launch setting at a time in fresh processes, and run the whole full-size delta check
# with the first that passes. Carry .whl (setup.sh installs it).
# Usage on the device (repo root): bash bench/device/run_k64.sh (results: setup.sh).
source bench/device/setup.sh
CUDA_LAUNCH_BLOCKING=1 timeout 60 python3 bench/device/delta_k64.py locate 2>&1 | tail -25 | tee $OUT/k64_locate.log
for v in state1 dqk4 wy1 all; do
    timeout 50 python3 bench/device/delta_k64.py try $v 2>&1 | tee -a $OUT/k64_try.log
    if [ ${PIPESTATUS[0]} -eq 0 ]; then
        timeout 200 python3 bench/device/delta_k64.py check $v $OUT/delta_check5.json 2>&1 | tee $OUT/delta_check5.log
        break
    fi
done
