"""The delta family's Triton path (``backend='triton'``: the WY state pass as Triton
kernels, seqpar/ops/linear/triton_delta.py) against the float64 token-loop references.

The catalogue's ops on the delta engine (conftest.py's ``specs_of``; inputs, unit keys
and beta in (0, 1) from the catalogue). The kernels run compiled on a machine with CUDA
and under Triton's CPU interpreter elsewhere (set up in conftest.py); the error tables
are conftest.py's.

What is checked: outputs, final states and the gradients of q, k, v, g, beta and the
initial state within the precision contract (float32 1e-4, bf16 inputs 2e-2, against
the reference on the same bf16 values), for DeltaNet and Gated DeltaNet, over T = 1,
T not a multiple of the 64-token chunk, B > 1, packed documents (a boundary inside a
chunk, a one-token document), initial states, strong decays (a_t down to ~e^-15),
K != V, V not a power of two and K over 64 (the 128-wide key tile); the inversion
kernel alone, on a matrix whose powers grow binomially; the WY kernels against
``chunk_delta.wy_terms``; a ``torch.compile(fullgraph=True)`` trace through the custom
ops; that 'auto' picks these kernels where it picks Triton (CUDA); the head-dim limit.
Under the interpreter the kernels' products are exact float32, so tf32 rounding is
checked only on the GPU (test_triton_gpu.py).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings

from conftest import (
    DEVICE,
    FIXED_CASES,
    QUICK_CASE,
    assert_compiled_equals_eager,
    assert_sm90_compiles,
    assert_triton_matches,
    rel_err,
    sample,
    spec_id,
    specs_of,
    triton_cases,
)
from seqpar.ops import catalog
from seqpar.ops.linear import delta as delta_engine

OPS = specs_of("delta")

EXTRA = [  # bf16 with strong decays, packed, a one-token document; V = 33 spans two V tiles
    dict(B=1, T=140, H=1, K=16, V=33, cuts=(70, 71), strong=True, initial=True,
         dtype=torch.bfloat16, seed=4),
    # K = 80: the 128-wide key tile, masked
    dict(B=1, T=70, H=1, K=80, V=16, cuts=(), strong=False, initial=True,
         dtype=torch.float32, seed=5),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec", OPS, ids=spec_id)
@settings(max_examples=3)
@given(case=triton_cases())
@example(case=FIXED_CASES[0])
@example(case=FIXED_CASES[1])
@example(case=FIXED_CASES[2])
@example(case=EXTRA[0])
@example(case=EXTRA[1])
def test_triton_delta_matches_reference(spec, case):
    assert_triton_matches(spec, **case)


@pytest.mark.parametrize("spec", OPS, ids=spec_id)
def test_triton_delta_matches_reference_quick(spec):
    assert_triton_matches(spec, **QUICK_CASE)


@pytest.mark.slow
def test_compile_fullgraph_traces_custom_op():
    """The state pass is one custom op to torch.compile: fullgraph tracing succeeds and
    the compiled forward and backward equal eager."""
    spec = catalog.get("gated_delta_rule")
    assert_compiled_equals_eager(spec, sample(spec, 2, 70, 2, 16, 24, (), False, True, torch.float32, 7))


@pytest.mark.parametrize("spec", OPS, ids=spec_id)
def test_auto_dispatch_reaches_delta_kernels(spec, monkeypatch):
    """'auto' runs these kernels wherever it resolves to Triton (CUDA), and the PyTorch
    path where it resolves to 'torch' (CPU)."""
    import seqpar.ops.linear.triton_delta as td

    calls = []
    monkeypatch.setattr(td, "triton_delta", lambda *a, **kw: calls.append(1) or (None, None))
    xs = spec.make_inputs(1, 5, 1, 16, 16)
    monkeypatch.setattr(delta_engine, "pick_backend", lambda backend, x: "torch")
    spec.fn(**xs, backend="auto")
    assert calls == []
    monkeypatch.setattr(delta_engine, "pick_backend", lambda backend, x: "triton")
    spec.fn(**xs, backend="auto")
    assert calls == [1]


@pytest.mark.parametrize("spec", OPS, ids=spec_id)
def test_head_dim_limit(spec):
    xs = spec.make_inputs(1, 3, 1, 160, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"k: expected head dim <= 128.*got 160"):
        spec.fn(**xs, backend="triton")


def test_unit_lower_inverse(monkeypatch):
    """The blocked inversion kernel and its backward against float64, on random strictly
    lower matrices and on all ones below the diagonal (equal keys with beta = 1: the
    inverse is tame, but powers of A grow binomially, so a series form would fail).
    Its output starts as NaN: the kernel writes every block, the zeros above the
    diagonal included (fresh memory on the CPU is often zero already)."""
    from seqpar.ops.linear.triton_delta import unit_lower_inverse

    full_like = torch.full_like
    monkeypatch.setattr(torch, "empty_like", lambda x, **kw: full_like(x, float("nan"), **kw))

    gen = torch.Generator().manual_seed(0)
    A = torch.cat([(torch.randn(3, 64, 64, generator=gen) * 0.3).tril(-1),
                   torch.ones(1, 64, 64).tril(-1)]).to(DEVICE).requires_grad_()
    Ad = A.detach().double().requires_grad_()
    N, N_ref = unit_lower_inverse(A), torch.linalg.inv(Ad + torch.eye(64, dtype=torch.float64, device=DEVICE))
    assert rel_err(N, N_ref) < 1e-6
    w = torch.randn(A.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    dA, = torch.autograd.grad((N.double() * w).sum(), A)
    dA_ref, = torch.autograd.grad((N_ref * w).sum(), Ad)
    assert rel_err(dA, dA_ref.tril(-1)) < 1e-6


def test_wy_kernels_match_wy_terms():
    """The WY kernels (A and its inverse N, W) against chunk_delta.wy_terms on the same
    chunks, float32: two documents, one ending inside a chunk, strong decays."""
    from seqpar.ops.linear import triton_delta as td
    from seqpar.ops.linear.chunk_delta import wy_terms
    from seqpar.ops.linear.chunk_diag import chunked

    s = sample(catalog.get("gated_delta_rule"), 1, 100, 2, 16, 24, (), True, False,
               torch.float32, 9)
    q, k, v, g, beta = (x.to(DEVICE) for x in s.inputs.values())
    _, _, ai, w, _, _ = td.delta_forward(q, k, v, g, beta, None, 0.25, [0, 90, 100])
    docs = []
    for s, e in ((0, 90), (90, 100)):  # each document in chunks of 64, zero-padded
        n = -(-(e - s) // td.BT)
        docs.append([chunked(x[:, s:e], n, td.BT) for x in (q, k, v, g, beta)])
    eye = torch.eye(td.BT, device=DEVICE)
    got_n = []

    def inverse(A):  # records (I + A)^{-1}
        got_n.append(torch.linalg.solve_triangular(A + eye, eye.expand_as(A), upper=False,
                                                   unitriangular=True))
        return got_n[-1]

    refs = [wy_terms(qc, kc, vc, gc[..., None], bc[..., None], 0.25, inverse=inverse)
            for qc, kc, vc, gc, bc in docs]
    W_ref = torch.cat([r[1][0] for r in refs], 1).transpose(0, 1)  # (NT, H, BT, K)
    N_ref = torch.cat([n[0] for n in got_n], 1).transpose(0, 1)
    assert rel_err(ai, N_ref) < 1e-5
    assert rel_err(w, W_ref) < 1e-5


@pytest.mark.slow
def test_kernels_fit_sm90():
    """The kernels compile for sm_90 with their launch settings within the shared-memory
    limit, and the bf16 configuration spills no registers beyond the allowance in
    tests/sm90.py: failures the interpreter cannot show (Triton's default software
    pipelining needs more shared memory than sm_90 has for these kernels)."""
    assert_sm90_compiles("delta")
