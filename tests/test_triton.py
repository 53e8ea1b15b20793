"""The Triton kernels against the float64 token-loop references, for every op of the
linear family in :mod:`seqpar.ops.catalog` (inputs, states and value regimes from there).

The catalogue's ops are split by the kernel module they run (conftest.py's
``kernel_module``): this file checks triton_diag's and triton_mlstm's (no gate or a head
gate: linear_attn, simple_gla, mamba2; mlstm), test_triton_gla.py GLA's key gate,
test_triton_delta.py the delta rules; each draws its ops with conftest.py's ``specs_of``,
so an op added to the catalogue joins the file of its kernels. The inputs and error
tables (``triton_errors``, ``assert_triton_matches``) are conftest.py's, shared with
test_triton_gpu.py.

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
    FIXED_CASES,
    QUICK_CASE,
    assert_compiled_equals_eager,
    assert_sm90_compiles,
    assert_triton_matches,
    sample,
    spec_id,
    specs_of,
    triton_cases,
)
from seqpar.ops import catalog

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
    spec = catalog.get(name)
    assert_compiled_equals_eager(spec, sample(spec, 1, 70, 2, 16, 24, (), False, True, torch.float32, 7))
