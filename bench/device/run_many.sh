#!/bin/bash
# Run several device scripts in one call: each writes into its own folder, and everything
# comes back as one archive (the device returns at most 8 files).
# Usage on the device (repo root): bash bench/device/run_many.sh run_gla.sh run_mlstm.sh ...
FINAL=$OUT
mkdir -p /tmp/res
for s in "$@"; do
    name=${s%.sh}
    echo "===== $s"
    OUT=/tmp/res/$name bash -c "mkdir -p \$OUT && bash bench/device/$s" 2>&1 | tee /tmp/res/$name.log | cut -c1-400
done
tar czf $FINAL/results.tgz -C /tmp/res .
