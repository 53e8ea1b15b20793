#!/bin/bash
# Device run: the trainer on one GPU. The tiny preset for its 300 steps, stopped at 150 and
# resumed from that checkpoint (on the standard library source of the device's Python);
# 30 steps of a tiny model with one layer of every mixer (each op's Triton kernels under
# bf16 autocast); 40 steps of the 125m preset for its tokens/s, MFU and memory.
# Checkpoints are deleted before the results come back. Usage on the device (repo root):
# bash bench/device/run_train_gpu.sh (results: setup.sh).
source bench/device/setup.sh
T=$OUT/train_tiny
timeout 100 python3 -m seqpar.train --preset tiny --stop-at 150 --out $T --no-progress 2>&1 | tee $OUT/train_tiny.log
timeout 60 python3 -m seqpar.train --preset tiny --resume --out $T --no-progress 2>&1 | tee -a $OUT/train_tiny.log
timeout 120 python3 -m seqpar.train --preset tiny --mixers linear_attn,retention,simple_gla,gla,deltanet,gdn,mlstm,hyena,attn \
    --set n_layers=9 --stop-at 30 --log-every 5 --save-every 1000 --eval-every 1000 \
    --out $OUT/train_mixers --no-progress 2>&1 | tee $OUT/train_mixers.log
timeout 120 python3 -m seqpar.train --preset 125m --stop-at 40 --save-every 1000 --eval-every 1000 \
    --out $OUT/train_125m --no-progress 2>&1 | tee $OUT/train_125m.log
rm -rf $T/checkpoints $OUT/train_mixers/checkpoints $OUT/train_125m/checkpoints
