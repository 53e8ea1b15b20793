#!/bin/bash
# Device run on nvidia-h200-x2 with little device time left: seqpar bench sp for three
# mixers (gated_delta_rule, linear_attn, softmax_attn), weak scaling at 32K tokens per GPU
# and strong at 64K, under its own time budget. The full run is bench/device/sp_x2.sh.
# Usage on the device (repo root): bash bench/device/run_sp_x2_short.sh
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi -L
timeout -k 10 ${SP_BUDGET:-140} python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
    -m seqpar.bench.sp --seq-per-gpu 32768 --seq-total 65536 --warmup 2 --reps 5 \
    --linear-layouts contiguous --mixers gated_delta_rule,linear_attn,softmax_attn \
    --budget $((${SP_BUDGET:-140} - 20)) --out $OUT/sp_x2_short.json 2>&1 \
    | grep -v '^W[0-9]\{4\} ' | tee $OUT/sp_x2_short.log
