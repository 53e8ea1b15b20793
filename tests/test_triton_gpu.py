"""Full-size checks of every Triton kernel on a CUDA GPU, against float64 references
computed on the same GPU. Skipped without CUDA; marked ``gpu`` and ``slow``:

    python -m pytest -q -m gpu tests/test_triton_gpu.py --junitxml=gpu_checks.xml

Every op of the linear family in the catalogue (conftest.py's ``LINEAR``). Each case
compares outputs, final states and the gradient of every input (conftest.py's
``triton_errors``: the catalogue's inputs and the interpreter tests' error table) at the
sizes the kernels run at: T in {1, 63, 2048, 8192} and a packed 8192 with a one-token
document, K = V = 128 and K = 64 != V, bf16 and float32 inputs, mild and (for ops with
decays) strong decays, and a strong normalizer for ops with that regime (mLSTM).
Thresholds: bf16 inputs 2e-2 (or the entry's ``bf16_grad_tol``); float32 1e-3, as
float32 inputs go through three-pass tf32 products on the GPU. Every case records its
errors as the property ``errors`` (kept by ``--junitxml``).

A CUDA fault (an illegal memory access) poisons the rest of its process: if one case
faults, run one op at a time (``-k delta_rule``) to tell which.
"""
from __future__ import annotations

import pytest
import torch

from conftest import LINEAR, assert_errors_within, rel_err, sample, triton_errors
from seqpar.ops import catalog

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-3}


def full_size_cases(spec):
    for dtype in (torch.bfloat16, torch.float32):
        for T, B, cuts in ((1, 2, ()), (63, 2, ()), (2048, 2, ()), (8192, 1, ()),
                           (8192, 1, (1, 63, 2100, 5000))):
            for strong in ((False, True) if spec.decays else (False,)):
                yield dict(B=B, T=T, H=2, K=128, V=128, cuts=cuts, strong=strong,
                           initial=True, dtype=dtype, seed=T + len(cuts) + strong)
        yield dict(B=2, T=2048, H=2, K=64, V=128, cuts=(), strong=False, initial=False,
                   dtype=dtype, seed=11)
    if "normalizer" in spec.regimes:  # |normalizer| >> 1, where bf16 rounding of intermediates shows
        yield dict(B=1, T=8192, H=2, K=128, V=128, cuts=(1, 63, 2100, 5000), strong="norm",
                   initial=True, dtype=torch.bfloat16, seed=8199)


def _case_id(op, case):
    dtype = str(case["dtype"]).removeprefix("torch.")
    packed = "-packed" if case["cuts"] else ""
    strong = {False: "", True: "-strong", "norm": "-norm"}[case["strong"]]
    return f"{op}-{dtype}-T{case['T']}{packed}-K{case['K']}{strong}"


CASES = [pytest.param(spec, case, id=_case_id(spec.name, case))
         for spec in LINEAR for case in full_size_cases(spec)]


@pytest.mark.parametrize("spec,case", CASES)
def test_full_size_matches_reference(spec, case, record_property):
    errs = triton_errors(spec, **case, ref_device="cuda")
    record_property("errors", errs)
    assert_errors_within(spec, errs, case, GPU_TOL[case["dtype"]])


def test_inductor_compile_equals_eager():
    """torch.compile(fullgraph=True) with inductor (the default backend, which generates
    its own Triton code around the custom ops) gives eager's gradients."""
    torch._dynamo.reset()
    spec = catalog.get("simple_gla")
    s = sample(spec, 2, 1000, 4, 128, 128, (), False, True, torch.bfloat16, 5).leaves(device="cuda")

    def f(q, k, v, g, s):
        o, S = spec.fn(q, k, v, g, initial_state=s, output_final_state=True)
        return (o.float() ** 2).sum() + S.sum()

    eager = torch.autograd.grad(f(*s.tensors), s.tensors)
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*s.tensors), s.tensors)
    assert max(rel_err(a, b) for a, b in zip(got, eager)) < 1e-3
