#!/usr/bin/env bash
# Sequence parallelism on 2 GPUs (issue 6): one invocation on the nvidia-h200-x2 device.
#
#   bash bench/device/sp_x2.sh            # on the device; writes into $OUT
#   SP_X2_DRY_RUN=1 OUT=/tmp/sp_x2 bash bench/device/sp_x2.sh   # CPU rehearsal (gloo, tiny sizes)
#
# Installs nothing; needs python3 with torch (+ triton on GPU), rich and matplotlib, and this
# checkout (imported through PYTHONPATH). Stages, each under its own timeout so that one
# failure cannot eat the whole budget, each writing its results as it goes:
#   env   GPUs, driver, versions
#   sp    seqpar bench sp under torchrun: per mixer and strategy, weak (32K tokens per GPU)
#         and strong (64K total) scaling, communication time, bytes -> sp.json
#   one   side by side, one GPU each: training tokens/s + MFU of the ~1B hybrid at 32K on
#         GPU 0 (train1) and the longest context that trains on one GPU on GPU 1 (longest1)
#   two   the same on both GPUs with sp=2: train2, then longest2
#   then  plots (sp.png, sp_model.png) and summary.md, printed last.
# Files in $OUT (the device returns at most 8): log.txt sp.json train.json longest.json
# sp.png sp_model.png summary.md.
#
# Environment: SP_X2_BUDGET_S (whole run, default 570 s: run it with timeout_s 600),
# SP_X2_STAGES (default "env sp one two"; also "longest1" / "longest2": one search alone on
# all the time left, e.g. SP_X2_STAGES=longest2 for a call of its own when the full run's
# search was time-bounded), SP_X2_DRY_RUN=1 (CPU rehearsal: gloo, tiny shapes, simulated OOM).
set -u
set -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/sp_x2_out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
: >"$LOG"
PY=${PYTHON:-python3}
DRY=${SP_X2_DRY_RUN:-0}
BUDGET=${SP_X2_BUDGET_S:-570}
STAGES=${SP_X2_STAGES:-env sp one two}
REPORT_RESERVE=30
T0=$(date +%s)

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off on these hosts (KINDS.md); fewer allocator splits at long T.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

# Linear mixers in the contiguous layout only (zigzag matters for softmax attention); the
# hybrid's mixer and softmax attention before the mixers that run on the PyTorch path.
SP_COMMON=(--linear-layouts contiguous
           --mixers linear_attn,simple_gla,gated_delta_rule,softmax_attn,mlstm,gla,delta_rule)
if [ "$DRY" = 1 ]; then
    export OMP_NUM_THREADS=1  # several ranks share a few cores
    SP_ARGS=(--device cpu --small --seq-total 128 "${SP_COMMON[@]}")
    TRAIN_ARGS=(--preset tiny --seq-len 512 --warmup 1 --steps 2)
    SEARCH_ARGS=(--preset tiny --first 256 --last 4096 --granularity 256 --warm 256 --oom-above 1800)
else
    SP_ARGS=(--seq-per-gpu 32768 --seq-total 65536 --warmup 2 --reps 5 "${SP_COMMON[@]}")
    TRAIN_ARGS=(--preset 1b --seq-len 32768 --warmup 2 --steps 4)
    SEARCH_ARGS=(--preset 1b --first 32768 --last 8388608 --granularity 32768 --warm 4096)
fi
TORCHRUN=("$PY" -m torch.distributed.run --standalone)

left() { echo $((BUDGET - ($(date +%s) - T0))); }
RESULTS=$(mktemp)

# run_stage NAME WANTED_SECONDS CMD...: run CMD under min(WANTED, time left - reserve);
# @BUDGET@ in CMD becomes that limit less 15 s (the program's own budget).
run_stage() {
    local name=$1 want=$2
    shift 2
    local avail=$(($(left) - REPORT_RESERVE))
    local limit=$((want < avail ? want : avail))
    if [ "$limit" -lt 15 ]; then
        echo "=== $name: skipped, ${avail}s left" | tee -a "$LOG"
        echo "$name: skipped (no time left)" >>"$RESULTS"
        return
    fi
    local cmd=("$@")
    cmd=("${cmd[@]//@BUDGET@/$((limit - 15))}")
    echo "=== $name: limit ${limit}s: ${CUDA_VISIBLE_DEVICES:+CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES }${cmd[*]}" | tee -a "$LOG"
    local s
    s=$(date +%s)
    timeout -k 10 "$limit" "${cmd[@]}" 2>&1 | grep --line-buffered -v '^W[0-9]\{4\} \|^\*\*\*\*\*\|OMP_NUM_THREADS' | sed -u "s/^/[$name] /" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local took=$(($(date +%s) - s))
    echo "=== $name: exit $rc after ${took}s" | tee -a "$LOG"
    echo "$name: exit $rc after ${took}s$([ "$rc" = 124 ] && echo ' (timed out)')" >>"$RESULTS"
}

for stage in $STAGES; do
    case $stage in
    env)
        run_stage env 30 bash -c "nvidia-smi -L 2>/dev/null || echo 'no nvidia-smi'; \
            nvidia-smi topo -m 2>/dev/null | head -5; \
            $PY -c 'import torch, sys; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpus\", torch.cuda.device_count()); import triton; print(\"triton\", triton.__version__)'"
        ;;
    sp)
        run_stage sp 160 "${TORCHRUN[@]}" --nproc-per-node 2 -m seqpar.bench.sp "${SP_ARGS[@]}" \
            --budget @BUDGET@ --out "$OUT/sp.json"
        ;;
    one)
        # The two one-GPU jobs side by side, one per GPU (separate devices, separate files).
        CUDA_VISIBLE_DEVICES=0 run_stage train1 75 "${TORCHRUN[@]}" --nproc-per-node 1 \
            -m seqpar.bench.longest throughput "${TRAIN_ARGS[@]}" --out "$OUT/train1.tmp.json" &
        CUDA_VISIBLE_DEVICES=1 run_stage longest1 150 "$PY" -m seqpar.bench.longest search --nproc 1 \
            "${SEARCH_ARGS[@]}" --budget @BUDGET@ --out "$OUT/longest1.tmp.json" &
        wait
        ;;
    two)
        run_stage train2 75 "${TORCHRUN[@]}" --nproc-per-node 2 -m seqpar.bench.longest throughput \
            "${TRAIN_ARGS[@]}" --out "$OUT/train.json"
        # Last: it takes whatever time is left.
        run_stage longest2 400 "$PY" -m seqpar.bench.longest search --nproc 2 "${SEARCH_ARGS[@]}" \
            --budget @BUDGET@ --out "$OUT/longest.json"
        ;;
    longest1 | longest2)
        # One search alone, on all the time left (a call of its own after a full run).
        run_stage "$stage" 900 "$PY" -m seqpar.bench.longest search --nproc "${stage#longest}" \
            "${SEARCH_ARGS[@]}" --budget @BUDGET@ --out "$OUT/longest.json"
        ;;
    *)
        echo "=== unknown stage $stage (known: env sp one two longest1 longest2)" | tee -a "$LOG"
        ;;
    esac
done
# Fold the side-by-side runs' files into the shared ones (at most 8 files come back).
"$PY" - "$OUT" <<'PYEOF' >>"$LOG" 2>&1
import json, os, sys
from pathlib import Path
out = Path(sys.argv[1])
for tmp, final in (("train1.tmp.json", "train.json"), ("longest1.tmp.json", "longest.json")):
    src, dst = out / tmp, out / final
    if not src.exists():
        continue
    data = json.loads(dst.read_text()) if dst.exists() else {}
    new = json.loads(src.read_text())
    if "runs" in new:
        data["runs"] = new["runs"] + data.get("runs", [])
    else:
        data.update(new)
    dst.write_text(json.dumps(data, indent=1))
    src.unlink()
PYEOF

echo "=== report" | tee -a "$LOG"
timeout -k 5 25 "$PY" bench/plot_sp.py --dir "$OUT" --summary "$OUT/summary.md" >>"$LOG" 2>&1 \
    || echo "report failed (see log.txt)" | tee -a "$LOG"
echo
echo "## stages (total $(($(date +%s) - T0))s of ${BUDGET}s)"
cat "$RESULTS"
echo
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
exit 0
