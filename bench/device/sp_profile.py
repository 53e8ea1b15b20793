"""Where one simulated SP rank's forward+backward spends its time, beside the op without
SP: per-kernel device time (torch.profiler), the host's issue time (the forward+backward
queued without waiting on the GPU), eager wall time and CUDA-graph replay time, and the
SP call's top Python functions (cProfile), for finding per-call overhead.

    python bench/device/sp_profile.py OUT_DIR linear_attn,simple_gla 8192[,32768]

Writes ``OUT_DIR/sp_profile.json`` (per case: timings, kernels by device µs per call with
launch counts) and ``OUT_DIR/sp_profile_host.txt`` (the SP calls' top Python functions).
"""
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from seqpar.bench.sp import fwd_bwd_step, graph_ms, leaves, make_inputs, time_once
from seqpar.parallel import LocalCommunicator, SequenceParallel

out_dir, names = Path(sys.argv[1]), sys.argv[2].split(",")
lengths = [int(t) for t in sys.argv[3].split(",")]
out_dir.mkdir(parents=True, exist_ok=True)
dev = torch.device("cuda")
REPS = 5
CASES = [("base", None, 1, 0)] + [
    (f"{strategy}/{layout}/P{P}/rank{r}", dict(layout=layout, linear_strategy=strategy), P, r)
    for strategy, layout, P, r in (("scan", "contiguous", 2, 0), ("scan", "contiguous", 2, 1),
                                   ("scan", "contiguous", 8, 1), ("scan", "zigzag", 2, 1),
                                   ("allgather", "zigzag", 8, 1))]


def issue_ms(step) -> float:
    """Host time to queue one step: the GPU is kept busy first so nothing waits on it."""
    big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    times = []
    for _ in range(REPS):
        torch.cuda.synchronize()
        for _ in range(12):
            big @ big  # ~20 ms of queued work: the step's launches never wait for the GPU
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


result, host = {}, io.StringIO()
for T in lengths:
    for op in names:
        xs = leaves(make_inputs(op, 1, T, 16, 128, torch.bfloat16, dev, seed=0))
        do = torch.randn(1, T, 16, 128, device=dev).to(torch.bfloat16)
        for case, kw, P, rank in CASES:
            sp = None if kw is None else SequenceParallel(comm=LocalCommunicator(P, rank), **kw)
            step = fwd_bwd_step(op, xs, do, sp, "auto")
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            eager = statistics.median(time_once(step, True) for _ in range(10))
            graph = graph_ms(step, 10)
            issue = issue_ms(step)
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
            key = f"{op}/{T}/{case}"
            result[key] = {"eager_ms": round(eager, 3), "graph_ms": round(graph, 3),
                           "issue_ms": round(issue, 3),
                           "device_us": round(sum(r[1] for r in rows), 1),
                           "launches": round(sum(r[2] for r in rows), 1), "kernels": rows}
            r = result[key]
            print(f"{op:>16} {T:6d} {case:<28} eager {eager:7.3f} graph {graph:7.3f} issue "
                  f"{issue:7.3f} ms; kernels {r['device_us']:8.1f} us, {r['launches']:5.1f} "
                  "launches", flush=True)
            if T == lengths[0] and case in ("base", "scan/contiguous/P8/rank1",
                                            "allgather/zigzag/P8/rank1"):
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(20):
                    step()
                pr.disable()
                torch.cuda.synchronize()
                host.write(f"==== {op} {T} {case}: 20 calls\n")
                for key in ("tottime", "cumulative"):
                    pstats.Stats(pr, stream=host).sort_stats(key).print_stats(40)
            (out_dir / "sp_profile.json").write_text(json.dumps(result, indent=1))
(out_dir / "sp_profile_host.txt").write_text(host.getvalue())
