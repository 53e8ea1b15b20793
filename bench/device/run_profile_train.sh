#!/bin/bash
# Device run: where a training step of the 125m preset goes (bench/device/profile_train.py),
# then 40 steps of it for tokens/s and MFU as `seqpar train` reports them. First run
# (profile_train_125m*_h100.*) also profiled every layer gdn (--mixers gdn).
# Usage on the device (repo root): bash bench/device/run_profile_train.sh (results: setup.sh).
source bench/device/setup.sh
OUT=$FINAL && trap - EXIT
timeout 140 python3 bench/device/profile_train.py $OUT/profile_train2_125m.json --preset 125m \
    --out /tmp/pt1 --no-progress 2>&1 | grep -v Warning | tee $OUT/profile_train2_125m.log
timeout 120 python3 -m seqpar.train --preset 125m --stop-at 40 --save-every 1000 --eval-every 1000 \
    --out /tmp/t125 --no-progress 2>&1 | grep -v Warning | tee $OUT/train2_125m.log
