"""Shared test set-up and helpers: where Triton kernels run, the relative-error metric of
the precision contract, the hypothesis profiles, and the inputs and error tables of the
Triton kernel tests (on CPU and on the GPU).

Triton kernels run compiled on a machine with CUDA and under Triton's CPU interpreter
elsewhere. Triton decides interpreted or compiled when a ``@triton.jit`` function is
*defined* (it reads ``TRITON_INTERPRET`` at decoration), so the variable is set here:
pytest imports this file before any test module, and seqpar imports its kernel modules
lazily (when a call dispatches to ``backend='triton'``). The variable stays set for the
session; it only allows ``backend='triton'`` on CPU tensors (``_family.pick_backend``).

Profiles: ``ci`` (default) and ``dev`` (few examples, for quick local runs); pick one
with ``--hypothesis-profile`` or ``HYPOTHESIS_PROFILE``. Tests draw their own seeds
(never ``torch.manual_seed`` globally), so a failing example replays from hypothesis'
report.

Markers (pyproject.toml): ``slow`` (left out by ``-m "not slow"``, the quick layer),
``gpu`` (needs CUDA; skipped without it), ``dist`` (spawns gloo processes). Every ``dist``
test is also ``slow``: starting a process group costs each rank a process start and an
``import torch`` before any work.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st


def _interpret_triton_without_cuda() -> None:
    if torch.cuda.is_available():
        return
    early = [m for m in sys.modules if m.startswith("seqpar.ops.linear.triton_")]
    if early and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{early} imported before TRITON_INTERPRET=1 was set: their kernels "
                           "would not run on CPU")
    os.environ["TRITON_INTERPRET"] = "1"


def _round_bf16_to_nearest() -> None:
    """Make the interpreter round float32 -> bfloat16 casts to nearest even, as the GPU
    does (Triton's default ``fp_downcast_rounding``). The interpreter truncates them, a
    rounding biased toward zero: the errors of kernels that store 16-bit intermediates
    then accumulate along the sequence to several times the GPU's, so tests under the
    interpreter would judge a rounding the GPU never does."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # no Triton: the Triton tests fail on their own import
        return

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


def _bool_masks() -> None:
    """Make the interpreter's masked loads and stores take masks built from a broadcast
    scalar comparison (``(row < T) & (cols < D)`` with a scalar row, as GLA's diagonal
    kernels and the delta rules' state-only pass write them). The interpreter tags a
    comparison's result with its operands' type, so broadcasting a scalar one yields an
    int32 array; Triton 3.9's interpreter rejects such a mask ("mask has unsupported
    dtype"), 3.6's accepted it. Compiled kernels are unaffected."""
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return

    builder = interpreter.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store

    def as_bool(mask):
        if mask.data.dtype == np.bool_:
            return mask
        return interpreter.TensorHandle(mask.data.astype(np.bool_), mask.dtype)

    def create_masked_load(self, ptrs, mask, *args, **kwargs):
        return load(self, ptrs, as_bool(mask), *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        return store(self, ptrs, value, as_bool(mask), *args, **kwargs)

    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("dist") is not None:
            item.add_marker(pytest.mark.slow)


_interpret_triton_without_cuda()
if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_to_nearest()
    _bool_masks()

from seqpar import ops  # noqa: E402  (after the set-up; it imports no kernel module)

# Float64 reference loops make examples slow and uneven, so no deadline.
settings.register_profile("ci", deadline=None, derandomize=False, print_blob=True)
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=5)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# A gradient can be (nearly) zero while the terms it sums are not: mLSTM's dq, dk, di
# vanish by scale invariance when T = 1 and the normalizer is active, and gradients
# of initial states decay into float32's subnormal range under strong decays (to ~1e-47
# within 61 tokens, which every float32 engine returns as 0). Relative error then
# measures round-off against ~0, in any float32 implementation. So a gradient's error is
# taken relative to at least GRAD_FLOOR times the RMS of the case's largest gradient (per
# element): such a gradient must still be right to 1e-6 (float32) of the typical
# gradient in absolute terms.
GRAD_FLOOR = 1e-2


def grad_errors(names, grads, grads_ref) -> dict[str, float]:
    """``{'d' + name: relative error}`` of each gradient against its reference, with the
    :data:`GRAD_FLOOR` denominator floor."""
    rms = max(g.detach().double().pow(2).mean().sqrt().item() for g in grads_ref)
    return {f"d{n}": rel_err(a, b, floor=GRAD_FLOOR * rms * b.numel() ** 0.5)
            for n, a, b in zip(names, grads, grads_ref)}


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """Relative L2 error ``||a - b|| / max(||b||, floor)`` in float64, the metric of the
    precision contract (docs/design.md).

    ``b`` is the reference. ``floor`` bounds the denominator from below for references
    that are (near) zero; with the default 0, an exactly-zero reference gives the absolute
    error ``||a||``. NaN or inf anywhere gives NaN or inf, which fails every ``<``.
    """
    if a.shape != b.shape:
        raise ValueError(f"rel_err: expected equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).norm().item()
    ref = max(b.norm().item(), floor)
    return diff / ref if ref > 0 else diff


# ---- The Triton kernel tests: inputs, cases, error tables --------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Under the interpreter the kernels' products are exact float32; on the GPU float32 inputs
# go through tf32 products (GPU_TOL in test_triton_gpu.py).
TRITON_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _logsigmoid_gate(x, strong):
    # strong: a_t down to ~e^-15 per token; mild: a_t near 1
    return F.logsigmoid(x * 3 - 6 if strong else x + 2)


def diag_inputs(op, B, T, H, K, V, N, strong, initial, dtype, seed):
    """Inputs of triton_diag's and triton_mlstm's ops (linear_attn, simple_gla, mlstm):
    ``([q, k, v, *gates], initial_state)``, q/k/v in ``dtype``, gates float32.
    ``strong``: False, True (strong decays) or 'norm' (mLSTM's strong normalizer: aligned
    keys and long memory, |u| ~ 5-300)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    if strong == "norm":
        q, k, v = q + 1, k + 1, v + 2
    xs = [q.to(dtype), k.to(dtype), v.to(dtype)]
    if op == "simple_gla":
        xs.append(_logsigmoid_gate(torch.randn(B, T, H, generator=gen), strong))
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


def gla_inputs(op, B, T, H, K, V, N, strong, initial, dtype, seed):
    """GLA's inputs; ``strong``: even key channels decay strongly, odd ones mildly."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen)
    x = torch.randn(B, T, H, K, generator=gen)
    if strong:
        x = torch.where(torch.arange(K) % 2 == 0, x * 3 - 6, x + 2)
    else:
        x = x + 2
    state = torch.randn(N, H, K, V, generator=gen) if initial else None
    return [q.to(dtype), k.to(dtype), v.to(dtype), F.logsigmoid(x)], state


def delta_inputs(op, B, T, H, K, V, N, strong, initial, dtype, seed):
    """The delta rules' inputs: k L2-normalized (the callers' contract), beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    xs = [q.to(dtype), k.to(dtype), v.to(dtype)]
    if op == "gated_delta_rule":
        xs.append(_logsigmoid_gate(torch.randn(B, T, H, generator=gen), strong))
    xs.append(torch.sigmoid(torch.randn(B, T, H, generator=gen)).to(dtype))
    state = torch.randn(N, H, K, V, generator=gen) if initial else None
    return xs, state


# op -> (input builder, names of its inputs after q, k, v)
TRITON_OPS = {
    "linear_attn": (diag_inputs, ()),
    "simple_gla": (diag_inputs, ("g",)),
    "mlstm": (diag_inputs, ("i", "f")),
    "gla": (gla_inputs, ("g",)),
    "delta_rule": (delta_inputs, ("beta",)),
    "gated_delta_rule": (delta_inputs, ("g", "beta")),
}


def flat_state(s) -> list:
    return [] if s is None else (list(s) if isinstance(s, tuple) else [s])


def leaves(xs, state, dtype=None, device=DEVICE):
    """Fresh leaf tensors (requires_grad) of inputs and state on ``device``."""
    def leaf(x):
        x = x.to(device) if dtype is None else x.to(device=device, dtype=dtype)
        return x.detach().requires_grad_()

    xs = [leaf(x) for x in xs]
    if state is None:
        return xs, None
    return xs, (tuple(leaf(s) for s in state) if isinstance(state, tuple) else leaf(state))


def triton_errors(op, B, T, H, K, V, cuts, strong, initial, dtype, seed,
                  ref_device="cpu") -> dict[str, float]:
    """Relative errors of ``backend='triton'`` against the float64 reference (run on
    ``ref_device``): o, final state(s), and the gradient of every input under a random
    linear loss of o and the final states. ``cuts``: packed document boundaries (B == 1)."""
    inputs, gates = TRITON_OPS[op]
    N = len(cuts) + 1 if cuts else B
    xs, state = inputs(op, B, T, H, K, V, N, strong, initial, dtype, seed)
    cu = None if not cuts else torch.tensor((0, *cuts, T), dtype=torch.int32)
    fn, ref = getattr(ops, op), getattr(ops, op + "_reference")
    xk, sk = leaves(xs, state)
    o, S = fn(*xk, initial_state=sk, output_final_state=True,
              cu_seqlens=None if cu is None else cu.to(DEVICE), backend="triton")
    xr, sr = leaves(xs, state, torch.float64, ref_device)
    o_ref, S_ref = ref(*xr, initial_state=sr, output_final_state=True,
                       cu_seqlens=None if cu is None else cu.to(ref_device))
    assert o.dtype == dtype and o.shape == o_ref.shape

    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(o.shape, generator=gen).to(dtype).double()  # representable in o's dtype
    ws = [torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in flat_state(S_ref)]

    def grads(o, S, leaves):
        loss = (o.double() * w.to(o.device)).sum()
        for s, x in zip(flat_state(S), ws):
            loss = loss + (s.double() * x.to(s.device)).sum()
        return torch.autograd.grad(loss, leaves)

    names = ["q", "k", "v", *gates] + [f"state[{i}]" for i in range(len(flat_state(state)))]
    errs = {"o": rel_err(o.cpu(), o_ref.cpu())}
    for i, (a, b) in enumerate(zip(flat_state(S), flat_state(S_ref))):
        errs[f"S[{i}]"] = rel_err(a.cpu(), b.cpu())
    errs.update(grad_errors(names, [g.cpu() for g in grads(o, S, xk + flat_state(sk))],
                            [g.cpu() for g in grads(o_ref, S_ref, xr + flat_state(sr))]))
    return errs


def assert_triton_matches(op, tol=None, **case) -> dict[str, float]:
    """:func:`triton_errors` of one case, every entry under ``tol`` (default
    :data:`TRITON_TOL` of the case's dtype); returns the errors."""
    tol = tol or TRITON_TOL[case["dtype"]]
    errs = triton_errors(op, **case)
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"{op} {case}: errors over {tol}: {bad}"
    return errs


@st.composite
def triton_cases(draw):
    """Small cases for the interpreter: ragged T (1..150), packed documents (B == 1) or
    B in {1, 2}, K in {16, 32}, V in {16, 24, 33}, strong or mild decays, with or without
    an initial state, float32 or bf16."""
    T = draw(st.integers(1, 150))
    cuts = ()
    if T > 1 and draw(st.booleans()):
        cuts = tuple(sorted(draw(st.sets(st.integers(1, T - 1), min_size=1, max_size=3))))
    return dict(B=1 if cuts else draw(st.integers(1, 2)), T=T, H=draw(st.integers(1, 2)),
                K=draw(st.sampled_from([16, 32])), V=draw(st.sampled_from([16, 24, 33])),
                cuts=cuts, strong=draw(st.booleans()), initial=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16])),
                seed=draw(st.integers(0, 2**31 - 1)))


FIXED_CASES = [  # every Triton test run covers these, whatever hypothesis draws
    dict(B=2, T=1, H=2, K=16, V=24, cuts=(), strong=False, initial=True, dtype=torch.float32, seed=1),
    dict(B=1, T=150, H=2, K=32, V=33, cuts=(1, 64, 100), strong=True, initial=True,
         dtype=torch.float32, seed=2),
    dict(B=2, T=130, H=1, K=32, V=16, cuts=(), strong=True, initial=False, dtype=torch.bfloat16, seed=3),
    # strong decays: the initial state's gradient underflows float32 (GRAD_FLOOR)
    dict(B=1, T=61, H=1, K=16, V=16, cuts=(), strong=True, initial=True, dtype=torch.float32, seed=0),
]


# The quick layer's case for every Triton op: two packed documents (one boundary inside
# the second chunk), strong decays, an initial state, float32 (the tightest tolerance).
QUICK_CASE = dict(B=1, T=70, H=1, K=16, V=24, cuts=(1, 40), strong=True, initial=True,
                  dtype=torch.float32, seed=6)


def assert_compiled_equals_eager(op, xs, state):
    """``torch.compile(fullgraph=True)`` of a ``backend='triton'`` call traces (no graph
    break) and its gradients equal eager's."""
    torch._dynamo.reset()
    xs, state = leaves(xs, state)
    fn = getattr(ops, op)
    all_leaves = xs + flat_state(state)
    pair = isinstance(state, tuple)  # mLSTM's (C, n)

    def f(*args):
        s = args[len(xs):]
        o, S = fn(*args[:len(xs)], initial_state=tuple(s) if pair else s[0],
                  output_final_state=True, backend="triton")
        return (o * o).sum() + sum(x.sum() for x in flat_state(S))

    eager = torch.autograd.grad(f(*all_leaves), all_leaves)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*all_leaves), all_leaves)
    for a, b in zip(got, eager):
        assert rel_err(a, b) < 1e-6


def assert_sm90_compiles(kernels: str):
    """Run ``tests/sm90.py KERNELS`` (compiled Triton, no GPU needed: it compiles one
    kernel file's kernels for sm_90 and checks shared memory and register spills) and fail
    with its output if it fails. Skips only where Triton's NVIDIA backend (ptxas) is
    missing; the Triton wheels on PyPI ship it."""
    import triton

    if not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    root = Path(__file__).resolve().parents[1]
    pythonpath = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(root / "tests" / "sm90.py"), kernels],
                       env={**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": pythonpath},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
