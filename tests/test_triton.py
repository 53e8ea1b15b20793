"""The Triton kernels of the linear family against the float64 token-loop references.

How the kernels run here: on a machine with CUDA they run compiled on the GPU; without
one, under Triton's CPU interpreter. Triton decides interpreted versus compiled when a
``@triton.jit`` function is *defined* (it reads ``TRITON_INTERPRET`` at decoration), so
the variable must be set before the kernel modules are imported. seqpar imports them
lazily (only when a call dispatches to ``backend='triton'``), and no other test module
runs that backend, so setting ``TRITON_INTERPRET=1`` at import of this module (pytest
imports every test module at collection, before any test runs) is early enough; a guard
below fails loudly if a kernel module was nevertheless already imported in compiled mode
on a machine without CUDA. The variable stays set for the whole session; it only allows
``backend='triton'`` on CPU tensors (see ``_family.pick_backend``), which no other test
relies on being refused except under its own ``monkeypatch``.

What is checked: outputs, final states and the gradients of every input (q, k, v, gate,
initial state; mLSTM's i, f and state pair) within the precision contract (float32
1e-4, bf16 inputs 2e-2 against the reference on the same bf16 values), over ragged T
(1, not a multiple of the 64-token chunk), B > 1, packed documents, initial states,
mild and strong decays, K != V and V not a power of two, and for mLSTM a strong
normalizer (its gradients cancel there); plus a ``torch.compile(fullgraph=True)`` trace
through the custom ops and their autograd registration, and an sm_90 compile of mLSTM's
kernels (shared memory).

Budget: the interpreter is slow; shapes stay small (T <= 150, K <= 32) and this file
runs in about two minutes on 2 cores (measured 2m00s for the nine tests).
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    _compiled = [m for m in ("seqpar.ops.linear.triton_diag", "seqpar.ops.linear.triton_common")
                 if m in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"]
    if _compiled:
        raise RuntimeError(f"{_compiled} imported before TRITON_INTERPRET=1 was set: its kernels "
                           "would not run on CPU; import nothing from them before this module")
    os.environ["TRITON_INTERPRET"] = "1"


def _round_bf16_to_nearest():
    """Make the interpreter round float32 -> bfloat16 casts to nearest even, as the GPU
    does (Triton's default ``fp_downcast_rounding``). Triton 3.6's interpreter truncates
    them, a rounding that is biased (always toward zero): errors of kernels that store
    16-bit intermediates then accumulate along the sequence, measured 3-5x the GPU's
    (delta rule, bf16, T = 130: 1.6e-2 truncating, against 5.0e-3 rounding to nearest),
    so tests under the interpreter would judge a rounding the GPU never does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            u = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            even = (u >> 16) & 1  # ties go to the even neighbour
            out = np.where(np.isnan(src.data), (u >> 16) | 0x40,
                           (u + 0x7FFF + even) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(out, dst_type.scalar)
        return cast(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_to_nearest()

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import grad_errors, rel_err  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from seqpar import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# Ops that run triton_diag's kernels (GLA's vector gate runs triton_gla's, tested in
# test_triton_gla.py; the delta rules are in test_triton_delta.py).
OPS = {
    "linear_attn": (),
    "simple_gla": ("g",),
    "mlstm": ("i", "f"),
}


def _inputs(op, B, T, H, K, V, N, strong, initial, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    if strong == "norm":  # mLSTM's strong normalizer: aligned keys, long memory (|u| ~ 5-300)
        q, k, v = q + 1, k + 1, v + 2
    xs = [q.to(dtype), k.to(dtype), v.to(dtype)]
    if op == "simple_gla":
        x = torch.randn(B, T, H, generator=gen)
        xs.append(F.logsigmoid(x * 3 - 6 if strong else x + 2))  # strong: a_t down to ~e^-15
    elif op == "mlstm":
        xs.append(torch.randn(B, T, H, generator=gen))
        x = torch.randn(B, T, H, generator=gen)
        xs.append(x + 6 if strong == "norm" else x * 3 - 6 if strong else x + 2)
    state = None
    if initial:
        state = torch.randn(N, H, K, V, generator=gen)
        if op == "mlstm":
            state = (state, torch.randn(N, H, K, generator=gen))
    return xs, state


def _flat(s):
    return [] if s is None else (list(s) if isinstance(s, tuple) else [s])


def _leaves(xs, state, dtype=None, device=DEVICE):
    def leaf(x):
        x = x.to(device) if dtype is None else x.to(device=device, dtype=dtype)
        return x.detach().requires_grad_()

    xs = [leaf(x) for x in xs]
    if state is None:
        return xs, None
    return xs, (tuple(leaf(s) for s in state) if isinstance(state, tuple) else leaf(state))


def errors(op, B, T, H, K, V, cuts, strong, initial, dtype, seed, ref_device="cpu", *,
           inputs=None, gates=None):
    """Relative errors of backend='triton' against the float64 reference (run on
    ``ref_device``): o, final state(s), and the gradient of every input under a random
    linear loss. ``inputs`` / ``gates`` (default: this module's ``_inputs`` and ``OPS``)
    let test_triton_delta reuse it. bench/device/check_triton*.py call this at full
    sizes on the GPU."""
    inputs, gates = inputs or _inputs, gates or OPS
    N = len(cuts) + 1 if cuts else B
    xs, state = inputs(op, B, T, H, K, V, N, strong, initial, dtype, seed)
    cu = None if not cuts else torch.tensor((0, *cuts, T), dtype=torch.int32)
    fn, ref = getattr(ops, op), getattr(ops, op + "_reference")
    xk, sk = _leaves(xs, state)
    o, S = fn(*xk, initial_state=sk, output_final_state=True,
              cu_seqlens=None if cu is None else cu.to(DEVICE), backend="triton")
    xr, sr = _leaves(xs, state, torch.float64, ref_device)
    o_ref, S_ref = ref(*xr, initial_state=sr, output_final_state=True,
                       cu_seqlens=None if cu is None else cu.to(ref_device))
    assert o.dtype == dtype and o.shape == o_ref.shape

    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(o.shape, generator=gen).to(dtype).double()  # representable in o's dtype
    ws = [torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in _flat(S_ref)]

    def grads(o, S, leaves):
        loss = (o.double() * w.to(o.device)).sum()
        for s, x in zip(_flat(S), ws):
            loss = loss + (s.double() * x.to(s.device)).sum()
        return torch.autograd.grad(loss, leaves)

    names = ["q", "k", "v", *gates[op]] + [f"state[{i}]" for i in range(len(_flat(state)))]
    errs = {"o": rel_err(o.cpu(), o_ref.cpu())}
    for i, (a, b) in enumerate(zip(_flat(S), _flat(S_ref))):
        errs[f"S[{i}]"] = rel_err(a.cpu(), b.cpu())
    errs.update(grad_errors(names, [g.cpu() for g in grads(o, S, xk + _flat(sk))],
                            [g.cpu() for g in grads(o_ref, S_ref, xr + _flat(sr))]))
    return errs


def _check(op, **case):
    tol = TOL[case["dtype"]]
    errs = errors(op, **case)
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"{op} {case}: errors over {tol}: {bad}"


@st.composite
def cases(draw):
    T = draw(st.integers(1, 150))
    cuts = ()
    if T > 1 and draw(st.booleans()):
        cuts = tuple(sorted(draw(st.sets(st.integers(1, T - 1), min_size=1, max_size=3))))
    return dict(B=1 if cuts else draw(st.integers(1, 2)), T=T, H=draw(st.integers(1, 2)),
                K=draw(st.sampled_from([16, 32])), V=draw(st.sampled_from([16, 24, 33])),
                cuts=cuts, strong=draw(st.booleans()), initial=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                seed=draw(st.integers(0, 2**31 - 1)))


FIXED = [  # every run covers these, whatever hypothesis draws
    dict(B=2, T=1, H=2, K=16, V=24, cuts=(), strong=False, initial=True, dtype=torch.float32, seed=1),
    dict(B=1, T=150, H=2, K=32, V=33, cuts=(1, 64, 100), strong=True, initial=True,
         dtype=torch.float32, seed=2),
    dict(B=2, T=130, H=1, K=32, V=16, cuts=(), strong=True, initial=False, dtype=torch.bfloat16, seed=3),
    # strong decays: the initial state's gradient underflows float32 (GRAD_FLOOR)
    dict(B=1, T=61, H=1, K=16, V=16, cuts=(), strong=True, initial=True, dtype=torch.float32, seed=0),
]


@pytest.mark.parametrize("op", list(OPS))
@settings(max_examples=4)
@given(case=cases())
@example(case=FIXED[0])
@example(case=FIXED[1])
@example(case=FIXED[2])
@example(case=FIXED[3])
def test_triton_matches_reference(op, case):
    _check(op, **case)


# mLSTM where |normalizer| >> 1: o is invariant to the scale of q there, so its gradients
# are small differences of large terms, and rounding a float32 intermediate to bf16 before
# a product shows (with single bf16 products in place of triton_mlstm's split ones, dq
# of the second case is 2.6e-2).
MLSTM_NORM = [
    dict(B=1, T=150, H=2, K=32, V=33, cuts=(1, 64, 100), strong="norm", initial=True,
         dtype=torch.bfloat16, seed=2),
    dict(B=2, T=130, H=1, K=32, V=16, cuts=(), strong="norm", initial=False,
         dtype=torch.bfloat16, seed=3),
    dict(B=2, T=70, H=1, K=16, V=24, cuts=(), strong="norm", initial=True,
         dtype=torch.float32, seed=4),
]


@pytest.mark.parametrize("case", MLSTM_NORM)
def test_triton_mlstm_strong_normalizer(case):
    _check("mlstm", **case)


def assert_sm90_compiles(script: str):
    """Run ``bench/device/<script> --compile-only`` (compiled Triton, no GPU needed: it
    compiles the kernels for sm_90 and checks shared memory and register spills) and
    fail with its output if it fails. Skips only where Triton's NVIDIA backend (ptxas)
    is missing; the pinned triton 3.6.0 wheel ships it."""
    import subprocess
    from pathlib import Path

    import triton

    if not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench/device" / script), "--compile-only"],
                       env={**os.environ, "TRITON_INTERPRET": "0",  # seqpar importable uninstalled
                            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])},
                       capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


def test_mlstm_kernels_fit_sm90():
    """mLSTM's kernels compile for sm_90 with their launch settings within the
    shared-memory limit (bench/device/check_triton.py --compile-only; its float32
    _dqk_kernel needs 224 of the 227 KB)."""
    assert_sm90_compiles("check_triton.py")


@pytest.mark.parametrize("op", ["simple_gla", "mlstm"])
def test_compile_fullgraph_traces_custom_op(op):
    """The kernels are one custom op to torch.compile: fullgraph tracing succeeds and the
    compiled forward and backward equal eager."""
    xs, state = _inputs(op, 1, 70, 2, 16, 24, 1, False, True, torch.float32, 7)
    assert_compiled_equals_eager(op, xs, state)


def assert_compiled_equals_eager(op, xs, state):
    """``torch.compile(fullgraph=True)`` of a backend='triton' call traces (no graph
    break) and its gradients equal eager's."""
    torch._dynamo.reset()
    xs, state = _leaves(xs, state)
    fn = getattr(ops, op)
    leaves = xs + _flat(state)
    pair = isinstance(state, tuple)  # mLSTM's (C, n)

    def f(*args):
        s = args[len(xs):]
        o, S = fn(*args[:len(xs)], initial_state=tuple(s) if pair else s[0],
                  output_final_state=True, backend="triton")
        return (o * o).sum() + sum(x.sum() for x in _flat(S))

    eager = torch.autograd.grad(f(*leaves), leaves)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(got, eager):
        assert rel_err(a, b) < 1e-6
