"""Launch settings of the delta rules' kernels, tried one change at a time on the GPU.

Each variant replaces module attributes of ``seqpar.ops.linear.triton_delta`` (the launch
dicts and functions its host code reads at call time) and measures forward+backward as
``seqpar bench ops`` does (``seqpar.bench.ops.measure``: triton's do_bench medians, bf16,
16 heads of 128, B T = 32K tokens). Variants are measured in rounds, every variant once
per round, and each keeps its best round, so drift of the machine spreads over all of
them. FLA's DeltaNet, when importable, is measured in the same process at 8K, so every
variant also has its ratio to FLA.

Usage on a GPU machine (repo root): ``python tools/tune_delta.py OUT.json [NAMES]``.
NAMES: comma-separated variant names, all by default; "shipped" is the baseline every
ratio needs, and "a+b" applies variants a and b together. Speed only: a variant worth
shipping still needs the full-size checks (``python -m pytest -m gpu
tests/test_triton_gpu.py -k delta``) before it ships.
"""
import json
import sys
import time

import torch

from seqpar.bench.ops import fla_fn, make_inputs, measure, seqpar_fn
from seqpar.ops.linear import triton_delta as td


def _state(bv, warps, stages):
    return lambda *_: dict(BT=td.BT, BV=bv, num_warps=warps, num_stages=stages)


def _dqk(warps, stages):
    return lambda *_: dict(num_warps=warps, num_stages=stages)


# Every launch setting of the delta path, each against the settings as shipped
# ("shipped"); the shipped values and the reasons for them are in triton_delta.py.
VARIANTS = {
    "shipped": {},
    "state 2 stages": {"_state_meta": _state(32, 4, 2)},
    "state 3 stages": {"_state_meta": _state(32, 4, 3)},
    "state BV=64 8 warps 3 stages": {"_state_meta": _state(64, 8, 3)},
    "dqk 8 warps 3 stages": {"_dqk_meta": _dqk(8, 3)},
    "wy_bwd 8 warps": {"WY_BWD_META": {**td.WY_BWD_META, "num_warps": 8}},
    "wy_bwd 2 warps": {"WY_BWD_META": {**td.WY_BWD_META, "num_warps": 2}},
    "dv_local 4 warps": {"DV_LOCAL_META": {**td.DV_LOCAL_META, "num_warps": 4}},
    "inverse 2 warps": {"INVERSE_META": dict(num_warps=2)},
    # last: a CUDA fault fails every later launch of the process, and deeper pipelining
    # of the WY backward is the variant most likely to fault (earlier times are kept)
    "wy_bwd 2 stages": {"WY_BWD_META": {**td.WY_BWD_META, "num_stages": 2}},
}
SHAPES = ((4, 8192), (1, 32768))  # (B, T)
OPS = ("delta_rule", "gated_delta_rule")


def _fwd_bwd_ms(fn, B, T, op):
    xs = make_inputs(op, B, T, 16, 128, torch.device("cuda"))
    return measure(fn, xs, 60)[1]


def main(out, names=None, rounds=3):
    variants = {n: {k: v for part in n.split("+") for k, v in VARIANTS[part].items()}
                for n in (names or VARIANTS)}
    shipped = {name: getattr(td, name) for patch in variants.values() for name in patch}
    best, fla = {}, None
    for r in range(rounds):
        try:  # each round, as the variants are: the ratio is taken at the same drift
            ms = _fwd_bwd_ms(fla_fn("delta_rule"), 4, 8192, "delta_rule")
            fla = ms if not isinstance(fla, float) else min(fla, ms)
        except Exception as e:  # not importable or refused: the variants still run
            fla = repr(e)[:200]
        print(f"round {r} fla delta_rule B=4 T=8192: {fla}", flush=True)
        for name, patch in variants.items():
            for attr, value in shipped.items():
                setattr(td, attr, patch.get(attr, value))
            for op in OPS:
                for B, T in SHAPES:
                    key = (name, op, T)
                    try:
                        ms = _fwd_bwd_ms(seqpar_fn(op), B, T, op)
                    except Exception as e:  # a variant that fails records why
                        if not isinstance(best.get(key), float):
                            best[key] = repr(e)[:200]
                        continue
                    if not isinstance(best.get(key), float) or ms < best[key]:
                        best[key] = ms
                    print(f"round {r} {name:32s} {op:16s} T={T:6d}: {ms:.3f} ms", flush=True)
    for attr, value in shipped.items():
        setattr(td, attr, value)
    rows = [dict(variant=n, op=op, T=T, fwd_bwd_ms=ms) for (n, op, T), ms in best.items()]
    for row in rows:
        ship = best[("shipped", row["op"], row["T"])]
        if isinstance(row["fwd_bwd_ms"], float) and isinstance(ship, float):
            row["vs_shipped"] = ship / row["fwd_bwd_ms"]
            if row["op"] == "delta_rule" and row["T"] == 8192 and isinstance(fla, float):
                row["vs_fla"] = fla / row["fwd_bwd_ms"]
        print(row, flush=True)
    with open(out, "w") as f:
        json.dump(dict(command=" ".join(["python tools/tune_delta.py"] + sys.argv[1:]),
                       gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=__import__("triton").__version__,
                       date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       rounds=rounds, fla_delta_rule_8k_ms=fla, rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else None)
