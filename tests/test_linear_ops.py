"""The linear family's PyTorch chunk path against its float64 token-loop references.

Every linear op of :mod:`seqpar.ops.catalog` (its inputs, states and value regimes come
from there): outputs, final states and the gradient of every input (q, k, v, gates,
beta, mLSTM's i/f, Mamba-2's dt, A, D, initial states) within the precision contract of
docs/design.md (relative L2 1e-4 in float32, 2e-2 with bf16 inputs against the reference
on the same bf16 values in float64), over hypothesis-drawn shapes: ragged T (1..300,
rarely a multiple of the chunk), chunk sizes 16/32/64, K != V, B > 1, packed documents,
initial/final states, every regime the op has (mild and strong decays, mLSTM's active
normalizer). And every step replays the chunk outputs token by token.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import bound, grad_errors, rel_err
from seqpar.ops import catalog
from seqpar.ops.catalog import state_parts

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


# Every linear-family op of the catalogue, variants (retention's constant decay) included.
SPECS = [catalog.get(n) for n in catalog.names("linear")]


@dataclass(frozen=True)
class Case:
    T: int
    B: int
    H: int
    K: int
    V: int
    chunk_size: int
    cuts: tuple  # packed document boundaries inside (0, T); () means not packed
    packed: bool
    initial: bool
    final: bool
    regime: str  # a catalogue regime; ops without it run 'strong'
    dtype: torch.dtype
    seed: int


@st.composite
def cases(draw, max_t=300, max_bth=900, packing=True):
    T = draw(st.integers(1, max_t))
    packed = packing and draw(st.booleans())
    cuts = ()
    if packed and T > 1:
        cuts = tuple(sorted(draw(st.sets(st.integers(1, T - 1), max_size=3))))
    # Keep B*T*H modest: the float64 references loop over tokens in Python. H >= 2: with
    # a single head and T = 1 an output is one dot product times v, whose relative
    # round-off is unbounded when the dot product nearly cancels.
    B = 1 if packed else draw(st.integers(1, max(1, min(3, max_bth // (2 * T)))))
    H = draw(st.integers(2, max(2, min(4, max_bth // (B * T)))))
    K = draw(st.sampled_from([4, 8, 16]))
    V = draw(st.sampled_from([v for v in (4, 8, 12, 16) if v != K]))
    return Case(T=T, B=B, H=H, K=K, V=V, chunk_size=draw(st.sampled_from([16, 32, 64])),
                cuts=cuts, packed=packed, initial=draw(st.booleans()), final=draw(st.booleans()),
                regime=draw(st.sampled_from(catalog.REGIMES)),
                dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])),
                seed=draw(st.integers(0, 2**31 - 1)))


# Cases every run must cover, whatever hypothesis draws.
FIXED = [
    Case(T=1, B=2, H=2, K=8, V=4, chunk_size=64, cuts=(), packed=False, initial=True, final=True,
         regime="mild", dtype=torch.float32, seed=1),
    Case(T=1, B=1, H=2, K=4, V=8, chunk_size=16, cuts=(), packed=True, initial=False, final=True,
         regime="strong", dtype=torch.bfloat16, seed=2),
    Case(T=300, B=1, H=2, K=16, V=8, chunk_size=64, cuts=(1, 77, 141), packed=True, initial=True,
         final=True, regime="strong", dtype=torch.float32, seed=3),
    Case(T=200, B=2, H=2, K=8, V=12, chunk_size=32, cuts=(), packed=False, initial=True,
         final=True, regime="strong", dtype=torch.bfloat16, seed=4),
    Case(T=96, B=3, H=2, K=16, V=4, chunk_size=32, cuts=(), packed=False, initial=False,
         final=True, regime="mild", dtype=torch.float32, seed=5),
    Case(T=130, B=2, H=2, K=8, V=12, chunk_size=64, cuts=(), packed=False, initial=True,
         final=True, regime="normalizer", dtype=torch.float32, seed=6),
]


def regime(spec, case: Case) -> str:
    return case.regime if case.regime in spec.regimes else "strong"


def make_inputs(spec, case: Case, cu=None):
    """Fresh random inputs ``{name: tensor}`` and the initial state (or None) for ``case``."""
    gen = torch.Generator().manual_seed(case.seed)
    xs = spec.make_inputs(case.B, case.T, case.H, case.K, case.V, dtype=case.dtype, generator=gen,
                          cu_seqlens=cu, decay=regime(spec, case))
    N = len(case.cuts) + 1 if case.packed else case.B
    state = spec.make_state(N, case.H, case.K, case.V, generator=gen) if case.initial else None
    return xs, state


def _leaves(xs, state, dtype=None):
    """Detached copies requiring grad (cast to ``dtype`` if given), state rebuilt alike."""
    def leaf(x):
        return (x if dtype is None else x.to(dtype)).detach().requires_grad_()

    xs = {n: leaf(x) for n, x in xs.items()}
    if state is None:
        return xs, None
    return xs, (tuple(leaf(s) for s in state) if isinstance(state, tuple) else leaf(state))


def _loss_and_grads(o, S, weights, leaves):
    w, w2 = weights
    loss = (o.to(w.dtype) * w).sum()
    for s, ws in zip(state_parts(S), w2):
        loss = loss + (s.to(ws.dtype) * ws).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@settings(max_examples=25)
@given(case=cases())
@example(case=FIXED[0])
@example(case=FIXED[1])
@example(case=FIXED[2])
@example(case=FIXED[3])
@example(case=FIXED[4])
@example(case=FIXED[5])
def test_chunk_matches_reference(spec, case):
    tol = TOL[case.dtype]
    errs = chunk_errors(spec, case)
    bad = {n: e for n, e in errs.items() if not e < bound(spec, n, case.dtype, tol)}
    assert not bad, f"{spec.name} {case}: errors over {tol}: {bad}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_chunk_matches_reference_quick(spec):
    """The quick layer's share of the sweep above: packed documents, strong decays, an
    initial state, float32."""
    errs = chunk_errors(spec, FIXED[2])
    bad = {n: e for n, e in errs.items() if not e < TOL[torch.float32]}
    assert not bad, f"{spec.name} {FIXED[2]}: errors over {TOL[torch.float32]}: {bad}"


def chunk_errors(spec, case: Case) -> dict:
    """Relative errors of the chunk path against the reference: output, final state(s)
    and the gradient of every input under ``(o * w).sum() + (S * w2).sum()``."""
    cu = None
    if case.packed:
        cu = torch.tensor((0, *case.cuts, case.T), dtype=torch.int32)
    xs, state = make_inputs(spec, case, cu)
    out_state = case.final

    xc, sc = _leaves(xs, state)
    o, S = spec.fn(**xc, initial_state=sc, output_final_state=out_state, cu_seqlens=cu,
                   chunk_size=case.chunk_size, backend="torch")
    assert o.dtype == case.dtype and o.shape == (case.B, case.T, case.H, case.V)
    assert (S is None) == (not out_state)

    xr, sr = _leaves(xs, state, torch.float64)
    o_ref, S_ref = spec.reference(**xr, initial_state=sr, output_final_state=out_state,
                                  cu_seqlens=cu)

    # The loss weights are the upstream gradients; autograd hands them to o in o's dtype,
    # so they are drawn representable there and both sides see the same values.
    gen = torch.Generator().manual_seed(case.seed + 1)
    w = torch.randn(o.shape, generator=gen).to(o.dtype).float()
    w2 = [torch.randn(s.shape, generator=gen) for s in state_parts(S)]
    grads = _loss_and_grads(o, S, (w, w2), [*xc.values(), *state_parts(sc)])
    grads_ref = _loss_and_grads(o_ref, S_ref, (w.double(), [x.double() for x in w2]),
                                [*xr.values(), *state_parts(sr)])

    names = [*xs, *(f"initial_state[{i}]" for i in range(len(state_parts(state))))]
    errs = {"o": rel_err(o, o_ref)}
    for i, (a, b) in enumerate(zip(state_parts(S), state_parts(S_ref))):
        errs[f"S[{i}]"] = rel_err(a, b)
    errs.update(grad_errors(names, grads, grads_ref))
    return errs


@pytest.mark.parametrize("spec", [s for s in SPECS if s.step is not None], ids=lambda s: s.name)
@settings(max_examples=6)
@given(case=cases(max_t=80, max_bth=160, packing=False))
def test_step_replays_chunk(spec, case):
    """Generation: the op's step token by token from the same initial state gives the
    chunk path's outputs and final state."""
    xs, state = make_inputs(spec, case)
    o, S = spec.fn(**xs, initial_state=state, output_final_state=True,
                   chunk_size=case.chunk_size, backend="torch")
    st_ = state
    if st_ is None:
        st_ = spec.make_state(case.B, case.H, case.K, case.V)
        st_ = tuple(torch.zeros_like(s) for s in st_) if isinstance(st_, tuple) else torch.zeros_like(st_)
    outs = []
    for t in range(case.T):
        o_t, st_ = spec.step(**spec.step_inputs(xs, t), state=st_)
        outs.append(o_t)
    tol = TOL[case.dtype]
    o_step = torch.stack(outs, 1)
    assert o_step.dtype == o.dtype
    assert rel_err(o_step, o) < tol
    for a, b in zip(state_parts(st_), state_parts(S)):
        assert a.dtype == torch.float32 and rel_err(a, b) < tol
