"""Sequence parallelism on 2- and 4-rank gloo groups on CPU.

Every op of :mod:`seqpar.ops.catalog` (inputs and states from there; every linear op,
so a new one joins) x strategy x layout, with B > 1, initial and final states and packed
documents crossing shard boundaries: on every rank, SP outputs, final states and the
gradients of every input equal the single-process op run on the full sequence in the
same worker, within relative L2 1e-5 in float32. Gradients of replicated inputs
(initial states, conv weights, kernels) are summed over the group first, as a
data-parallel all-reduce would. Also: bytes sent by the linear strategies do not depend
on T and, like the softmax ring's and all-gather's, match their closed forms; several SP
ops in one graph; the sharding helpers; bad setups raise on every rank.

One process group per world size runs every case (process start and ``import torch``
cost seconds each); the workers return error tables that the tests below read.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import (
    LINEAR,
    Checker,
    fresh_leaf,
    grads_or_zeros,
    linear_case,
    packed_offsets,
    prefix_ends,
)
from seqpar import ops
from seqpar.ops import catalog
from seqpar.parallel import SequenceParallel, shard, unshard

pytestmark = pytest.mark.dist

TOL = 1e-5
LAYOUTS = ("contiguous", "zigzag")


# ---------------------------------------------------------------- inputs and references

def compare(sp, fn, inputs, sharded, weights, seq_dims, replicated=()):
    """Run ``fn(*inputs, sp=None)`` on the full inputs and ``fn(*shards, sp=sp)`` on this
    rank's shards; compare every output (sharded along ``seq_dims[i]``) and the gradient
    of every input under the loss ``sum_i (out_i * weights[i]).sum()``.

    ``sharded[j]``: input j is split along T (dim 1); otherwise it is replicated and its
    gradient is summed over ranks. ``replicated``: names of outputs that each rank
    returns in part (summed over ranks before comparing).
    """
    full = [fresh_leaf(x) for x in inputs]
    outs_ref = fn(*full, sp=None)
    grads_ref = grads_or_zeros(sum((o * w).sum() for o, w in zip(outs_ref, weights)), full)
    mine = [fresh_leaf(shard(x, sp) if s else x) for x, s in zip(inputs, sharded)]
    outs = fn(*mine, sp=sp)
    loss = 0
    for o, w, d in zip(outs, weights, seq_dims):
        loss = loss + (o * (w if d is None else shard(w, sp, d))).sum()
    grads = grads_or_zeros(loss, mine)
    chk = Checker(sp)
    for i, (o, o_ref, d) in enumerate(zip(outs, outs_ref, seq_dims)):
        if d is None:
            (chk.add_summed if i in replicated else chk.add)(f"out{i}", o.detach(), o_ref.detach())
        else:
            chk.add(f"out{i}", o, shard(o_ref.detach(), sp, d))
    for j, (g, g_ref, s) in enumerate(zip(grads, grads_ref, sharded)):
        if s:
            chk.add(f"d{j}", g, shard(g_ref, sp))
        else:
            chk.add_summed(f"d{j}", g, g_ref)
    return chk.errs


def _sharded(spec, s):
    """For each of ``s.tensors``: whether it is split along T (laid out (B, T, ...))."""
    return [n in spec.timed for n in s.names]


def attn_case(sp, packed, causal, seed, T=24):
    gen = torch.Generator().manual_seed(seed)
    spec = catalog.get("softmax_attn")
    B, H, Hkv, D = (1, 8, 4, 8) if packed else (2, 8, 4, 8)
    s = spec.sample(B, T, H, D, D, generator=gen, Hkv=Hkv,
                    cu_seqlens=packed_offsets(sp) if packed else None)
    w = [torch.randn(B, T, H, D, generator=gen), torch.randn(B, H, T, generator=gen)]

    def fn(q, k, v, sp):
        return spec.fn(q, k, v, causal=causal, **s.kwargs, sp=sp)

    return compare(sp, fn, s.tensors, _sharded(spec, s), w, [1, 2])


def short_conv_case(sp, packed, seed, T=24, w=4):
    gen = torch.Generator().manual_seed(seed)
    spec = catalog.get("short_conv")
    B, C = (1, 6) if packed else (2, 6)
    s = spec.sample(B, T, 1, C, 1, generator=gen, C=C, W=w,
                    cu_seqlens=packed_offsets(sp) if packed else None)
    end = prefix_ends(sp, T)[sp.rank]

    def fn(x, weight, bias, init, sp):
        y, S = spec.fn(x, weight, bias, initial_state=init, output_final_state=True,
                       cu_seqlens=s.cu_seqlens, sp=sp)
        if sp is None and not packed:
            # This rank's final state is the state after its last token: a prefix run
            # (it depends on this rank's tokens only, so its gradient is local too).
            S = spec.fn(x[:, :end], weight, bias, initial_state=init, output_final_state=True)[1]
        return y, S

    wts = [torch.randn(B, T, C, generator=gen), torch.randn(s.initial_state.shape, generator=gen)]
    return compare(sp, fn, s.tensors, _sharded(spec, s), wts, [1, None],
                   replicated=(1,) if packed else ())


def long_conv_case(sp, packed, seed, T=24, L=17):
    gen = torch.Generator().manual_seed(seed)
    spec = catalog.get("long_conv")
    B, C = (1 if packed else 2), 8
    # documents crossing every shard boundary at P = 2 and 4, and a one-token document
    s = spec.sample(B, T, 1, C, 1, generator=gen, C=C, L=L,
                    cu_seqlens=(0, 5, 6, 19, T) if packed else None)

    def fn(x, kernel, sp):
        return (spec.fn(x, kernel, **s.kwargs, sp=sp),)

    return compare(sp, fn, s.tensors, _sharded(spec, s), [torch.randn(B, T, C, generator=gen)], [1])


def hybrid_case(sp, seed, T=24):
    """Several SP ops in one graph (short conv -> GLA -> softmax attention), as a hybrid
    layer stack uses them: backward runs each op's exchange in reverse on every rank."""
    gen = torch.Generator().manual_seed(seed)
    B, H, K = 2, 4, 4
    conv = catalog.get("short_conv").make_inputs(B, T, H, K, K, W=3, generator=gen)
    g = catalog.get("gla").make_inputs(B, T, H, K, K, generator=gen)["g"]

    def fn(x, weight, bias, g, sp):
        # contiguous(): ops.softmax_attn (single device) returns wrong results for keys
        # with the strides of this view (a transposed conv output); reported, not ours.
        h = ops.short_conv(x, weight, bias, sp=sp)[0].view(B, -1, H, K).contiguous()
        o = ops.gla(h, h, h, g, chunk_size=4, sp=sp)[0]
        # Normalized queries and keys (as with QK-norm) keep the softmax well conditioned.
        return (ops.softmax_attn(F.normalize(o, dim=-1), F.normalize(h, dim=-1), o, sp=sp)[0],)

    return compare(sp, fn, [*conv.values(), g], [True, False, False, True],
                   [torch.randn(B, T, H, K, generator=gen)], [1])


def _bytes_of(sp, run):
    sp.reset_bytes()
    run()
    return dict(sp.bytes_by_op)


def traffic_case(sp, seed):
    """Bytes per rank: the linear strategies' do not depend on T; softmax ring and
    all-gather match their closed forms. Returns relative deviations (0 is exact)."""
    gen = torch.Generator().manual_seed(seed)
    P, out = sp.world, {}
    B, H, K, V = 2, 2, 4, 6
    for op in ("gla", "gated_delta_rule"):
        spec = catalog.get(op)
        got = []
        for T in (8 * P, 24 * P):
            xs = {n: fresh_leaf(shard(x, sp)) for n, x in spec.make_inputs(B, T, H, K, V, generator=gen).items()}

            def run():
                o, S = spec.fn(**xs, output_final_state=True, sp=sp)  # noqa: B023
                (o.sum() + S.sum()).backward()
            got.append(_bytes_of(sp, run))
        # Closed forms: a (B, H, K, V) float32 state per chunk boundary whose far side is
        # on another rank ('scan'; forward to the next chunk, backward to the previous),
        # or every local chunk's (M, C) / adjoint to the P - 1 others ('allgather').
        geo = sp.geometry(8)
        state, m = B * H * K * V * 4, B * H * K * (K if op == "gated_delta_rule" else 1) * 4
        n, mine = geo.n_chunks, geo.chunks
        if sp.linear_strategy == "scan":
            want = {"linear": state * sum(c + 1 < n and geo.owner(c + 1) != sp.rank for c in mine),
                    "linear.backward": state * sum(c > 0 and geo.owner(c - 1) != sp.rank for c in mine)}
        else:
            want = {"linear": (P - 1) * len(mine) * (state + m), "linear.backward": (P - 1) * len(mine) * state}
        for key in ("linear", "linear.backward"):
            a, b = got[0].get(key, 0), got[1].get(key, 0)
            out[f"{op} {key} bytes T-independent"] = abs(a - b) / max(a, 1)
            out[f"{op} {key} bytes closed form"] = abs(a - want[key]) / max(want[key], 1)
    T, Hq, Hkv, D = 8 * P, 4, 2, 8
    attn = catalog.get("softmax_attn")
    q, k, v = (fresh_leaf(shard(x, sp)) for x in attn.make_inputs(B, T, Hq, D, D, Hkv=Hkv, generator=gen).values())
    got = _bytes_of(sp, lambda: attn.fn(q, k, v, sp=sp)[0].sum().backward())
    kv = (k.numel() + v.numel()) * 4
    fwd = (P - 1) * kv
    bwd = (P - 1) * kv + (P * kv if sp.attn_strategy == "ring" else 0)
    out["attn fwd bytes closed form"] = abs(got.get("softmax_attn", 0) - fwd) / fwd
    out["attn bwd bytes closed form"] = abs(got.get("softmax_attn.backward", 0) - bwd) / bwd
    return out


def _raises(fn, *needles):
    """0.0 if ``fn()`` raises ValueError whose message contains every needle, else 1.0."""
    try:
        fn()
    except ValueError as e:
        return float(not all(n in str(e) for n in needles))
    return 1.0


def errors_case(sp):
    """Bad setups raise ValueError naming the problem and the fix, on every rank."""
    P, r = sp.world, sp.rank
    zig = SequenceParallel(layout="zigzag", strategy="alltoall")
    con = SequenceParallel(layout="contiguous")
    x = torch.randn(1, 5, 2, 4)
    g = torch.zeros(1, 5, 2)
    out = {
        "zigzag odd shard": _raises(lambda: ops.simple_gla(x, x, x, g, sp=zig), "even shard length", "2 P"),
        "shard T % P": _raises(lambda: shard(torch.randn(1, 4 * P + 1, 3), con), "divisible by", "padded"),
        "shard T % 2P zigzag": _raises(lambda: shard(torch.randn(1, 3 * P, 3), zig), f"divisible by {2 * P}"),
        "alltoall H % P": _raises(lambda: ops.softmax_attn(*[torch.randn(1, 4, P + 1, 8)] * 3, sp=zig),
                                  "divisible by the SP world size", "'ring'"),
        "long_conv C % P": _raises(lambda: ops.long_conv(torch.randn(1, 4, P + 1), torch.randn(P + 1, 3), sp=con),
                                   "divisible by the SP world size"),
        "long_conv cu_seqlens past the global length": _raises(
            lambda: ops.long_conv(torch.randn(1, 4, 2 * P), torch.randn(2 * P, 3), sp=con,
                                  cu_seqlens=torch.tensor([0, 2, 4 * P + 1], dtype=torch.int32)),
            "cu_seqlens"),
        "short_conv halo too wide": _raises(lambda: ops.short_conv(torch.randn(1, 2, 3), torch.randn(3, 4), sp=con),
                                            "w - 1 <= 2"),
        "shard shapes differ": _raises(lambda: ops.linear_attn(*[torch.randn(1, 4 + 2 * r, 2, 4)] * 3, sp=con),
                                       "same shard shapes", "rank 1: T/P=6"),
        "packed cu_seqlens differ": _raises(
            lambda: ops.linear_attn(*[torch.randn(1, 4, 2, 4)] * 3, sp=con,
                                    cu_seqlens=torch.tensor([0, 1 + (r % 2), 4 * P], dtype=torch.int32)),
            "same shard shapes"),
        "bad argument on one rank only": _raises(
            lambda: ops.linear_attn(*[torch.randn(1, 4, 2, 4)] * 3, sp=con,
                                    initial_state=torch.randn(1, 2, 4, 4 + (r == 0))),
            *(["initial_state"] if r == 0 else ["ValueError on rank(s) [0]"])),
        "strategy unknown": _raises(lambda: SequenceParallel(strategy="tree"), "strategy", "'scan'"),
        "strategy conflict": _raises(lambda: SequenceParallel(strategy="ring", attn_strategy="alltoall"),
                                     "attn_strategy"),
    }
    return out


def helpers_case(sp, T=24):
    """shard / unshard round trip, global positions (restarting per document) and the
    per-rank pieces of packed documents, against direct computations."""
    from seqpar.parallel import local_cu_seqlens, position_ids, shard_documents
    x = torch.arange(2 * T).view(1, T, 2).float()
    xs = shard(x, sp)
    out = {"unshard(shard(x)) == x": float(not torch.equal(unshard(xs, sp), x))}
    cu = packed_offsets(sp)
    doc_pos = torch.cat([torch.arange(b - a) for a, b in zip(cu.tolist(), cu[1:].tolist())])
    pos = position_ids(sp, T, cu)
    out["position_ids packed"] = float(not torch.equal(pos, shard(doc_pos[None], sp)[0]))
    out["position_ids"] = float(not torch.equal(position_ids(sp, T), shard(torch.arange(T)[None], sp)[0]))
    pieces = shard_documents(sp, cu)
    doc_of = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())
    mine = shard(doc_of[None], sp)[0]
    local = local_cu_seqlens(sp, cu).tolist()
    ok = local[0] == 0 and local[-1] == T // sp.world and len(local) == len(pieces) + 1
    for p, a, b in zip(pieces, local, local[1:]):
        ok = ok and p.local == a and b - a == p.end - p.start and bool((mine[a:b] == p.doc).all())
    out["shard_documents / local_cu_seqlens"] = float(not ok)
    return out


# ---------------------------------------------------------------- workers

def _cases(world, triton=False):
    """(name, fn(sp) -> errors or bytes) for one world size: the PyTorch path's cases, or
    (``triton``) the interpreted Triton kernels' (a group of their own: they are slow)."""
    out = []
    if triton:
        # The Triton kernels (interpreted on CPU) under SP: 512 tokens, 128 per chunk, cut
        # into state-only segments of 64 (engine.SEGMENT, set by the worker).
        for layout in LAYOUTS:
            for spec in LINEAR:
                for packed in (False, True):
                    name = f"triton/{spec.name}/scan/{layout}/{'packed' if packed else 'batch'}"
                    out.append((name, dict(layout=layout, strategy="scan"),
                                lambda sp, spec=spec, packed=packed: linear_case(
                                    sp, spec, packed, seed=world, T=512, backend="triton")))
        return out
    for layout in LAYOUTS:
        for strategy in ("scan", "allgather"):
            for spec in LINEAR:
                for packed in (False, True):
                    name = f"linear/{spec.name}/{strategy}/{layout}/{'packed' if packed else 'batch'}"
                    out.append((name, dict(layout=layout, strategy=strategy),
                                lambda sp, spec=spec, packed=packed: linear_case(sp, spec, packed, seed=world)))
        for strategy in ("ring", "allgather", "alltoall"):
            for packed, causal in ((False, True), (True, True), (False, False)):
                name = f"attn/{strategy}/{layout}/{'packed' if packed else 'batch'}/causal={causal}"
                out.append((name, dict(layout=layout, strategy=strategy),
                            lambda sp, p=packed, c=causal: attn_case(sp, p, c, seed=world)))
        for packed in (False, True):
            out.append((f"short_conv/{layout}/{'packed' if packed else 'batch'}", dict(layout=layout),
                        lambda sp, p=packed: short_conv_case(sp, p, seed=world)))
        for packed in (False, True):
            out.append((f"long_conv/{layout}/{'packed' if packed else 'batch'}", dict(layout=layout),
                        lambda sp, p=packed: long_conv_case(sp, p, seed=world)))
        out.append((f"hybrid/{layout}", dict(layout=layout), lambda sp: hybrid_case(sp, seed=world)))
        out.append((f"helpers/{layout}", dict(layout=layout), helpers_case))
        for lin, att in (("scan", "ring"), ("allgather", "allgather")):
            out.append((f"traffic/{lin}+{att}/{layout}",
                        dict(layout=layout, linear_strategy=lin, attn_strategy=att),
                        lambda sp: traffic_case(sp, seed=world)))
    out.append(("errors", dict(), errors_case))
    return out


def _worker(rank, world, store_dir, results, triton=False):
    # Kernel modules are imported on first use, after this: their kernels run interpreted.
    os.environ["TRITON_INTERPRET"] = "1"
    from seqpar.ops.linear import engine
    engine.SEGMENT = 64
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    torch.set_num_threads(1)
    out = {}
    for name, kw, fn in _cases(world, triton):
        try:
            out[name] = fn(SequenceParallel(**kw))
        except Exception:  # noqa: BLE001 - reported by the test of this case
            out[name] = traceback.format_exc()
    torch.save(out, f"{results}.{rank}")
    dist.barrier()  # no rank tears its group down while a peer still talks to it
    dist.destroy_process_group()


def _merge(per_rank):
    """One table: a case's error tables agree across ranks (reduced); an exception on
    any rank wins, the first rank's unless it is a timeout caused by another rank."""
    out = {}
    for name in per_rank[0]:
        errs = [r[name] for r in per_rank if isinstance(r[name], str)]
        errs.sort(key=lambda e: "imeout" in e or "imed out" in e)
        out[name] = errs[0] if errs else per_rank[0][name]
    return out


_RESULTS: dict[int, dict] = {}


def results(world, triton=False):
    """Run every case of a group on ``world`` gloo ranks once per session."""
    key = (world, triton)
    if key not in _RESULTS:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "results.pt")
            mp.spawn(_worker, args=(world, d, path, triton), nprocs=world)
            _RESULTS[key] = _merge([torch.load(f"{path}.{r}") for r in range(world)])
    return _RESULTS[key]


@pytest.mark.parametrize("world,name", [
    *[(w, n) for w in (2, 4) for n, _, _ in _cases(w)],
    *[pytest.param(2, n, marks=pytest.mark.slow) for n, _, _ in _cases(2, triton=True)]])
def test_sp(world, name):
    """One case on every rank of a ``world``-rank gloo group: every reported error
    (relative L2 error of an output or gradient, or a failed check as 1.0) below 1e-5."""
    r = results(world, name.startswith("triton/"))[name]
    assert not isinstance(r, str), r
    over = {k: v for k, v in r.items() if not v < TOL}
    assert not over, f"{name} on {world} ranks: {over} (all: {r})"


def test_uninitialized_group_raises():
    """Checked in a fresh interpreter, where no process group can exist yet (this
    process may hold one from another test)."""
    code = ("from seqpar.parallel import SequenceParallel\n"
            "try:\n    SequenceParallel()\nexcept ValueError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "init_process_group" in r.stdout, r.stdout + r.stderr[-2000:]
