#!/usr/bin/env bash
# Compiled blocks on one GPU (issue 15), in one device call (results as JSON under $OUT):
#   1. mixers: every mixer's blocks compiled with inductor, trained beside the eager model
#      (packed, twice with different document counts, then a plain batch); a failure
#      prints its full traceback;
#   2. speed: seqpar bench train on the 125m preset, --no-compile then --compile.
#
#   OUT=/path/to/results bash bench/device/compile_check.sh [mixers] [speed]
set -u
set -o pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:?set OUT to the results directory}
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
rc=0
for stage in ${*:-mixers speed}; do
    echo "== stage $stage"
    timeout "${COMPILE_CHECK_TIMEOUT:-280}" python3 bench/device/compile_check.py "$stage" "$OUT" \
        2>&1 | grep -v Warning | tee "$OUT/compile_$stage.log" || rc=1
done
exit $rc
