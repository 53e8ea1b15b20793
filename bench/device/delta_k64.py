"""Find and fix the fault of the delta rules' 16-bit kernels at head dim K = 64 on the GPU.

The full-size check (bench/results/delta_check4_h100.log) hit an illegal memory access
at K = 64 (bf16, T = 2048), after passing every K = 128 bf16 case; the earlier float32
kernels passed K = 64. The WY backward that replaced the faulting one passes there
(``try none``: bench/results/k64_16bit_h100.log). Usage on the device (repo root):

* ``python bench/device/delta_k64.py locate`` under ``CUDA_LAUNCH_BLOCKING=1``: one
  forward+backward at K = 64; the traceback names the faulting launch;
* ``python bench/device/delta_k64.py try VARIANT``: the K = 64 cases of the full-size
  check with one launch setting changed (VARIANTS), exit status 0 if all pass;
* ``python bench/device/delta_k64.py check VARIANT OUT.json``: the whole full-size check
  (check_triton_delta.main) with that setting.

Each call is its own process: a CUDA fault poisons the context it happens in.
"""
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import check_triton_delta as ctd  # noqa: E402
from seqpar.ops.linear import triton_delta as td  # noqa: E402


def _stages(n):
    def meta(*args, base=td._state_meta):
        return {**base(*args), "num_stages": n}
    return meta


VARIANTS = {
    "none": {},
    "dqk4": {"_dqk_meta": lambda dtype, *_: dict(num_warps=4, num_stages=2 if dtype == torch.float32 else 3)},
    "state1": {"_state_meta": _stages(1)},
    "wy1": {"WY_BWD_META": dict(num_warps=8, num_stages=1)},
}
VARIANTS["all"] = {**VARIANTS["dqk4"], **VARIANTS["state1"], **VARIANTS["wy1"]}


def apply(name):
    for attr, value in VARIANTS[name].items():
        setattr(td, attr, value)


def k64_cases():
    for op in ("delta_rule", "gated_delta_rule"):
        for case in ctd.cases(op):
            if case["K"] == 64:
                yield op, case


def main(argv):
    t = ctd._tests()
    if argv[0] == "locate":
        op, case = next(k64_cases())
        try:
            print(t.errors(op, **case, ref_device="cuda"))
        except Exception:
            traceback.print_exc()
        return 0
    apply(argv[1])
    if argv[0] == "check":
        return 0 if ctd.main(argv[2]) else 1
    print(f"variant {argv[1]}", flush=True)
    rows = [ctd.check_case(t.errors, op, case) for op, case in k64_cases()]
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
