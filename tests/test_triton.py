"""The Triton kernels of triton_diag.py and triton_mlstm.py (linear_attn, simple_gla,
mlstm) against the float64 token-loop references.

The kernels run compiled on a machine with CUDA and under Triton's CPU interpreter
elsewhere (set up in conftest.py). What is checked: outputs, final states and the
gradients of every input (q, k, v, gate, initial state; mLSTM's i, f and state pair)
within the precision contract (float32 1e-4, bf16 inputs 2e-2 against the reference on
the same bf16 values), over ragged T (1, not a multiple of the 64-token chunk), B > 1,
packed documents, initial states, mild and strong decays, K != V and V not a power of
two, and for mLSTM a strong normalizer (its gradients cancel there); plus a
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
    diag_inputs,
    triton_cases,
)

# Ops that run triton_diag's kernels (GLA's vector gate runs triton_gla's, tested in
# test_triton_gla.py; the delta rules are in test_triton_delta.py).
OPS = ("linear_attn", "simple_gla", "mlstm")


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@settings(max_examples=4)
@given(case=triton_cases())
@example(case=FIXED_CASES[0])
@example(case=FIXED_CASES[1])
@example(case=FIXED_CASES[2])
@example(case=FIXED_CASES[3])
def test_triton_matches_reference(op, case):
    assert_triton_matches(op, **case)


@pytest.mark.parametrize("op", OPS)
def test_triton_matches_reference_quick(op):
    assert_triton_matches(op, **QUICK_CASE)


# mLSTM where |normalizer| >> 1: o is invariant to the scale of q there, so its gradients
# are small differences of large terms, and rounding a float32 intermediate to bf16 before
# a product shows (with single bf16 products in place of triton_mlstm's split ones, dq
# of the second case is 2.6e-2).
MLSTM_NORM = [
    pytest.param(dict(B=1, T=150, H=2, K=32, V=33, cuts=(1, 64, 100), strong="norm",
                      initial=True, dtype=torch.bfloat16, seed=2), marks=pytest.mark.slow),
    pytest.param(dict(B=2, T=130, H=1, K=32, V=16, cuts=(), strong="norm", initial=False,
                      dtype=torch.bfloat16, seed=3), marks=pytest.mark.slow),
    dict(B=2, T=70, H=1, K=16, V=24, cuts=(), strong="norm", initial=True,
         dtype=torch.float32, seed=4),
]


@pytest.mark.parametrize("case", MLSTM_NORM)
def test_triton_mlstm_strong_normalizer(case):
    assert_triton_matches("mlstm", **case)


@pytest.mark.slow
def test_mlstm_kernels_fit_sm90():
    """mLSTM's kernels compile for sm_90 with their launch settings within the
    shared-memory limit (its float32 _dqk_kernel needs 224 of the 227 KB)."""
    assert_sm90_compiles("mlstm")


@pytest.mark.slow
@pytest.mark.parametrize("op", ["simple_gla", "mlstm"])
def test_compile_fullgraph_traces_custom_op(op):
    """The kernels are one custom op to torch.compile: fullgraph tracing succeeds and the
    compiled forward and backward equal eager."""
    xs, state = diag_inputs(op, 1, 70, 2, 16, 24, 1, False, True, torch.float32, 7)
    assert_compiled_equals_eager(op, xs, state)
