#!/bin/bash
# Device run: round 2 of the delta rules' launch settings (bench/device/tune_delta.py, every
# variant against the settings round 1 chose), then the full-size checks against float64
# of the settings as shipped (one op per process: a CUDA fault poisons the rest of its
# process). Files go straight to $OUT, so a run cut by its limit keeps what it wrote.
# Carry .whl and .triton_cache. Usage on the device (repo root): bash bench/device/run_tune2.sh
source bench/device/setup.sh
OUT=$FINAL && trap - EXIT
timeout 190 python3 bench/device/tune_delta.py $OUT/tune_delta2.json 2>&1 | tee $OUT/tune_delta2.log
timeout 150 python3 bench/device/check_triton_delta.py $OUT/delta_check8_dr.json delta_rule 2>&1 \
    | tee $OUT/delta_check8_dr.log
timeout 220 python3 bench/device/check_triton_delta.py $OUT/delta_check8_gdr.json gated_delta_rule 2>&1 \
    | tee $OUT/delta_check8_gdr.log
