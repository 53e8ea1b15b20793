# Sourced by the device run scripts (repo root): flash-linear-attention's wheels (carried
# .whl) on PYTHONPATH, its autotune results (carried .triton_cache, see fla_warm.sh) in
# use, the machine's versions printed, and everything written under $OUT coming back as
# $OUT/results.tgz (the device returns at most 8 files).
FINAL=$OUT OUT=/tmp/res && mkdir -p $OUT
trap 'tar czf $FINAL/results.tgz -C $OUT .' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
[ -d .triton_cache ] && export TRITON_CACHE_DIR=$PWD/.triton_cache
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
