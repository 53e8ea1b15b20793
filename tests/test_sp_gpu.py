"""Sequence parallelism through the GPU kernels: the linear family's Triton kernels, and
softmax attention's cuDNN (or flash) blocks.

2 and 4 gloo processes share one CUDA device (the communicator stages tensors through
host memory), so one GPU checks what the CPU tests check under the interpreter, at
lengths where every shard spans many chunks and several state-only segments: for every
linear op of the catalogue (conftest.py's ``linear_case``: the catalogue's inputs and the
error table test_parallel.py checks on gloo), on every rank, outputs, final states and the gradients of every input
(replicated ones and initial states summed over ranks) equal the single-device op on
the whole sequence, float32, relative L2. Softmax attention (ring, all-gather and
all-to-all, both layouts, batch and packed, bfloat16 with head dims cuDNN takes) matches
the float64 reference in o, lse and every gradient within bfloat16 rounding.
"""
from __future__ import annotations

import os
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import LINEAR, linear_case, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = 2e-4  # float32 inputs: three-pass tf32 products in the kernels
T, DIMS = 4096, (2, 64, 64)  # (H, K, V)
# Packed documents: one of 5 tokens, others crossing shard edges at P = 2 and 4.
OFFSETS = (0, 5, 1500, 2048, 2100, 3999, T)


def _worker(rank, world, store, path, kind):
    from seqpar.ops.linear import engine
    from seqpar.parallel import SequenceParallel

    engine.SEGMENT = 512  # several state-only segments per shard
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    out = _attention_cases(world) if kind == "attention" else {}
    for layout in ("contiguous", "zigzag") if kind == "linear" else ():
        for strategy in ("scan", "allgather"):
            for spec in LINEAR:
                for packed in (False, True):
                    name = f"{spec.name}/{strategy}/{layout}/{'packed' if packed else 'batch'}"
                    try:
                        sp = SequenceParallel(layout=layout, strategy=strategy)
                        out[name] = linear_case(sp, spec, packed, seed=world, T=T, chunk_size=64,
                                                backend="auto", dims=DIMS, offsets=OFFSETS,
                                                device="cuda")
                    except Exception:  # noqa: BLE001 -- reported by the test
                        out[name] = traceback.format_exc()
    torch.save(out, f"{path}.{rank}")
    dist.barrier()  # no rank tears its group down while a peer still talks to it
    dist.destroy_process_group()


ATTN_T, ATTN_DIMS = 2048, (4, 4, 64)  # (H, Hkv, D): shapes cuDNN takes
ATTN_TOL = 2e-2  # bfloat16 inputs


def _attention_cases(world):
    """softmax_attn under SP against the float64 reference on the whole sequence: the
    relative errors of this rank's o, lse and q, k, v gradients."""
    from seqpar import ops
    from seqpar.parallel import SequenceParallel, shard

    H, Hkv, D = ATTN_DIMS
    gen = torch.Generator().manual_seed(world)
    x = [torch.randn(1, ATTN_T, h, D, generator=gen) for h in (H, Hkv, Hkv)]
    w = [torch.randn(1, ATTN_T, H, D, generator=gen), torch.randn(1, H, ATTN_T, generator=gen)]
    out = {}
    for packed in (False, True):
        cu = torch.tensor(OFFSETS, dtype=torch.int32) * ATTN_T // T if packed else None
        xr = [t.double().requires_grad_() for t in x]
        ref = ops.softmax_attn_reference(*xr, causal=True, cu_seqlens=cu)
        g_ref = torch.autograd.grad(sum((o * v.double()).sum() for o, v in zip(ref, w)), xr)
        for layout in ("contiguous", "zigzag"):
            for strategy in ("ring", "allgather", "alltoall"):
                name = f"softmax_attn/{strategy}/{layout}/{'packed' if packed else 'batch'}"
                try:
                    sp = SequenceParallel(layout=layout, attn_strategy=strategy)
                    mine = [shard(t, sp).cuda().bfloat16().requires_grad_() for t in x]
                    o, lse = ops.softmax_attn(*mine, causal=True, sp=sp,
                                              cu_seqlens=None if cu is None else cu.cuda())
                    loss = (o.float() * shard(w[0], sp).cuda()).sum() + \
                        (lse * shard(w[1], sp, 2).cuda()).sum()
                    g = torch.autograd.grad(loss, mine)
                    errs = {"o": rel_err(o.cpu(), shard(ref[0], sp)),
                            "lse": rel_err(lse.cpu(), shard(ref[1], sp, 2))}
                    errs.update({f"d{n}": rel_err(a.cpu(), shard(b, sp))
                                 for n, a, b in zip("qkv", g, g_ref)})
                    out[name] = errs
                except Exception:  # noqa: BLE001 -- reported by the test
                    out[name] = traceback.format_exc()
    return out


_RESULTS: dict = {}


def _worst(per_rank):
    """One table over the ranks: a failure on any rank, else each error's largest value."""
    out = {}
    for name in per_rank[0]:
        tables = [r[name] for r in per_rank]
        fails = [t for t in tables if isinstance(t, str)]
        out[name] = fails[0] if fails else {k: max(t[k] for t in tables) for k in tables[0]}
    return out


def _results(world, kind):
    if (world, kind) not in _RESULTS:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "r.pt")
            mp.spawn(_worker, args=(world, os.path.join(d, "store"), path, kind), nprocs=world)
            _RESULTS[world, kind] = _worst([torch.load(f"{path}.{r}") for r in range(world)])
    return _RESULTS[world, kind]


@pytest.mark.parametrize("world", [2, 4])
def test_sp_triton_matches_one_device(world):
    res = _results(world, "linear")
    bad = {k: v for k, v in res.items() if isinstance(v, str) or max(v.values()) > TOL}
    worst = max((max(v.values()) for v in res.values() if not isinstance(v, str)), default=None)
    assert not bad, f"{len(bad)} of {len(res)} cases fail (worst passing {worst}): {bad}"


@pytest.mark.parametrize("world", [2, 4])
def test_sp_softmax_attn_matches_reference(world):
    res = _results(world, "attention")
    bad = {k: v.strip().splitlines()[-1] if isinstance(v, str) else v for k, v in res.items()
           if isinstance(v, str) or max(v.values()) > ATTN_TOL}
    assert len(res) == 12 and not bad, f"{len(bad)} of {len(res)} cases fail: {bad}"
    print({k: round(max(v.values()), 5) for k, v in res.items()})
