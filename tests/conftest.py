"""Shared test set-up and helpers: where Triton kernels run, the relative-error metric of
the precision contract, the hypothesis profiles, the inputs and error tables of the
Triton kernel tests (on CPU and on the GPU), and the SP case of one linear op
(test_parallel.py on gloo, test_sp_gpu.py on one GPU). Test files share helpers through
this file, never by importing one another.

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

import collections
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
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

# After the set-up; they import no kernel module.
from seqpar.ops import catalog  # noqa: E402
from seqpar.ops.catalog import state_parts  # noqa: E402
from seqpar.ops.linear.delta import DELTA  # noqa: E402
from seqpar.ops.linear.mlstm import MLSTM  # noqa: E402
from seqpar.parallel import shard  # noqa: E402

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

# The linear family's ops (variants such as retention run their op's kernels and engine).
LINEAR = [catalog.get(n) for n in catalog.names("linear", variants=False)]

# A case's ``strong`` (see :func:`triton_cases`) as a catalogue regime.
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
    """Every error of ``errs`` (one ``case``) under its :func:`bound`."""
    bad = {n: e for n, e in errs.items() if not e < bound(spec, n, case["dtype"], tol)}
    assert not bad, f"{spec.name} {case}: errors over their bounds: {bad} (all: {errs})"


def assert_triton_matches(spec, tol=None, **case) -> dict[str, float]:
    """:func:`triton_errors` of one case, each under its :func:`bound`; returns them."""
    errs = triton_errors(spec, **case)
    assert_errors_within(spec, errs, case, tol)
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


def assert_compiled_equals_eager(spec, s):
    """``torch.compile(fullgraph=True)`` of ``spec``'s ``backend='triton'`` call on sample
    ``s`` (its initial state required) traces (no graph break) and its gradients equal
    eager's."""
    torch._dynamo.reset()
    s = s.leaves(device=DEVICE)
    n = len(s.inputs)
    pair = isinstance(s.initial_state, tuple)  # mLSTM's (C, n)

    def f(*args):
        parts = args[n:]
        o, S = spec.fn(*args[:n], initial_state=tuple(parts) if pair else parts[0],
                       output_final_state=True, backend="triton")
        return (o * o).sum() + sum(x.sum() for x in state_parts(S))

    eager = torch.autograd.grad(f(*s.tensors), s.tensors)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*s.tensors), s.tensors)
    for a, b in zip(got, eager):
        assert rel_err(a, b) < 1e-6


def assert_sm90_compiles(kernels: str):
    """Run ``tests/sm90.py KERNELS`` (compiled Triton, no GPU needed: it compiles one
    kernel file's kernels for sm_90 and checks shared memory and register spills) and fail
    with its output if it fails. Skips only where Triton's NVIDIA backend (ptxas) is
    missing; the Triton wheels on PyPI ship it."""
    import triton

    if not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
        pytest.skip("the sm_90 compile check needs ptxas, which Triton's PyPI wheels ship "
                    "in triton/backends/nvidia/bin; this Triton install has none")
    root = Path(__file__).resolve().parents[1]
    pythonpath = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(root / "tests" / "sm90.py"), kernels],
                       env={**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": pythonpath},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]


# ---- Sequence parallelism: one linear op sharded vs whole (gloo on CPU, or one GPU) ----

def fresh_leaf(x):
    """A detached copy of ``x`` requiring grad."""
    return x.detach().clone().requires_grad_()


def _weighted(ts, ws):
    return sum((t * w).sum() for t, w in zip(ts, ws))


def grads_or_zeros(loss, leaves):
    """Gradients of every leaf; zeros for a leaf this rank does not read (an initial
    state on a rank where no sequence starts)."""
    gs = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


class Checker:
    """Collects ``name -> max relative error over ranks`` for one case."""

    def __init__(self, sp):
        self.sp, self.errs = sp, {}

    def add(self, name, got, want):
        e = torch.tensor(rel_err(got, want), dtype=torch.float64)
        dist.all_reduce(e, op=dist.ReduceOp.MAX, group=self.sp.group)
        self.errs[name] = max(self.errs.get(name, 0.0), e.item())

    def add_summed(self, name, got, want):
        """A replicated input's gradient: this rank's share, summed over the group."""
        got = got.clone()
        dist.all_reduce(got, group=self.sp.group)
        self.add(name, got, want)


def prefix_ends(sp, T):
    """Global index after the last token of each rank's shard (its final state's point)."""
    n = sp.world * (2 if sp.layout == "zigzag" else 1)
    c = T // n
    return [(r + 1) * c if sp.layout == "contiguous" else (n - r) * c for r in range(sp.world)]


def linear_case(sp, spec, packed, seed, T=24, chunk_size=4, backend="torch", *, dims=None,
                offsets=None, decay="mild", device="cpu"):
    """SP vs single-process run of one linear op of the catalogue; returns the error
    table. Inputs laid out (B, T, ...) are sharded; the others (Mamba-2's A, D) and the
    initial state are replicated, their gradients summed over ranks.

    dims: (H, K, V) (default (2, 4, 6); (2, 16, 24) for Triton, whose tiles take head
    dims from 16). offsets: the packed documents (default :func:`packed_offsets`
    scaled to T). decay: the catalogue regime; 'mild' by default, as under strong decays
    gradients that sum over every token with cancellation (Mamba-2's dA) differ between
    sharded and whole runs by more than test_parallel.py's 1e-5. device: where the inputs are
    (drawn on the CPU, the same everywhere)."""
    gen = torch.Generator().manual_seed(seed)
    H, K, V = dims or ((2, 16, 24) if backend == "triton" else (2, 4, 6))
    B = 1 if packed else 2
    cu = None
    if packed:
        cu = offsets if offsets is not None else (
            (packed_offsets(sp).double() * (T / 24)).round().to(torch.int32))
    s = spec.sample(B, T, H, K, V, generator=gen, cu_seqlens=cu, device=device,
                    decay=decay)
    w = torch.randn(B, T, H, V, generator=gen).to(device)
    w2 = [torch.randn(p.shape, generator=gen).to(device) for p in state_parts(s.initial_state)]
    kw = dict(output_final_state=True, chunk_size=chunk_size, backend=backend)

    # Reference: full sequence, one process. Unpacked, each rank's final state is the
    # state after its last token: a prefix run.
    ref = s.leaves()
    o_ref, S_ref = spec.fn(**ref.inputs, **ref.kwargs, **kw)
    loss = (o_ref * w).sum()
    if packed:
        loss = loss + _weighted(state_parts(S_ref), w2)
        S_mine = S_ref
    else:
        S_all = [spec.fn(**{n: x[:, :e] if n in spec.timed else x for n, x in ref.inputs.items()},
                         initial_state=ref.initial_state, **kw)[1] for e in prefix_ends(sp, T)]
        loss = loss + sum(_weighted(state_parts(S), w2) for S in S_all)
        S_mine = S_all[sp.rank]
    grads_ref = torch.autograd.grad(loss, ref.tensors)

    # SP: this rank's shard.
    mine = s.leaves()
    sp_x = {n: fresh_leaf(shard(x, sp)) if n in spec.timed else x for n, x in mine.inputs.items()}
    o, S = spec.fn(**sp_x, **mine.kwargs, **kw, sp=sp)
    loss = (o * shard(w, sp)).sum() + _weighted(state_parts(S), w2)
    grads = grads_or_zeros(loss, [*sp_x.values(), *state_parts(mine.initial_state)])

    chk = Checker(sp)
    chk.add("o", o, shard(o_ref.detach(), sp))
    for i, (a, b) in enumerate(zip(state_parts(S), state_parts(S_mine))):
        # Packed: each rank holds the documents that end on it, zeros for the others.
        (chk.add_summed if packed else chk.add)(f"S[{i}]", a.detach(), b.detach())
    for name, g, g_ref in zip(s.names, grads, grads_ref):
        if name in spec.timed:
            chk.add(f"d{name}", g, shard(g_ref, sp))
        else:
            chk.add_summed(f"d{name}", g, g_ref)
    return chk.errs


def packed_offsets(sp):
    """Packed documents of a 24-token stream: some cross chunk edges, and (except with
    2 contiguous ranks, whose only edge must be crossed) one starts exactly on an edge
    (12), after a document ending there."""
    if sp.layout == "contiguous" and sp.world == 2:
        return torch.tensor([0, 1, 10, 14, 22, 24], dtype=torch.int32)
    return torch.tensor([0, 1, 10, 12, 13, 22, 24], dtype=torch.int32)


# ---- The trainer's tests: a tiny corpus, model and run, a damaged file ----

# The trainer tests' model (layers and mixers from the pattern).
SMALL = dict(d_model=32, n_heads=2, head_dim=16, chunk_size=16, max_seq_len=64)


def write_corpus(path: Path, n: int = 300, seed: int = 0) -> Path:
    """``n`` short documents (3..60 characters) as jsonl: many boundaries per window."""
    rng = random.Random(seed)
    words = ["def", "x", "return", "(", ")", ":", "import", "seqpar", "é", "λ", "\n", "    "]
    with path.open("w") as f:
        for _ in range(n):
            text = "".join(rng.choice(words) for _ in range(rng.randint(2, 20)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def small_cfg(data: Path, out: Path, pattern: str, **kw):
    """A :class:`seqpar.train.TrainConfig` of a tiny ``pattern`` model (:data:`SMALL`)
    trained on ``data`` for 6 short steps, writing under ``out``; ``kw`` overrides."""
    from seqpar.train import TrainConfig  # on use: most test files never load the trainer

    layers = len(pattern.split(","))
    return TrainConfig(model=dict(SMALL, pattern=pattern, n_layers=layers), data=str(data),
                       out=str(out), progress=False, **{**dict(seq_len=32, batch_size=2, steps=6,
                                                               lr=1e-2, warmup=2, log_every=1,
                                                               eval_batches=1, save_every=3), **kw})


def flip_bytes(path: Path) -> None:
    """Invert 4 KiB in the middle of the file, keeping its size."""
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 4096] = bytes(b ^ 0xFF for b in raw[mid:mid + 4096])
    path.write_bytes(bytes(raw))


def autograd_nodes(t: torch.Tensor) -> collections.Counter:
    """Autograd nodes behind ``t`` by type (each node once): the size of its graph."""
    seen, stack, count = set(), [t.grad_fn], collections.Counter()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        count[type(f).__name__] += 1
        stack.extend(g for g, _ in f.next_functions)
    return count
