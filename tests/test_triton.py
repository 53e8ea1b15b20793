"""The Triton kernels against the float64 token-loop references, for every op of the
linear family in :mod:`seqpar.ops.catalog` (inputs, states and value regimes from there).

The catalogue's ops are split by the kernel module they run (:func:`kernel_module`):
this file checks triton_diag's and triton_mlstm's (no gate or a head gate: linear_attn,
simple_gla, mamba2; mlstm), test_triton_gla.py GLA's key gate, test_triton_delta.py the
delta rules; each draws its ops with :func:`specs_of`, so an op added to the catalogue
joins the file of its kernels. The helpers here (:func:`triton_errors`,
:func:`assert_triton_matches`) serve those files and test_triton_gpu.py too.

The kernels run compiled on a machine with CUDA and under Triton's CPU interpreter
elsewhere (set up in conftest.py). What is checked: outputs, final states and the
gradients of every input (the catalogue's, and the initial state or mLSTM's state pair)
within the precision contract (float32 1e-4, bf16 inputs 2e-2 against the reference on
the same bf16 values, loosened only where the entry's ``bf16_grad_tol`` says), over
ragged T (1, not a multiple of the 64-token chunk), B > 1, packed documents, initial
states, mild and strong decays, K != V and V not a power of two, and where the op has a
normalizer regime (mLSTM) a strong normalizer (its gradients cancel there); plus a
``torch.compile(fullgraph=True)`` trace through the custom ops and their autograd
registration, and an sm_90 compile of mLSTM's kernels (shared memory). The interpreter is
slow, so shapes stay small (T <= 150, K <= 32); full sizes run on the GPU
(test_triton_gpu.py).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings

from conftest import (
    DEVICE,
    FIXED_CASES,
    QUICK_CASE,
    TRITON_TOL,
    assert_compiled_equals_eager,
    assert_sm90_compiles,
    grad_errors,
    rel_err,
    triton_cases,
)
from seqpar.ops import catalog
from seqpar.ops.catalog import state_parts
from seqpar.ops.linear.delta import DELTA
from seqpar.ops.linear.mlstm import MLSTM

# The linear family's ops (variants such as retention run their op's kernels).
LINEAR = [catalog.get(n) for n in catalog.names("linear", variants=False)]

# A case's ``strong`` (conftest's cases) as a catalogue regime.
REGIME = {False: "mild", True: "strong", "norm": "normalizer"}


def kernel_module(spec) -> str:
    """The Triton module whose kernels ``spec``'s op runs: 'delta', 'mlstm', 'gla' (the
    diag engine with a per-key gate) or 'diag' (no gate or one per head)."""
    if spec.engine is DELTA:
        return "delta"
    if spec.engine is MLSTM:
        return "mlstm"
    return "gla" if any(i.name == "g" and i.dims[-1] == "K" for i in spec.inputs) else "diag"


def specs_of(*modules: str) -> list:
    """The linear ops whose kernels live in ``modules`` (see :func:`kernel_module`)."""
    return [s for s in LINEAR if kernel_module(s) in modules]


def spec_id(spec) -> str:
    """A test id: the op's catalogue name."""
    return spec.name


def sample(spec, B, T, H, K, V, cuts, strong, initial, dtype, seed, **sizes):
    """The catalogue's inputs of one case: ``cuts`` are packed document boundaries
    inside (0, T) (B == 1), ``strong`` a key of :data:`REGIME`."""
    return spec.sample(B, T, H, K, V, seed=seed, dtype=dtype, initial=initial,
                       cu_seqlens=(0, *cuts, T) if cuts else None, decay=REGIME[strong],
                       **sizes)


def triton_errors(spec, *, ref_device="cpu", **case) -> dict[str, float]:
    """Relative errors of ``backend='triton'`` against the float64 reference (run on
    ``ref_device``) for one case (see :func:`sample`): o, final state(s), and the
    gradient of every input under a random linear loss of o and the final states."""
    s = sample(spec, **case)
    got, ref = s.leaves(device=DEVICE), s.leaves(torch.float64, ref_device)
    o, S = spec.fn(**got.inputs, **got.kwargs, output_final_state=True, backend="triton")
    o_ref, S_ref = spec.reference(**ref.inputs, **ref.kwargs, output_final_state=True)
    assert o.dtype == case["dtype"] and o.shape == o_ref.shape

    gen = torch.Generator().manual_seed(case["seed"] + 1)
    w = torch.randn(o.shape, generator=gen).to(o.dtype).double()  # representable in o's dtype
    ws = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in state_parts(S_ref)]

    def grads(o, S, leaves):
        loss = (o.double() * w.to(o.device)).sum()
        for p, x in zip(state_parts(S), ws):
            loss = loss + (p.double() * x.to(p.device)).sum()
        return [g.cpu() for g in torch.autograd.grad(loss, leaves)]

    errs = {"o": rel_err(o.cpu(), o_ref.cpu())}
    for i, (a, b) in enumerate(zip(state_parts(S), state_parts(S_ref))):
        errs[f"S[{i}]"] = rel_err(a.cpu(), b.cpu())
    errs.update(grad_errors(s.names, grads(o, S, got.tensors), grads(o_ref, S_ref, ref.tensors)))
    return errs


def bound(spec, name: str, dtype, tol=None) -> float:
    """The bound of error ``name``: ``tol`` (default :data:`TRITON_TOL` of ``dtype``), or
    with bf16 inputs the entry's ``bf16_grad_tol`` of that gradient where larger."""
    tol = tol or TRITON_TOL[dtype]
    if dtype == torch.bfloat16 and name.startswith("d"):
        return max(tol, spec.bf16_grad_tol.get(name[1:], tol))
    return tol


def assert_errors_within(spec, errs, case, tol=None):
    bad = {n: e for n, e in errs.items() if not e < bound(spec, n, case["dtype"], tol)}
    assert not bad, f"{spec.name} {case}: errors over their bounds: {bad} (all: {errs})"


def assert_triton_matches(spec, tol=None, **case) -> dict[str, float]:
    """:func:`triton_errors` of one case, each under its :func:`bound`; returns them."""
    errs = triton_errors(spec, **case)
    assert_errors_within(spec, errs, case, tol)
    return errs


OPS = specs_of("diag", "mlstm")


@pytest.mark.slow
@pytest.mark.parametrize("spec", OPS, ids=spec_id)
@settings(max_examples=4)
@given(case=triton_cases())
@example(case=FIXED_CASES[0])
@example(case=FIXED_CASES[1])
@example(case=FIXED_CASES[2])
@example(case=FIXED_CASES[3])
def test_triton_matches_reference(spec, case):
    assert_triton_matches(spec, **case)


@pytest.mark.parametrize("spec", OPS, ids=spec_id)
def test_triton_matches_reference_quick(spec):
    assert_triton_matches(spec, **QUICK_CASE)


# Where |normalizer| >> 1: o is invariant to the scale of q there, so its gradients are
# small differences of large terms, and rounding a float32 intermediate to bf16 before a
# product shows (with single bf16 products in place of triton_mlstm's split ones, dq of
# the second case is 2.6e-2).
NORMALIZER = [
    pytest.param(dict(B=1, T=150, H=2, K=32, V=33, cuts=(1, 64, 100), strong="norm",
                      initial=True, dtype=torch.bfloat16, seed=2), marks=pytest.mark.slow),
    pytest.param(dict(B=2, T=130, H=1, K=32, V=16, cuts=(), strong="norm", initial=False,
                      dtype=torch.bfloat16, seed=3), marks=pytest.mark.slow),
    dict(B=2, T=70, H=1, K=16, V=24, cuts=(), strong="norm", initial=True,
         dtype=torch.float32, seed=4),
]


@pytest.mark.parametrize("spec", [s for s in OPS if "normalizer" in s.regimes], ids=spec_id)
@pytest.mark.parametrize("case", NORMALIZER)
def test_triton_strong_normalizer(spec, case):
    assert_triton_matches(spec, **case)


@pytest.mark.slow
def test_mlstm_kernels_fit_sm90():
    """mLSTM's kernels compile for sm_90 with their launch settings within the
    shared-memory limit (its float32 _dqk_kernel needs 224 of the 227 KB)."""
    assert_sm90_compiles("mlstm")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simple_gla", "mlstm"])
def test_compile_fullgraph_traces_custom_op(name):
    """The kernels are one custom op to torch.compile: fullgraph tracing succeeds and the
    compiled forward and backward equal eager."""
    s = sample(catalog.get(name), 1, 70, 2, 16, 24, (), False, True, torch.float32, 7)
    assert_compiled_equals_eager(name, list(s.inputs.values()), s.initial_state)
