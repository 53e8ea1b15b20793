"""Where one simulated SP rank's forward+backward spends its time: per-kernel device time
of ``ops.<op>`` at ``T_local`` tokens without SP and under SP (``LocalCommunicator``),
and the host's Python time of the SP call (cProfile), for finding per-call overhead.

    python bench/device/sp_profile.py OUT_DIR linear_attn,simple_gla 8192

Writes ``OUT_DIR/sp_profile.json`` (per case: kernels by total device µs per call, with
launch counts) and ``OUT_DIR/sp_profile_host.txt`` (the SP call's top Python functions).
"""
import cProfile
import io
import json
import pstats
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from seqpar.bench.sp import fwd_bwd_step, leaves, make_inputs
from seqpar.parallel import LocalCommunicator, SequenceParallel

out_dir, names, T = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3])
out_dir.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
REPS = 5
CASES = [("base", None)] + [
    (f"{strategy}/{layout}/P8/rank1", dict(layout=layout, linear_strategy=strategy))
    for strategy, layout in (("scan", "contiguous"), ("allgather", "contiguous"),
                             ("scan", "zigzag"))]
result, host = {}, io.StringIO()
for op in names:
    xs = leaves(make_inputs(op, 1, T, 16, 128, torch.bfloat16, dev, seed=0))
    do = torch.randn(1, T, 16, 128, device=dev).to(torch.bfloat16)
    for case, kw in CASES:
        sp = None if kw is None else SequenceParallel(comm=LocalCommunicator(8, 1), **kw)
        step = fwd_bwd_step(op, xs, do, sp, "auto")
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(REPS):
                step()
            torch.cuda.synchronize()
        kernels = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                k = kernels[e.name[:90]]
                k[0] += e.device_time / REPS
                k[1] += 1 / REPS
        rows = sorted(([n, round(us, 1), round(c, 1)] for n, (us, c) in kernels.items()),
                      key=lambda r: -r[1])
        result[f"{op}/{case}"] = {"device_us": round(sum(r[1] for r in rows), 1),
                                  "launches": round(sum(r[2] for r in rows), 1), "kernels": rows}
        print(f"{op:>16} {case:<26} device {result[f'{op}/{case}']['device_us']:8.1f} us, "
              f"{result[f'{op}/{case}']['launches']:5.1f} launches", flush=True)
        if kw is not None and case.startswith("scan/contiguous"):
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(20):
                step()
            pr.disable()
            torch.cuda.synchronize()
            host.write(f"==== {op} {case}: 20 calls\n")
            pstats.Stats(pr, stream=host).sort_stats("tottime").print_stats(30)
(out_dir / "sp_profile.json").write_text(json.dumps(result, indent=1))
(out_dir / "sp_profile_host.txt").write_text(host.getvalue())
