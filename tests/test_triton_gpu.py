"""Full-size checks of every Triton kernel on a CUDA GPU, against float64 references
computed on the same GPU. Skipped without CUDA; marked ``gpu`` and ``slow``:

    python -m pytest -q -m gpu tests/test_triton_gpu.py --junitxml=gpu_checks.xml

Each case compares outputs, final states and the gradient of every input (conftest's
``triton_errors``, the same inputs and error table as the interpreter tests) at the sizes
the kernels run at: T in {1, 63, 2048, 8192} and a packed 8192 with a one-token document,
K = V = 128 and K = 64 != V, bf16 and float32 inputs, mild and (for gated ops) strong
decays, and mLSTM's strong normalizer. Thresholds: bf16 inputs 2e-2; float32 1e-3, as
float32 inputs go through three-pass tf32 products on the GPU. Every case records its
errors as the property ``errors`` (kept by ``--junitxml``).

A CUDA fault (an illegal memory access) poisons the rest of its process: if one case
faults, run one op at a time (``-k delta_rule``) to tell which.
"""
from __future__ import annotations

import pytest
import torch

from conftest import TRITON_OPS, diag_inputs, leaves, rel_err, triton_errors
from seqpar import ops

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-3}
UNGATED = ("linear_attn", "delta_rule")


def full_size_cases(op):
    for dtype in (torch.bfloat16, torch.float32):
        for T, B, cuts in ((1, 2, ()), (63, 2, ()), (2048, 2, ()), (8192, 1, ()),
                           (8192, 1, (1, 63, 2100, 5000))):
            for strong in ((False,) if op in UNGATED else (False, True)):
                yield dict(B=B, T=T, H=2, K=128, V=128, cuts=cuts, strong=strong,
                           initial=True, dtype=dtype, seed=T + len(cuts) + strong)
        yield dict(B=2, T=2048, H=2, K=64, V=128, cuts=(), strong=False, initial=False,
                   dtype=dtype, seed=11)
    if op == "mlstm":  # |normalizer| >> 1, where bf16 rounding of intermediates shows
        yield dict(B=1, T=8192, H=2, K=128, V=128, cuts=(1, 63, 2100, 5000), strong="norm",
                   initial=True, dtype=torch.bfloat16, seed=8199)


def _case_id(op, case):
    dtype = str(case["dtype"]).removeprefix("torch.")
    packed = "-packed" if case["cuts"] else ""
    strong = {False: "", True: "-strong", "norm": "-norm"}[case["strong"]]
    return f"{op}-{dtype}-T{case['T']}{packed}-K{case['K']}{strong}"


CASES = [pytest.param(op, case, id=_case_id(op, case))
         for op in TRITON_OPS for case in full_size_cases(op)]


@pytest.mark.parametrize("op,case", CASES)
def test_full_size_matches_reference(op, case, record_property):
    tol = GPU_TOL[case["dtype"]]
    errs = triton_errors(op, **case, ref_device="cuda")
    record_property("errors", errs)
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"{op} {case}: errors over {tol}: {bad}"


def test_inductor_compile_equals_eager():
    """torch.compile(fullgraph=True) with inductor (the default backend, which generates
    its own Triton code around the custom ops) gives eager's gradients."""
    torch._dynamo.reset()
    xs, state = diag_inputs("simple_gla", 2, 1000, 4, 128, 128, 2, False, True, torch.bfloat16, 5)
    xs, state = leaves(xs, state)

    def f(q, k, v, g, s):
        o, S = ops.simple_gla(q, k, v, g, initial_state=s, output_final_state=True)
        return (o.float() ** 2).sum() + S.sum()

    eager = torch.autograd.grad(f(*xs, state), xs + [state])
    got = torch.autograd.grad(torch.compile(f, fullgraph=True)(*xs, state), xs + [state])
    assert max(rel_err(a, b) for a, b in zip(got, eager)) < 1e-3
