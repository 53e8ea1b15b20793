"""Sequence parallelism on CPU with gloo: every mixer, sharded over the ranks, against
the same op on the full sequence in one process.

    torchrun --nproc-per-node 2 examples/sp_gloo.py
    torchrun --nproc-per-node 4 examples/sp_gloo.py --layout zigzag --linear-strategy allgather

Each rank builds the same full batch (same seed), keeps its shard, runs the ops with
``sp=``, and checks its outputs and input gradients against its slice of the
single-process result. Prints one line per op on rank 0: the largest relative L2 error
over ranks and the bytes rank 0 sent.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar import ops
from seqpar.parallel import SequenceParallel, shard


def rel(a, b):
    e = torch.tensor((a - b).norm().item() / max(b.norm().item(), 1e-30), dtype=torch.float64)
    dist.all_reduce(e, op=dist.ReduceOp.MAX)
    return e.item()


def check(name, sp, fn, inputs):
    """Run ``fn`` on the full inputs and, with ``sp``, on this rank's shards; compare
    outputs and the gradients of ``sum(output * weight)``."""
    full = [x.clone().requires_grad_() for x in inputs]
    out_ref = fn(*full, sp=None)
    w = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1))
    (out_ref * w).sum().backward()
    mine = [shard(x, sp).requires_grad_() for x in inputs]
    sp.reset_bytes()
    out = fn(*mine, sp=sp)
    (out * shard(w, sp)).sum().backward()
    err = max([rel(out, shard(out_ref.detach(), sp))]
              + [rel(m.grad, shard(f.grad, sp)) for m, f in zip(mine, full)])
    if sp.rank == 0:
        print(f"{name:18s} max rel. error {err:.1e}   rank 0 sent {sp.bytes_sent:8d} bytes")


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
    q, k = torch.randn(B, T, H, K, generator=gen), F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 4)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen))
    x = torch.randn(B, T, H * K, generator=gen)

    check("gated_delta_rule", sp, lambda q, k, v, g, beta, sp: ops.gated_delta_rule(q, k, v, g, beta, sp=sp)[0],
          [q, k, v, g, beta])
    check("simple_gla", sp, lambda q, k, v, g, sp: ops.simple_gla(q, k, v, g, sp=sp)[0], [q, k, v, g])
    check("softmax_attn", sp, lambda q, k, v, sp: ops.softmax_attn(q, k, v, sp=sp)[0], [q, k, v])
    weight = torch.randn(H * K, 4, generator=gen)
    check("short_conv", sp, lambda x, sp: ops.short_conv(x, weight, sp=sp)[0], [x])
    kernel = torch.randn(H * K, T // 2, generator=gen) / T
    check("long_conv", sp, lambda x, sp: ops.long_conv(x, kernel, sp=sp), [x])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
