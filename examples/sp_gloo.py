"""Sequence parallelism on CPU with gloo: every op of the catalogue (seqpar.ops.catalog),
sharded over the ranks, against the same op on the full sequence in one process.

    torchrun --nproc-per-node 2 examples/sp_gloo.py
    torchrun --nproc-per-node 4 examples/sp_gloo.py --layout zigzag --linear-strategy allgather

Each rank draws the same full batch (the catalogue's inputs, same seed), keeps its shard
of the inputs laid out (B, T, ...) (weights and per-head parameters are shared), runs the
op with ``sp=``, and checks its output and the gradients of its shards against its slice
of the single-process result. Prints one line per op on rank 0: the largest relative L2
error over ranks and the bytes rank 0 sent.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

from seqpar.ops import catalog
from seqpar.parallel import SequenceParallel, shard


def rel(a, b):
    e = torch.tensor((a - b).norm().item() / max(b.norm().item(), 1e-30), dtype=torch.float64)
    dist.all_reduce(e, op=dist.ReduceOp.MAX)
    return e.item()


def check(spec, sp, inputs):
    """Run ``spec``'s op on the full inputs and, with ``sp``, on this rank's shards;
    compare its first output and the gradients of the sharded inputs under
    ``sum(output * weight)``."""
    timed = spec.timed

    def run(xs, sp):
        return spec.outputs_of(spec.fn(**xs, sp=sp))[0]

    full = {n: x.clone().requires_grad_() if n in timed else x for n, x in inputs.items()}
    out_ref = run(full, None)
    w = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1))
    (out_ref * w).sum().backward()
    mine = {n: shard(x, sp).requires_grad_() if n in timed else x for n, x in inputs.items()}
    sp.reset_bytes()
    out = run(mine, sp)
    (out * shard(w, sp)).sum().backward()
    err = max([rel(out, shard(out_ref.detach(), sp))]
              + [rel(mine[n].grad, shard(full[n].grad, sp)) for n in timed])
    if sp.rank == 0:
        print(f"{spec.name:18s} max rel. error {err:.1e}   rank 0 sent {sp.bytes_sent:8d} bytes")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])
    ap.add_argument("--linear-strategy", default="scan", choices=["scan", "allgather"])
    ap.add_argument("--attn-strategy", default=None, choices=["ring", "allgather", "alltoall"])
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    sp = SequenceParallel(layout=args.layout, linear_strategy=args.linear_strategy,
                          attn_strategy=args.attn_strategy)
    if sp.rank == 0:
        print(sp)
    gen = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, args.seq_len, 4, 16, 16
    for name in catalog.names(variants=False):
        spec = catalog.get(name)
        check(spec, sp, spec.make_inputs(B, T, H, K, V, generator=gen, L=T // 2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
