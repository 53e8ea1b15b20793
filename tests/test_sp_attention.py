"""The block schedule of SP softmax attention (ring and all-gather), on one process with
``LocalCommunicator``: under zigzag every ring step is one kernel call, and the calls of
a rank cover exactly its share of the causal mask, so the work is balanced across ranks.
Exactness against one device is checked on gloo in test_parallel.py."""
from __future__ import annotations

import importlib

import pytest
import torch

from seqpar import ops
from seqpar.parallel import LocalCommunicator, SequenceParallel

sp_attn = importlib.import_module("seqpar.parallel.attention")


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
@pytest.mark.parametrize("P", [2, 4])
def test_zigzag_ring_step_is_one_call(monkeypatch, strategy, P):
    calls = []
    real = sp_attn.attn_block_forward

    def counting(q, k, v, *, causal, scale):
        calls.append((q.shape[1], k.shape[1], causal))
        return real(q, k, v, causal=causal, scale=scale)

    monkeypatch.setattr(sp_attn, "attn_block_forward", counting)
    Tl, c = 16, 8  # shard length; zigzag chunk length
    areas = []
    for r in range(P):
        calls.clear()
        sp = SequenceParallel(layout="zigzag", attn_strategy=strategy,
                              comm=LocalCommunicator(P, r))
        q, k, v = (torch.randn(1, Tl, 2, 8) for _ in range(3))
        ops.softmax_attn(q, k, v, causal=True, sp=sp)
        assert len(calls) == P, (r, calls)
        assert calls[0] == (Tl, Tl, True), "a shard's own keys: one causal block"
        # causal blocks are square and count half (plus the diagonal)
        areas.append(sum(a * (a + 1) // 2 if m else a * b for a, b, m in calls))
    # every rank: chunks r and 2P-1-r see 2P chunks of keys between them
    full = (2 * P) * c * c - c * c + c * (c + 1)
    assert areas == [full] * P
