"""Sequence parallelism of the linear family through the Triton kernels on a real GPU.

2 and 4 gloo processes share one CUDA device (the communicator stages tensors through
host memory), so one GPU checks what the CPU tests check under the interpreter, at
lengths where every shard spans many chunks and several state-only segments: for every
linear op of the catalogue (conftest.py's ``linear_case``: the catalogue's inputs and the
error table test_parallel.py checks on gloo), on every rank, outputs, final states and the gradients of every input
(replicated ones and initial states summed over ranks) equal the single-device op on
the whole sequence, float32, relative L2.
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

from conftest import LINEAR, linear_case

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOL = 2e-4  # float32 inputs: three-pass tf32 products in the kernels
T, DIMS = 4096, (2, 64, 64)  # (H, K, V)
# Packed documents: one of 5 tokens, others crossing shard edges at P = 2 and 4.
OFFSETS = (0, 5, 1500, 2048, 2100, 3999, T)


def _worker(rank, world, store, path):
    from seqpar.ops.linear import engine
    from seqpar.parallel import SequenceParallel

    engine.SEGMENT = 512  # several state-only segments per shard
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    out = {}
    for layout in ("contiguous", "zigzag"):
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


_RESULTS: dict = {}


def _results(world):
    if world not in _RESULTS:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "r.pt")
            mp.spawn(_worker, args=(world, os.path.join(d, "store"), path), nprocs=world)
            _RESULTS[world] = torch.load(f"{path}.0")
    return _RESULTS[world]


@pytest.mark.parametrize("world", [2, 4])
def test_sp_triton_matches_one_device(world):
    res = _results(world)
    bad = {k: v for k, v in res.items() if isinstance(v, str) or max(v.values()) > TOL}
    worst = max((max(v.values()) for v in res.values() if not isinstance(v, str)), default=None)
    assert not bad, f"{len(bad)} of {len(res)} cases fail (worst passing {worst}): {bad}"
