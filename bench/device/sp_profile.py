"""Where one simulated SP rank's forward+backward spends its time on the GPU: a
torch.profiler table (CPU and CUDA time per op) of ``ops.<op>`` at ``T_local`` tokens,
with and without SP (LocalCommunicator), for finding per-call overhead.

    python bench/device/sp_profile.py linear_attn 8192
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from seqpar.bench.sp import _fwd_bwd, _leaves, make_inputs
from seqpar.parallel import LocalCommunicator, SequenceParallel

op, T = sys.argv[1], int(sys.argv[2])
dev = torch.device("cuda")
xs = _leaves(make_inputs(op, 1, T, 16, 128, torch.bfloat16, dev, seed=0))
do = torch.randn(1, T, 16, 128, device=dev).to(torch.bfloat16)
for name, sp in (("base", None), ("sp", SequenceParallel(comm=LocalCommunicator(2, 1)))):
    step = _fwd_bwd(op, xs, do, sp, "auto")
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"==== {op} T={T} {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
