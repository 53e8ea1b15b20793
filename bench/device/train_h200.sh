#!/bin/bash
# Everything the "training at hardware speed" acceptance measures, on one H200 (or any one
# CUDA GPU), in about 8 minutes; results as JSON under $OUT, with a summary at the end.
#
# Usage on a bare GPU machine, repository root as the working directory:
#     OUT=/path/to/results bash bench/device/train_h200.sh [SECTION ...]
# Sections (default: all, in this order): tests attn mqar train loss train32k longest
# (two calls of the script, e.g. "tests attn mqar train" and "loss train32k longest", fit
# a 10-minute limit per command each; "summary" alone prints the summary of $OUT;
# "profile", not in the default list, writes torch.profiler tables of the linear ops at
# short sequences (B x T = 256 x 256 and 64 x 1K, 2 heads of 64) and of a 1b step).
#   tests     the GPU checks of the attention and convolution ops (cuDNN, FA2 varlen, flash)
#   attn      seqpar bench attn: ops.softmax_attn against every SDPA backend, T = 8K and 32K,
#             unpacked and packed (4 documents)
#   mqar      seqpar bench train, MQAR-shaped model (2 layers, d 128, 2 heads of 64,
#             B x T = 256 x 256): gdn against attention
#   train     seqpar bench train, presets 125m and 1b at seq 4096 packed, 4 sequences per step,
#             each with a plain transformer of the same size
#   loss      seqpar train --preset 125m --stop-at 40, compiled and eager with the same seeds:
#             the losses per step side by side (loss_125m_h200.json)
#   train32k  seqpar bench train, the 1b preset at 32K context (activation checkpointing
#             only if it does not fit without)
#   longest   seqpar bench longest search, the 1b hybrid from 256K tokens doubling, then
#             bisecting, time-capped (sizes whose step would not finish in time are skipped)
set -u
OUT=${OUT:?set OUT to the results directory}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SECTIONS=${*:-tests attn mqar train loss train32k longest}
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || stamp "pip install failed (using the tree as is)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"

for s in $SECTIONS; do
  stamp "section $s"
  case $s in
  tests)
    timeout 150 python -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_attn_conv_ops.py \
      tests/test_attn_engines.py > "$OUT/gpu_tests.log" 2>&1
    grep -E "^engine |passed|failed|error" "$OUT/gpu_tests.log" | tail -12 ;;
  attn)
    timeout 120 python -m seqpar.cli bench attn --T 8192 32768 --docs 4 --out "$OUT/attn_h200.json" \
      2>&1 | grep -v Warning | tail -4 ;;
  mqar)
    timeout 150 python -m seqpar.cli bench train --shape mqar --mixers gdn --reference attn \
      --seq-len 256 --batch-size 256 --no-packing --warmup 3 --steps 20 --out "$OUT/mqar_h200.json" \
      2>&1 | grep -v Warning | tail -3 ;;
  train)
    timeout 300 python -m seqpar.cli bench train --preset 125m,1b --seq-len 4096 --batch-size 4 \
      --no-ac --warmup 3 --steps 10 --out "$OUT/train_h200.json" 2>&1 | grep -v Warning | tail -5 ;;
  loss)
    # the same seeds twice, compiled (the default on CUDA) and eager: the losses must agree
    # within bf16 noise
    for mode in compile no-compile; do
      rm -rf /tmp/seqpar_loss_125m
      timeout 140 python -m seqpar.cli train --preset 125m --stop-at 40 --log-every 1 --save-every 100000 \
        --eval-every 100000 --out /tmp/seqpar_loss_125m --no-progress --$mode 2>&1 | grep -v Warning | tail -2
      cp /tmp/seqpar_loss_125m/metrics.jsonl "$OUT/loss_125m_$mode.jsonl" 2>/dev/null
    done
    rm -rf /tmp/seqpar_loss_125m
    python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def losses(mode):
    p = out / f"loss_125m_{mode}.jsonl"
    rows = [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}
a, b = losses("compile"), losses("no-compile")
steps = sorted(set(a) & set(b))
diff = [abs(a[s] - b[s]) for s in steps]
res = {"steps": steps, "compile": [a[s] for s in steps], "no_compile": [b[s] for s in steps],
       "max_abs_diff": max(diff, default=None),
       "max_rel_diff": max((d / abs(b[s]) for d, s in zip(diff, steps)), default=None)}
(out / "loss_125m_h200.json").write_text(json.dumps(res, indent=1))
print(f"loss: {len(steps)} steps compared, max |compiled - eager| = {res['max_abs_diff']}, "
      f"relative {res['max_rel_diff']}")
PY
    ;;
  train32k)
    timeout 180 python -m seqpar.cli bench train --preset 1b --seq-len 32768 --batch-size 1 --no-ac \
      --reference none --warmup 2 --steps 5 --out "$OUT/train32k_h200.json" 2>&1 | grep -v Warning | tail -2
    if grep -q '"error"' "$OUT/train32k_h200.json" 2>/dev/null; then
      stamp "32K without activation checkpointing ran out of memory: with it"
      timeout 180 python -m seqpar.cli bench train --preset 1b --seq-len 32768 --batch-size 1 --ac \
        --reference none --warmup 2 --steps 5 --out "$OUT/train32k_ac_h200.json" 2>&1 | grep -v Warning | tail -2
    fi ;;
  longest)
    timeout 250 python -m seqpar.cli bench longest search --preset 1b --nproc 1 --first 262144 \
      --last 1048576 --granularity 65536 --warm 4096 --budget 230 --out "$OUT/longest_h200.json" \
      2>&1 | grep -v Warning | tail -4 ;;
  profile)  # optional (not in the default list): where the time goes
    timeout 200 python -m seqpar.cli bench profile ops --ops gated_delta_rule softmax_attn sdpa \
      --T 256 1024 --tokens 65536 --heads 2 --head-dim 64 --out "$OUT/profile_ops_short.json" \
      2>&1 | grep -v Warning | tail -40
    timeout 200 python -m seqpar.cli bench profile train --out "$OUT/profile_train_1b.json" \
      --preset 1b --seq-len 4096 --batch-size 4 2>&1 | grep -v Warning | tail -40 ;;
  summary) ;;
  *) echo "unknown section $s" ;;
  esac
done

stamp "summary"
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
for name in ("train_h200.json", "train32k_h200.json", "train32k_ac_h200.json", "mqar_h200.json"):
    d = load(name)
    for r in (d or {}).get("runs", []):
        if "error" in r:
            print(f"{name}: {r['preset']} {r['mixers']} T={r['seq_len']}: {r['error'][:100]}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{name}: {r['preset']} {r['mixers']} T={r['seq_len']} B={r['batch_size']} "
              f"ac={r['activation_checkpointing']}: {r['tokens_per_s'] / 1e3:.1f}k tok/s, "
              f"step {1e3 * r['step_s']:.1f} ms, MFU {mfu}, {r.get('peak_allocated_gb', 0):.1f} GB, "
              f"syncs/step {r['syncs_per_step']} {r['sync_sites'] or ''}")
d = load("mqar_h200.json")
if d and all("step_s" in r for r in d["runs"]) and len(d["runs"]) == 2:
    g, a = d["runs"]
    print(f"MQAR shape: gdn step / attention step = {g['step_s'] / a['step_s']:.2f} (target <= 1.5)")
d = load("attn_h200.json")
for r in (d or {}).get("rows", []):
    print(f"attn T={r['T']}: softmax_attn / best SDPA ({r['best_sdpa']}) = {r.get('ratio', float('nan')):.3f}; "
          f"packed / best SDPA on the documents as rows = {r.get('ratio_packed', float('nan')):.3f}; "
          f"ms {({k: round(v, 3) for k, v in r['ms'].items()})}; errors {r['rel_err']}")
d = load("longest_h200.json")
if d and "p1" in d:
    r = d["p1"]
    print(f"longest: trained {r['longest_ok']} tokens; smallest failed {r['smallest_failed']}; "
          f"time-bounded {r['time_bounded']}")
EOF
stamp "done"
