#!/bin/bash
# Device run: the delta rules' launch settings one change at a time beside FLA's DeltaNet
# (bench/device/tune_delta.py). Carry .whl and .triton_cache. Usage on the device (repo
# root): bash bench/device/run_tune_delta.sh (results come back as $OUT/results.tgz).
source bench/device/setup.sh
timeout 420 python3 bench/device/tune_delta.py $OUT/tune_delta.json 2>&1 | tee $OUT/tune_delta.log
