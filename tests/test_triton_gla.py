"""GLA's Triton kernels (per-key gate, seqpar/ops/linear/triton_gla.py) against the
float64 token-loop reference.

Runs on the GPU where there is one, otherwise under Triton's CPU interpreter, set up by
importing tests/test_triton.py first (see its docstring for why the variable must be set
before any kernel module is imported); its error metric, input-case strategy, fixed
examples, leaf builder and tolerances are shared here.

What is checked: outputs, final states and the gradients of q, k, v, g and the initial
state within the precision contract (float32 1e-4, bf16 inputs 2e-2, against the
reference on the same bf16 values), over T = 1, T not a multiple of the 64-token chunk,
B > 1, packed documents (a boundary inside a chunk, a one-token document), initial
states, strong decays (half the key channels with a_t down to ~e^-15 per token, the
others mild), K != V, V not a power of two, K = 80 (a masked second key tile); a
``torch.compile(fullgraph=True)`` trace through the custom ops; that 'auto' reaches
these kernels where it resolves to Triton; and an sm_90 compile of the kernels (shared
memory, register spills). Under the interpreter the kernels' products are exact float32,
so tf32 rounding on the GPU is checked only by bench/device/check_triton_gla.py.

Budget: 67-95 s on 2 cores for the four tests (measured, with other jobs running):
about 50-80 s for the reference comparisons, 11 s for the sm_90 compile, 6 s for
torch.compile; the interpreter runs each kernel program in numpy.
"""
from __future__ import annotations

import os
import sys

import torch

if "seqpar.ops.linear.triton_gla" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1" \
        and not torch.cuda.is_available():
    raise RuntimeError("seqpar.ops.linear.triton_gla imported before TRITON_INTERPRET=1 was set")

import test_triton  # noqa: E402  (sets TRITON_INTERPRET)
from test_triton import FIXED, TOL, assert_sm90_compiles, cases  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402

from seqpar import ops  # noqa: E402
from seqpar.ops.linear import _run  # noqa: E402

GATES = {"gla": ("g",)}


def _inputs(op, B, T, H, K, V, N, strong, initial, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    x = torch.randn(B, T, H, K, generator=gen)
    if strong:  # even key channels: a_t down to ~e^-15 per token; odd ones mild
        x = torch.where(torch.arange(K) % 2 == 0, x * 3 - 6, x + 2)
    else:
        x = x + 2
    state = torch.randn(N, H, K, V, generator=gen) if initial else None
    return [q.to(dtype), k.to(dtype), v.to(dtype), F.logsigmoid(x)], state


def errors(*args, **kwargs):
    """test_triton.errors with this module's inputs and gates;
    bench/device/check_triton_gla.py calls it at full sizes."""
    return test_triton.errors(*args, inputs=_inputs, gates=GATES, **kwargs)


EXTRA = [  # bf16 with strong decays, packed, a one-token document; V = 33 spans two V tiles
    dict(B=1, T=140, H=1, K=16, V=33, cuts=(70, 71), strong=True, initial=True,
         dtype=torch.bfloat16, seed=4),
    # K = 80: a second key tile, masked; T = 70: a ragged second chunk
    dict(B=1, T=70, H=1, K=80, V=16, cuts=(), strong=True, initial=True,
         dtype=torch.float32, seed=5),
]


@settings(max_examples=1)
@given(case=cases())
@example(case=FIXED[0])
@example(case=FIXED[1])
@example(case=FIXED[2])
@example(case=EXTRA[0])
@example(case=EXTRA[1])
def test_triton_gla_matches_reference(case):
    tol = TOL[case["dtype"]]
    errs = errors("gla", **case)
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"gla {case}: errors over {tol}: {bad}"


def test_compile_fullgraph_traces_custom_op():
    """The kernels are one custom op to torch.compile: fullgraph tracing succeeds and the
    compiled forward and backward equal eager."""
    xs, state = _inputs("gla", 1, 40, 1, 16, 24, 1, False, True, torch.float32, 7)
    test_triton.assert_compiled_equals_eager("gla", xs, state)


def test_auto_dispatch_reaches_gla_kernels(monkeypatch):
    """'auto' runs these kernels wherever it resolves to Triton (CUDA)."""
    import seqpar.ops.linear.triton_gla as tg

    calls = []
    monkeypatch.setattr(tg, "triton_gla", lambda *a, **kw: calls.append(1) or (None, None))
    xs, _ = _inputs("gla", 1, 5, 1, 16, 16, 1, False, False, torch.float32, 0)
    monkeypatch.setattr(_run, "pick_backend", lambda backend, x: "triton")
    ops.gla(*xs, backend="auto")
    assert calls == [1]


def test_kernels_fit_sm90():
    """The kernels compile for sm_90 with their launch settings within the shared-memory
    limit, and the bf16 configuration spills no registers: failures the interpreter cannot
    show (with 4 warps and 64-wide key tiles the chunk kernels spilled 1-4 KB)."""
    assert_sm90_compiles("check_triton_gla.py")
