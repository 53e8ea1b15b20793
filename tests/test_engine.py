"""The engines' shared machinery for sequence parallelism: the segment decays of the
state-only passes (against float64 sums token by token) and the SP plan's identity
shortcuts (each flag holds exactly when its index is the identity)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from seqpar.ops.linear import engine
from seqpar.parallel import SequenceParallel
from seqpar.parallel.linear import make_plan


def _offsets(rng: random.Random) -> tuple[int, ...]:
    """Packed sequence offsets: 1-5 sequences, lengths 0 (an empty document) to ~700."""
    lengths = [rng.choice([0, 1, 63, 64, 65, rng.randint(1, 700)]) for _ in range(rng.randint(1, 5))]
    if not any(lengths):
        lengths[-1] = 1
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return tuple(out)


@pytest.mark.parametrize("seed", range(12))
def test_segment_decays_match_float64_sums(seed, monkeypatch):
    rng = random.Random(seed)
    monkeypatch.setattr(engine, "SEGMENT", rng.choice([64, 128, 256]))
    offsets = _offsets(rng)
    seg = engine.Segments(offsets, torch.device("cpu"))
    feat = rng.choice([(3,), (2, 5)])
    g = -4 * torch.rand(1, offsets[-1], *feat, generator=torch.Generator().manual_seed(seed))
    # the kernels' G: cumulative sums in log2 units, restarting every CHUNK tokens of a
    # sequence; the decays add up its chunk totals
    x = g[0].double()
    G = torch.zeros_like(x)
    for a, b in zip(offsets, offsets[1:]):
        for c in range(a, b, engine.CHUNK):
            e = min(c + engine.CHUNK, b)
            G[c:e] = x[c:e].cumsum(0) / math.log(2)
    before, after, total = seg.decays(G.float()[None])
    bounds, first = seg.offsets, 0
    want_b, want_a, want_t = [], [], []
    for (a, b), count in zip(zip(offsets, offsets[1:]), seg.counts):
        want_t.append(x[a:b].sum(0))
        for s in range(first, first + count):
            want_b.append(x[a:bounds[s]].sum(0))
            want_a.append(x[bounds[s + 1]:b].sum(0))
        assert bounds[first] == a and bounds[first + count] == b
        assert all(0 < bounds[s + 1] - bounds[s] <= engine.SEGMENT or a == b
                   for s in range(first, first + count))
        first += count
    for got, want in ((before, want_b), (after, want_a), (total, want_t)):
        assert got.dtype == torch.float32 and got.shape == (len(want), *feat)
        torch.testing.assert_close(got.double(), torch.stack(want), rtol=1e-6, atol=5e-5)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("B,packed", [(1, False), (3, False), (1, True)])
def test_plan_identity_flags(layout, B, packed):
    from seqpar.parallel import LocalCommunicator

    T = 1024
    for world in (2, 4):
        for rank in range(world):
            sp = SequenceParallel(layout=layout, comm=LocalCommunicator(world, rank))
            geo = sp.geometry(T // world)
            offsets = (0, 5, 300, 301, 777, T) if packed else None
            plan = make_plan(geo, B, offsets)
            ix = plan.index("cpu")
            count = plan.seqs.count

            def is_id(t, size=count):
                return torch.equal(t, torch.arange(size))

            assert ix.heads_id == is_id(ix.heads)
            assert ix.tails_id == is_id(ix.tails)
            assert ix.all_whole == bool(ix.whole.all())
            assert ix.all_head == bool(ix.head.all())
            n_local = len(geo.chunks)
            assert ix.heads_fill == (is_id(ix.head_at, n_local * B) and is_id(ix.head_rows))
            same = count == plan.n_users
            assert ix.finals_id == (same and is_id(ix.final_rows) and is_id(ix.final_dst))
            assert ix.inits_id == (same and is_id(ix.init_rows) and is_id(ix.init_src))
            if not packed and layout == "contiguous" and 0 < rank:
                assert ix.heads_id and ix.tails_id and ix.heads_fill


@pytest.mark.parametrize("seed", range(6))
def test_segment_composition_matches_serial_fold(seed, monkeypatch):
    """compose: per sequence, the segments' affine maps applied in order; compose_backward:
    its adjoint for the entering state (against autograd through a serial fold)."""
    rng = random.Random(seed)
    monkeypatch.setattr(engine, "SEGMENT", 64)
    offsets = _offsets(rng)
    seg = engine.Segments(offsets, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    H, K, V = 2, 4, 3
    M = torch.randn(seg.n_seg, H, K, K, generator=gen, dtype=torch.float64) / 2
    C = torch.randn(seg.n_seg, H, K, V, generator=gen, dtype=torch.float64)
    D = torch.randn(seg.n_seg, H, K, V, generator=gen, dtype=torch.float64)
    Mc, Cc, lefts = seg.compose(M, C)
    first = 0
    S0 = torch.randn(len(offsets) - 1, H, K, V, generator=gen, dtype=torch.float64,
                     requires_grad=True)
    outs = []
    for n, count in enumerate(seg.counts):
        S = S0[n]
        for s in range(first, first + count):
            S = M[s] @ S + C[s]
        outs.append(S)
        want_M = torch.eye(K, dtype=torch.float64).expand(H, K, K)
        for s in range(first, first + count):
            want_M = M[s] @ want_M
        torch.testing.assert_close(Mc[n], want_M)
        first += count
    torch.testing.assert_close(Cc, torch.stack(outs).detach() - Mc @ S0.detach())
    # adjoint: D_s is the gradient of the state entering segment s + 1 from segment s's own
    # outputs, so the entering-state gradient of a sequence is its sum through the maps
    first, total = 0, 0
    for n, count in enumerate(seg.counts):
        S = S0[n]
        for s in range(first, first + count):
            total = total + (S * D[s]).sum()
            S = M[s] @ S + C[s]
        first += count
    want, = torch.autograd.grad(total, S0)
    torch.testing.assert_close(seg.compose_backward(lefts, D), want)


@pytest.mark.parametrize("strategy", ["scan", "allgather"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("transition", [(1, 1), (4, 1), (4, 4)])
def test_exchange_hands_kernels_dense_states(strategy, layout, transition):
    """The kernels read entering states and their gradients as dense arrays: whatever
    the strategy cuts them from, both directions of the exchange return contiguous
    (n_local, B, ...) stacks; and with every transition the identity, each entering state
    is the sum of the C of the chunks before it."""
    from seqpar.parallel import LocalCommunicator
    from seqpar.parallel.linear import exchange, exchange_backward

    B, H, K, V = 1, 2, 4, 3
    for world in (2, 4):
        for rank in range(world):
            sp = SequenceParallel(layout=layout, linear_strategy=strategy,
                                  comm=LocalCommunicator(world, rank))
            geo = sp.geometry(64)
            n_local = len(geo.chunks)
            identity = torch.eye(K) if transition[1] > 1 else torch.ones(*transition)
            M = identity.expand(n_local, B, H, *transition).contiguous()
            C = torch.randn(n_local, B, H, K, V)
            S_in, M_all = exchange(sp, geo, M, C)
            lam = exchange_backward(sp, geo, M, M_all, torch.randn(n_local, B, H, K, V))
            for x in (S_in, lam):
                assert x.shape == (n_local, B, H, K, V) and x.is_contiguous()
            if strategy == "allgather":
                # the stand-in gathers this rank's own (M, C) as every rank's
                for i, c in enumerate(geo.chunks):
                    # global chunk j came from local index 0, or 1 (zigzag, j >= P)
                    want = sum((C[int(j >= world)] for j in range(c)), torch.zeros_like(C[0]))
                    torch.testing.assert_close(S_in[i], want)
