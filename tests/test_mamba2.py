"""``ops.mamba2`` (Mamba-2's SSD scan on the diag engine) beyond what the catalogue-driven
tests of test_linear_ops.py check for every linear op.

Inputs come from the catalogue entry ``mamba2``. Checked against ``mamba2_reference``
(its own float64 recurrence): groups of B and C shared by 1, some or all heads, D per
head or per channel, ``dt_bias`` with ``dt_softplus``, packed documents, T = 1, initial
states, on the PyTorch chunk path and the Triton kernels (the interpreter on CPU); and
sequence parallelism on 2 and 4 gloo ranks (layouts x linear strategies, batch rows and
packed documents crossing shard edges), where outputs, final states and the gradients
of every input equal the single-process op within relative L2 1e-5 (replicated inputs,
A, D, dt_bias and the initial state, summed over ranks as a data-parallel all-reduce
would). The Mamba2 mixer with several groups (the generic layer tests build one group):
packed documents and the generation cache. Bad arguments raise ValueError naming them.
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
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import bound, grad_errors, rel_err
from seqpar import ops
from seqpar.ops import catalog
from seqpar.ops.catalog import state_parts

SPEC = catalog.get("mamba2")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def draw_inputs(gen, B, T, H, K, V, *, G, dtype, decay, D_shape, bias, cu=None):
    """The catalogue's inputs with G groups, plus the variations the catalogue does not
    draw: D per channel (H, V) and a dt_bias (with dt_softplus)."""
    xs = SPEC.make_inputs(B, T, H, K, V, dtype=dtype, generator=gen, cu_seqlens=cu, decay=decay, G=G)
    if D_shape == "HV":
        xs["D"] = torch.randn(H, V, generator=gen)
    elif D_shape is None:
        del xs["D"]
    if bias:
        xs["dt_bias"] = torch.randn(H, generator=gen)
    return xs


def _leaves(xs, dtype=None, device=None):
    return {n: x.to(device=device or x.device, dtype=dtype or x.dtype).detach().requires_grad_()
            for n, x in xs.items()}


def errors(case: dict, backend: str) -> dict:
    """Relative errors of ``mamba2`` (``backend``) against the float64 reference:
    output, final state and every input's gradient under a random linear loss."""
    c = case
    gen = torch.Generator().manual_seed(c["seed"])
    cu = None if not c["cuts"] else torch.tensor((0, *c["cuts"], c["T"]), dtype=torch.int32)
    B = 1 if cu is not None else c["B"]
    N = B if cu is None else len(cu) - 1
    xs = draw_inputs(gen, B, c["T"], c["H"], c["K"], c["V"], G=c["G"], dtype=c["dtype"],
                     decay=c["decay"], D_shape=c["D"], bias=c["bias"], cu=cu)
    s0 = SPEC.make_state(N, c["H"], c["K"], c["V"], generator=gen) if c["initial"] else None
    kw = dict(dt_softplus=c["bias"], output_final_state=True)

    xk = _leaves(xs, device=DEVICE)
    sk = None if s0 is None else s0.to(DEVICE).requires_grad_()
    o, S = ops.mamba2(**xk, initial_state=sk, cu_seqlens=None if cu is None else cu.to(DEVICE),
                      chunk_size=c.get("chunk", 16), backend=backend, **kw)
    xr = _leaves(xs, torch.float64)
    sr = None if s0 is None else s0.double().requires_grad_()
    o_ref, S_ref = ops.mamba2_reference(**xr, initial_state=sr, cu_seqlens=cu, **kw)
    assert o.dtype == c["dtype"] and o.shape == o_ref.shape and S.dtype == torch.float32

    wgen = torch.Generator().manual_seed(c["seed"] + 1)
    w = torch.randn(o.shape, generator=wgen).to(o.dtype).double()
    w2 = torch.randn(S.shape, generator=wgen, dtype=torch.float64)
    leaves = [*xk.values(), *([] if sk is None else [sk])]
    leaves_ref = [*xr.values(), *([] if sr is None else [sr])]
    g = torch.autograd.grad((o.double() * w.to(DEVICE)).sum() + (S.double() * w2.to(DEVICE)).sum(), leaves)
    g_ref = torch.autograd.grad((o_ref * w).sum() + (S_ref * w2).sum(), leaves_ref)
    names = [*xs, *([] if s0 is None else ["initial_state"])]
    return {"o": rel_err(o.cpu(), o_ref), "S": rel_err(S.cpu(), S_ref),
            **grad_errors(names, [x.cpu() for x in g], g_ref)}


def _assert_within(errs, dtype, case):
    tol = {n: bound(SPEC, n, dtype, TOL[dtype]) for n in errs}  # bf16: the catalogue entry's dt, A bounds
    bad = {n: e for n, e in errs.items() if not e < tol[n]}
    assert not bad, f"{case}: errors over {TOL[dtype]}: {bad} (all: {errs})"


@st.composite
def cases(draw, max_t=160):
    H = draw(st.sampled_from([2, 4]))
    T = draw(st.integers(1, max_t))
    packed = T > 1 and draw(st.booleans())
    cuts = tuple(sorted(draw(st.sets(st.integers(1, T - 1), min_size=1, max_size=3)))) if packed else ()
    G = draw(st.sampled_from([g for g in (1, 2, 4) if H % g == 0]))
    return dict(T=T, B=draw(st.integers(1, 2)), H=H, G=G,
                K=draw(st.sampled_from([4, 8, 16])), V=draw(st.sampled_from([4, 6, 16])), cuts=cuts,
                D=draw(st.sampled_from(["H", "HV", None])), bias=draw(st.booleans()),
                initial=draw(st.booleans()), decay=draw(st.sampled_from(SPEC.regimes)),
                dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
                chunk=draw(st.sampled_from([16, 32, 64])), seed=draw(st.integers(0, 2**31 - 1)))


FIXED = [
    # length 1 with every option; packed documents of 1 and more tokens with G = H.
    dict(T=1, B=2, H=4, G=2, K=8, V=6, cuts=(), D="HV", bias=True, initial=True, decay="strong",
         dtype=torch.float32, chunk=16, seed=1),
    dict(T=90, B=1, H=4, G=4, K=16, V=4, cuts=(1, 2, 40), D="H", bias=False, initial=True,
         decay="mild", dtype=torch.bfloat16, chunk=32, seed=2),
]


@settings(max_examples=15)
@given(case=cases())
@example(case=FIXED[0])
@example(case=FIXED[1])
def test_chunk_matches_reference(case):
    _assert_within(errors(case, "torch"), case["dtype"], case)


@pytest.mark.parametrize("case", [
    dict(T=70, B=2, H=2, G=1, K=16, V=16, cuts=(), D="H", bias=True, initial=True, decay="strong",
         dtype=torch.float32, seed=3),
    dict(T=50, B=1, H=4, G=2, K=16, V=8, cuts=(1, 20), D="HV", bias=False, initial=True,
         decay="mild", dtype=torch.bfloat16, seed=4),
], ids=["batch-strong-f32", "packed-groups-bf16"])
def test_triton_matches_reference(case):
    """backend='triton': simple GLA's kernels run the scan (compiled on a GPU, the
    interpreter on CPU)."""
    case = dict(case, seed=case["seed"] + int.from_bytes(os.urandom(2), "little"))
    _assert_within(errors(case, "triton"), case["dtype"], case)


def test_step_continues_forward():
    """Prefill with the chunk path, then ``mamba2_step`` per token: the same outputs and
    final state as one call over the whole sequence."""
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    B, T, H, K, V, s = 2, 21, 4, 8, 6, 9
    xs = draw_inputs(gen, B, T, H, K, V, G=2, dtype=torch.float32, decay="mild", D_shape="HV", bias=True)
    kw = dict(dt_softplus=True, output_final_state=True, chunk_size=8, backend="torch")
    o, S = ops.mamba2(**xs, **kw)
    head = {n: (x[:, :s] if n in SPEC.timed else x) for n, x in xs.items()}
    o_head, st_ = ops.mamba2(**head, **kw)
    outs = [o_head]
    for t in range(s, T):
        o_t, st_ = ops.mamba2_step(**SPEC.step_inputs(xs, t), state=st_, dt_softplus=True)
        outs.append(o_t[:, None])
    assert rel_err(torch.cat(outs, 1), o) < 1e-5 and rel_err(st_, S) < 1e-5


def test_layer_with_groups():
    """The Mamba2 mixer with 2 groups over 4 heads and d_state != head_dim (the generic
    layer tests build the default, one group): a packed batch equals its documents one by
    one, and prefill plus steps equals one forward."""
    from seqpar.layers import Mamba2

    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
        m = Mamba2(16, 4, 6, d_state=5, n_groups=2, chunk_size=4)
    x = torch.randn(1, 13, 16, generator=gen)
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    with torch.no_grad():
        y, _ = m(x, cu_seqlens=cu)
        docs = torch.cat([m(x[:, a:b])[0] for a, b in zip(cu.tolist(), cu.tolist()[1:])], 1)
        assert rel_err(y, docs) < 1e-5
        full, _ = m(x)
        parts, cache = m(x[:, :7], output_state=True)
        parts = [parts]
        for t in range(7, 13):
            yt, cache = m.step(x[:, t:t + 1], cache)
            parts.append(yt)
        assert rel_err(torch.cat(parts, 1), full) < 1e-5


BAD = [
    ("B groups", dict(B=torch.randn(1, 5, 3, 4)), ["B:", "dividing the H = 4 heads"]),
    ("C dtype", dict(C=torch.randn(1, 5, 2, 4, dtype=torch.float64)), ["C:", "float32", "float64"]),
    ("C shape", dict(C=torch.randn(1, 5, 2, 8)), ["C:", "(1, 5, 2, 4)", "(1, 5, 2, 8)"]),
    ("dt shape", dict(dt=torch.rand(1, 5, 2)), ["dt:", "(1, 5, 4)"]),
    ("A shape", dict(A=-torch.rand(1, 4)), ["A:", "(4)"]),
    ("D shape", dict(D=torch.randn(6)), ["D:", "(4,) or (4, 3)", "(6,)"]),
    ("dt_bias shape", dict(dt_bias=torch.randn(2)), ["dt_bias:", "(4)"]),
    ("dt_softplus", dict(dt_softplus=1), ["dt_softplus:", "bool", "int"]),
    ("x empty", dict(x=torch.randn(1, 0, 4, 3)), ["x:", "T >= 1"]),
]


@pytest.mark.parametrize("what,over,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_raise(what, over, needles):
    args = dict(x=torch.randn(1, 5, 4, 3), dt=torch.rand(1, 5, 4), A=-torch.rand(4),
                B=torch.randn(1, 5, 2, 4), C=torch.randn(1, 5, 2, 4))
    args.update(over)
    with pytest.raises(ValueError) as e:
        ops.mamba2(**args)
    assert all(n in str(e.value) for n in needles), str(e.value)


# ---------------------------------------------------------------- sequence parallelism

SP_T, SP_CHUNK = 24, 4
# Documents of a 24-token stream: one of a single token, some crossing shard edges at
# P = 2 and 4 in both layouts, and one starting exactly on an edge (12), or not.
PACKINGS = {"batch": None, "packed-edge": (0, 1, 10, 12, 13, 22, 24), "packed": (0, 1, 10, 14, 22, 24)}


def _prefix_ends(sp, T):
    """Global index after the last token of each rank's shard (its final state's point)."""
    n = sp.world * (2 if sp.layout == "zigzag" else 1)
    c = T // n
    return [(r + 1) * c if sp.layout == "contiguous" else (n - r) * c for r in range(sp.world)]


def sp_case(sp, spec, packing, seed, *, extra=None, sizes=None, **options):
    """A linear op of the catalogue under SP against the same op on the full sequence in
    this process: {name: max relative error over ranks} of the output, the final
    state(s) and every input's gradient.

    extra(gen, H, K, V): inputs added to the catalogue's; sizes: size overrides (e.g.
    G); options: more keywords of the op. Unpacked, each rank's final state is the
    state after its last token; packed, each rank returns the documents that end on it
    (zeros elsewhere), so they are compared summed over ranks."""
    from seqpar.parallel import shard

    gen = torch.Generator().manual_seed(seed)
    cu = None if PACKINGS[packing] is None else torch.tensor(PACKINGS[packing], dtype=torch.int32)
    B, H, K, V = (1 if cu is not None else 2), 4, 4, 6
    N = B if cu is None else len(cu) - 1
    xs = spec.make_inputs(B, SP_T, H, K, V, generator=gen, cu_seqlens=cu,
                          decay="strong" if "strong" in spec.regimes else "mild", **(sizes or {}))
    xs.update(extra(gen, H, K, V) if extra else {})
    s0 = state_parts(spec.make_state(N, H, K, V, generator=gen))
    w = torch.randn(B, SP_T, H, V, generator=gen)
    w2 = [torch.randn(p.shape, generator=gen) for p in s0]
    kw = dict(output_final_state=True, cu_seqlens=cu, chunk_size=SP_CHUNK, **options)

    def run(inputs, parts, **more):
        return spec.fn(**inputs, initial_state=parts[0] if len(parts) == 1 else tuple(parts),
                       **kw, **more)

    def state_loss(S):
        return sum((p * q).sum() for p, q in zip(state_parts(S), w2))

    ref, ref_s = _leaves(xs), [p.clone().requires_grad_() for p in s0]
    o_ref, S_ref = run(ref, ref_s)
    loss = (o_ref * w).sum() + state_loss(S_ref)
    if cu is None:
        # Every rank's final state (a prefix run) enters the loss the SP gradients are of.
        S_all = [run({n: (x[:, :e] if n in spec.timed else x) for n, x in ref.items()}, ref_s)[1]
                 for e in _prefix_ends(sp, SP_T)]
        loss = (o_ref * w).sum() + sum(state_loss(S_e) for S_e in S_all)
        S_ref = S_all[sp.rank]
    leaves_ref = [*ref.values(), *ref_s]
    g_ref = torch.autograd.grad(loss, leaves_ref)

    mine = {n: (shard(x, sp) if n in spec.timed else x).detach().requires_grad_() for n, x in xs.items()}
    my_s = [p.clone().requires_grad_() for p in s0]
    o, S = run(mine, my_s, sp=sp)
    leaves = [*mine.values(), *my_s]
    g = torch.autograd.grad((o * shard(w, sp)).sum() + state_loss(S), leaves, allow_unused=True)
    g = [torch.zeros_like(x) if d is None else d for d, x in zip(g, leaves)]

    errs = {}

    def add(name, got, want, summed=False):
        if summed:  # a replicated input's gradient, or packed final states
            got = got.detach().clone()
            dist.all_reduce(got, group=sp.group)
        e = torch.tensor(rel_err(got, want), dtype=torch.float64)
        dist.all_reduce(e, op=dist.ReduceOp.MAX, group=sp.group)
        errs[name] = e.item()

    add("o", o, shard(o_ref.detach(), sp))
    for i, (a, b) in enumerate(zip(state_parts(S), state_parts(S_ref))):
        add(f"S[{i}]", a, b.detach(), summed=cu is not None)
    names = [*xs, *(f"initial_state[{i}]" for i in range(len(s0)))]
    for name, d, d_ref in zip(names, g, g_ref):
        timed = name in spec.timed
        add(f"d{name}", d, shard(d_ref, sp) if timed else d_ref, summed=not timed)
    return errs


def mamba2_sp_case(sp, packing, seed):
    """Mamba-2 with 2 groups over 4 heads, D per head, dt_bias and dt_softplus."""
    return sp_case(sp, SPEC, packing, seed, sizes=dict(G=2), dt_softplus=True,
                   extra=lambda gen, H, K, V: {"dt_bias": torch.randn(H, generator=gen)})


def _sp_cases():
    return [(f"{layout}/{strategy}/{packing}", dict(layout=layout, strategy=strategy), packing)
            for layout in ("contiguous", "zigzag") for strategy in ("scan", "allgather")
            for packing in PACKINGS]


def _worker(rank, world, store_dir, path, seed):
    from seqpar.parallel import SequenceParallel

    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    out = {}
    for name, kw, packing in _sp_cases():
        try:
            out[name] = mamba2_sp_case(SequenceParallel(**kw), packing, seed)
        except Exception:  # noqa: BLE001 - reported by the test of this case
            out[name] = traceback.format_exc()
    torch.save(out, f"{path}.{rank}")
    dist.barrier()  # no rank tears its group down while a peer still talks to it
    dist.destroy_process_group()


_RESULTS: dict[int, dict] = {}


def sp_results(world):
    """Every SP case on ``world`` gloo ranks, once per session (fresh inputs each session)."""
    if world not in _RESULTS:
        seed = int.from_bytes(os.urandom(4), "little")
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "results.pt")
            mp.spawn(_worker, args=(world, d, path, seed), nprocs=world)
            per_rank = [torch.load(f"{path}.{r}") for r in range(world)]
        # An exception on any rank is the result; error tables agree across ranks.
        _RESULTS[world] = {n: next((r[n] for r in per_rank if isinstance(r[n], str)), per_rank[0][n])
                           for n in per_rank[0]}
        _RESULTS[world]["seed"] = seed
    return _RESULTS[world]


@pytest.mark.dist
@pytest.mark.parametrize("world,name", [(w, n) for w in (2, 4) for n, _, _ in _sp_cases()])
def test_sp_matches_single_process(world, name):
    res = sp_results(world)
    r = res[name]
    assert not isinstance(r, str), r
    over = {k: v for k, v in r.items() if not v < 1e-5}
    assert not over, f"{name} on {world} ranks (seed {res['seed']}): {over} (all: {r})"
