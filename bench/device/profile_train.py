"""Where one training step goes on the GPU: a torch.profiler table of a preset's steps
as ``seqpar train`` runs them (its Trainer, data and bf16 autocast), so work on the
trainer's speed targets what dominates.

Run on the device (repo root): ``python bench/device/profile_train.py OUT.json
[seqpar train options]``, e.g. ``--preset 125m``. Prints the wall time per step, the
GPU kernel time per step (their difference is time the GPU waits for the host), and the
operators and kernels with the most time per step; writes them to OUT.json.
"""
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from seqpar.train import Trainer, build_loaders, parse_args, prepare
from seqpar.train.distributed import setup, teardown


def main(out, argv, warm=3, reps=3):
    plan = prepare(parse_args(argv))
    env = setup(1)
    try:
        loader, _ = build_loaders(plan.cfg, plan.tokenizer, env)
        trainer = Trainer(plan.cfg, plan.model_cfg, env)
        batches = [loader.batch(i).to(env.device) for i in range(warm + reps)]
        cuda = env.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for b in batches[:warm]:
            trainer.step(b)
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            for b in batches[warm:]:
                trainer.step(b)
            sync()
            wall = (time.perf_counter() - t) / reps * 1e3
        events = prof.key_averages()
        kernels = sum(e.self_device_time_total for e in events) / reps / 1e3
        rows = [dict(name=e.key, cpu_ms=e.cpu_time_total / reps / 1e3,
                     self_device_ms=e.self_device_time_total / reps / 1e3, calls=e.count // reps)
                for e in events]
        top_device = sorted(rows, key=lambda r: -r["self_device_ms"])[:30]
        top_cpu = sorted(rows, key=lambda r: -r["cpu_ms"])[:30]
        print(f"step: wall {wall:.1f} ms, GPU kernels {kernels:.1f} ms "
              f"({plan.cfg.batch_size * plan.cfg.seq_len} tokens)")
        print("-- self GPU time per step")
        for r in top_device:
            print(f"{r['self_device_ms']:8.2f} ms {r['calls']:6d}x  {r['name'][:100]}")
        print("-- CPU time per step (inclusive)")
        for r in top_cpu:
            print(f"{r['cpu_ms']:8.2f} ms {r['calls']:6d}x  {r['name'][:100]}")
        with open(out, "w") as f:
            json.dump(dict(command="python bench/device/profile_train.py OUT.json " + " ".join(argv),
                           gpu=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                           date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           wall_ms_per_step=wall, kernel_ms_per_step=kernels,
                           top_device=top_device, top_cpu=top_cpu), f, indent=1)
    finally:
        teardown(env)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
