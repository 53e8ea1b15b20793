"""GLA's Triton kernels (per-key gate, seqpar/ops/linear/triton_gla.py) against the
float64 token-loop reference.

The catalogue's ops with a per-key gate (conftest.py's ``specs_of``; inputs from the
catalogue, whose strong regime decays half the key channels strongly, the others
mildly). The kernels run compiled on a machine with CUDA and under Triton's CPU
interpreter elsewhere (set up in conftest.py); the error tables are conftest.py's.

What is checked: outputs, final states and the gradients of q, k, v, g and the initial
state within the precision contract (float32 1e-4, bf16 inputs 2e-2, against the
reference on the same bf16 values), over T = 1, T not a multiple of the 64-token chunk,
B > 1, packed documents (a boundary inside a chunk, a one-token document), initial
states, strong decays (half the key channels with a_t down to ~e^-15 per token, the
others mild), K != V, V not a power of two, K = 80 (a masked second key tile); a
``torch.compile(fullgraph=True)`` trace through the custom ops; that 'auto' reaches
these kernels where it resolves to Triton; and an sm_90 compile of the kernels (shared
memory, register spills). Under the interpreter the kernels' products are exact float32,
so tf32 rounding is checked only on the GPU (test_triton_gpu.py).
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
from seqpar.ops.linear import diag as diag_engine

OPS = specs_of("gla")


EXTRA = [  # bf16 with strong decays, packed, a one-token document; V = 33 spans two V tiles
    dict(B=1, T=140, H=1, K=16, V=33, cuts=(70, 71), strong=True, initial=True,
         dtype=torch.bfloat16, seed=4),
    # K = 80: a second key tile, masked; T = 70: a ragged second chunk
    dict(B=1, T=70, H=1, K=80, V=16, cuts=(), strong=True, initial=True,
         dtype=torch.float32, seed=5),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec", OPS, ids=spec_id)
@settings(max_examples=1)
@given(case=triton_cases())
@example(case=FIXED_CASES[0])
@example(case=FIXED_CASES[1])
@example(case=FIXED_CASES[2])
@example(case=EXTRA[0])
@example(case=EXTRA[1])
def test_triton_gla_matches_reference(spec, case):
    assert_triton_matches(spec, **case)


@pytest.mark.parametrize("spec", OPS, ids=spec_id)
def test_triton_gla_matches_reference_quick(spec):
    assert_triton_matches(spec, **QUICK_CASE)


@pytest.mark.slow
def test_compile_fullgraph_traces_custom_op():
    """The kernels are one custom op to torch.compile: fullgraph tracing succeeds and the
    compiled forward and backward equal eager."""
    assert_compiled_equals_eager(OPS[0], sample(OPS[0], 1, 40, 1, 16, 24, (), False, True, torch.float32, 7))


@pytest.mark.parametrize("spec", OPS, ids=spec_id)
def test_auto_dispatch_reaches_gla_kernels(spec, monkeypatch):
    """'auto' runs these kernels wherever it resolves to Triton (CUDA)."""
    import seqpar.ops.linear.triton_gla as tg

    calls = []
    monkeypatch.setattr(tg, "triton_gla", lambda *a, **kw: calls.append(1) or (None, None))
    xs = spec.make_inputs(1, 5, 1, 16, 16)
    monkeypatch.setattr(diag_engine, "pick_backend", lambda backend, x: "triton")
    spec.fn(**xs, backend="auto")
    assert calls == [1]


@pytest.mark.slow
def test_kernels_fit_sm90():
    """The kernels compile for sm_90 with their launch settings within the shared-memory
    limit, and the bf16 configuration spills no registers: failures the interpreter cannot
    show (with 4 warps and 64-wide key tiles the chunk kernels spilled 1-4 KB)."""
    assert_sm90_compiles("gla")
