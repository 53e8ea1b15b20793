#!/bin/bash
# Device run: where a training step of the 125m preset goes (bench/device/profile_train.py),
# as shipped (gdn,gdn,gdn,attn) and with every layer gdn. Usage on the device (repo root):
# bash bench/device/run_profile_train.sh (results: setup.sh).
source bench/device/setup.sh
OUT=$FINAL && trap - EXIT
timeout 140 python3 bench/device/profile_train.py $OUT/profile_train_125m.json --preset 125m \
    --out /tmp/pt1 --no-progress 2>&1 | grep -v Warning | tee $OUT/profile_train_125m.log
timeout 140 python3 bench/device/profile_train.py $OUT/profile_train_125m_gdn.json --preset 125m \
    --mixers gdn --out /tmp/pt2 --no-progress 2>&1 | grep -v Warning | tee $OUT/profile_train_125m_gdn.log
