"""Softmax attention, short and long convolutions against naive float64 formulas.

softmax_attn: explicit masked softmax (``softmax_attn_reference``); outputs, lse and the
gradients of q, k, v under a loss on both o and lse, over hypothesis-drawn shapes with
T = 1, GQA / MQA, value head dims equal to and different from the query head dim,
causal and not, cross-attention lengths, packed documents; on both engines (flash
kernel, float32 math). The SP building blocks: two key blocks merged by ``merge_attn``
(differentiated by autograd) and ``attn_block_backward`` from the final (o, lse) equal
full attention.
short_conv: a direct sum over the taps; outputs, final states, the gradients of x,
weight, bias and initial_state; packed documents; step-by-step streaming.
long_conv: the direct sum over lags up to T = 4096; outputs and gradients of x, kernel.
Precision contract: relative L2 1e-4 in float32, 2e-2 with bf16 inputs (against the
reference on the same bf16 values in float64).
"""
from __future__ import annotations

import contextlib
import importlib
from unittest import mock

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from conftest import rel_err
from seqpar import ops
from seqpar.ops.long_conv import next_fast_len
from seqpar.ops.softmax_attn import attn_block, attn_block_backward, merge_attn

# The module, not the function ``ops.softmax_attn`` that shadows it as an attribute.
attn_mod = importlib.import_module("seqpar.ops.softmax_attn")
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# The CUDA paths (flash kernels through torch.ops.aten) run only where a GPU is.
CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])
DTYPES = st.sampled_from([torch.float32, torch.float32, torch.bfloat16])


def _leaves(xs, dtype=None):
    """Detached copies (cast to ``dtype`` if given) requiring grad; None stays None."""
    return [None if x is None else (x if dtype is None else x.to(dtype)).detach().requires_grad_()
            for x in xs]


def _grads(outs, cots, leaves):
    loss = sum((o.to(c.dtype) * c).sum() for o, c in zip(outs, cots) if o is not None)
    live = [x for x in leaves if x is not None]
    return torch.autograd.grad(loss, live)


def compare(fn, ref, xs, names, out_names, seed):
    """Relative errors of ``fn(*xs)`` against ``ref(*xs in float64)``: every output and
    the gradient of every (non-None) input under a random linear loss on all outputs."""
    xc, xr = _leaves(xs), _leaves(xs, torch.float64)
    outs, outs_ref = fn(*xc), ref(*xr)
    gen = torch.Generator().manual_seed(seed)
    # The gradient reaching a bf16 output is bf16: the reference gets the same rounded
    # values (else a sum with cancellation, e.g. dbias over few tokens, is ill-conditioned).
    cots = [None if o is None else
            torch.randn(o.shape, generator=gen).to(o.dtype).to(torch.float64).to(o.device)
            for o in outs]
    errs = {}
    for n, o, r in zip(out_names, outs, outs_ref):
        assert (o is None) == (r is None), n
        if o is not None:
            assert o.shape == r.shape, (n, o.shape, r.shape)
            errs[n] = rel_err(o, r)
    g = _grads(outs, [None if c is None else c.float() for c in cots], xc)
    g_ref = _grads(outs_ref, cots, xr)
    live = [n for n, x in zip(names, xs) if x is not None]
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip(live, g, g_ref)})
    return errs


def assert_within(errs, dtype, what):
    tol = TOL[dtype]
    bad = {n: e for n, e in errs.items() if not e < tol}
    assert not bad, f"{what}: errors over {tol}: {bad} (all: {errs})"


def _randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _offsets(T, cuts):
    return torch.tensor((0, *cuts, T), dtype=torch.int32)


ENGINES = ["fused", "math"]


def engine(name):
    """Run softmax attention on one engine: ``fused`` (flash kernels, the default wherever
    they apply) or ``math`` (what CUDA float32 uses), forced here so CPU tests cover both."""
    if name == "fused":
        return contextlib.nullcontext()
    return mock.patch.object(attn_mod, "_fused_dim", lambda q, v: None)


# ---------------------------------------------------------------- softmax attention

@st.composite
def attn_cases(draw):
    T = draw(st.integers(1, 48))
    packed = draw(st.booleans())
    cuts = tuple(sorted(draw(st.sets(st.integers(1, T - 1), max_size=3)))) if packed and T > 1 else ()
    causal = draw(st.booleans())
    B = 1 if packed else draw(st.integers(1, 2))
    S = T if (causal or packed) else draw(st.integers(1, 48))
    Hkv = draw(st.integers(1, 2))
    H = Hkv * draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([4, 8, 16]))
    Dv = draw(st.sampled_from([D, D, 4, 12]))  # the flash kernel pads Dv != D
    scale = draw(st.sampled_from([None, 0.7]))
    return dict(B=B, T=T, S=S, H=H, Hkv=Hkv, D=D, Dv=Dv, causal=causal, packed=packed,
                cuts=cuts, scale=scale, dtype=draw(DTYPES), seed=draw(st.integers(0, 2**31 - 1)))


def _case(B, T, H, Hkv, D, Dv, causal, dtype, seed, S=None, packed=False, cuts=(), scale=None):
    return dict(B=B, T=T, S=T if S is None else S, H=H, Hkv=Hkv, D=D, Dv=Dv, causal=causal,
                packed=packed, cuts=cuts, scale=scale, dtype=dtype, seed=seed)


def _attn_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    return (_randn(gen, c["B"], c["T"], c["H"], c["D"], dtype=c["dtype"]),
            _randn(gen, c["B"], c["S"], c["Hkv"], c["D"], dtype=c["dtype"]),
            _randn(gen, c["B"], c["S"], c["Hkv"], c["Dv"], dtype=c["dtype"]))


@settings(max_examples=40)
@given(c=attn_cases())
@example(c=_case(B=2, T=1, H=2, Hkv=1, D=8, Dv=8, causal=True, dtype=torch.float32, seed=1))
@example(c=_case(B=1, T=1, H=1, Hkv=1, D=4, Dv=12, causal=False, dtype=torch.bfloat16, seed=2))
@example(c=_case(B=1, T=40, H=4, Hkv=2, D=16, Dv=16, causal=True, packed=True, cuts=(1, 2, 23),
                 dtype=torch.float32, seed=3))
@example(c=_case(B=1, T=40, H=3, Hkv=1, D=8, Dv=4, causal=False, packed=True, cuts=(39,),
                 dtype=torch.bfloat16, seed=4, scale=0.7))
@example(c=_case(B=2, T=7, S=30, H=2, Hkv=2, D=8, Dv=8, causal=False, dtype=torch.float32, seed=5))
@pytest.mark.parametrize("eng", ENGINES)
def test_softmax_attn_matches_reference(c, eng):
    cu = _offsets(c["T"], c["cuts"]) if c["packed"] else None
    kw = dict(causal=c["causal"], scale=c["scale"], cu_seqlens=cu)

    def fn(q, k, v):
        o, lse = ops.softmax_attn(q, k, v, **kw)
        assert o.dtype == c["dtype"] and lse.dtype == torch.float32
        return o, lse

    with engine(eng):
        errs = compare(fn, lambda q, k, v: ops.softmax_attn_reference(q, k, v, **kw),
                       _attn_inputs(c), ["q", "k", "v"], ["o", "lse"], c["seed"] + 1)
    assert_within(errs, c["dtype"], c)


def test_math_engine_over_many_tiles(monkeypatch):
    # Shrink the tile so one call loops over many query tiles, causal masks offset by
    # the tile start.
    monkeypatch.setattr(attn_mod, "_MATH_TILE", 2 * 3 * 40 * 5)
    c = _case(B=2, T=40, H=3, Hkv=1, D=8, Dv=6, causal=True, dtype=torch.float32, seed=7)
    kw = dict(causal=True)
    with engine("math"):
        errs = compare(lambda *x: ops.softmax_attn(*x, **kw),
                       lambda *x: ops.softmax_attn_reference(*x, **kw),
                       _attn_inputs(c), ["q", "k", "v"], ["o", "lse"], 8)
    assert_within(errs, torch.float32, c)


@settings(max_examples=15)
@given(c=attn_cases(), frac=st.floats(0.05, 0.95))
@example(c=_case(B=1, T=2, H=2, Hkv=1, D=8, Dv=8, causal=True, dtype=torch.float32, seed=9), frac=0.5)
@pytest.mark.parametrize("eng", ENGINES)
def test_merge_of_two_key_blocks_is_full_attention(c, frac, eng):
    """Non-causal: q against keys split in two. Causal: the later half of the queries
    against the earlier keys (no mask) and against their own positions (causal), as on
    a ring. Gradients flow through merge_attn and both lse's."""
    causal, scale = c["causal"], c["scale"]
    n = c["T"] if causal else c["S"]  # the length that is split
    assume(n >= 2)
    m = min(max(1, round(frac * n)), n - 1)

    def fn(q, k, v):
        if causal:
            q2 = q[:, m:]
            o1, l1 = attn_block(q2, k[:, :m], v[:, :m], causal=False, scale=scale)
            o2, l2 = attn_block(q2, k[:, m:], v[:, m:], causal=True, scale=scale)
        else:
            o1, l1 = attn_block(q, k[:, :m], v[:, :m], causal=False, scale=scale)
            o2, l2 = attn_block(q, k[:, m:], v[:, m:], causal=False, scale=scale)
        return merge_attn(o1, l1, o2, l2)

    def ref(q, k, v):
        o, lse = ops.softmax_attn_reference(q, k, v, causal=causal, scale=scale)
        return (o[:, m:], lse[:, :, m:]) if causal else (o, lse)

    with engine(eng):
        errs = compare(fn, ref, _attn_inputs(c), ["q", "k", "v"], ["o", "lse"], c["seed"] + 2)
    assert_within(errs, c["dtype"], (c, m))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Dv", [16, 8])
@pytest.mark.parametrize("eng", ENGINES)
def test_block_backward_with_final_result(dtype, Dv, device, eng):
    """Ring backward without partial results: every block's gradient from the final
    (o, lse) sums to the full causal attention gradient (loss on both o and lse)."""
    gen = torch.Generator().manual_seed(11)
    B, T, H, Hkv, D, P = 2, 24, 4, 2, 16, 3
    q, k, v = (_randn(gen, B, T, h, d, dtype=dtype).to(device)
               for h, d in ((H, D), (Hkv, D), (Hkv, Dv)))
    do = torch.randn(B, T, H, Dv, generator=gen).to(dtype).double().to(device)
    dlse = torch.randn(B, H, T, generator=gen, dtype=torch.float64).to(device)
    with engine(eng):
        dq, dk, dv, o = _ring_backward(q, k, v, do, dlse, P)
    xr = _leaves((q, k, v), torch.float64)
    o_ref, lse_ref = ops.softmax_attn_reference(*xr, causal=True)
    g_ref = torch.autograd.grad((o_ref * do).sum() + (lse_ref * dlse).sum(), xr)
    errs = {n_: rel_err(a, b) for n_, a, b in zip(("dq", "dk", "dv"), (dq, dk, dv), g_ref)}
    errs["o"] = rel_err(o, o_ref)
    assert_within(errs, dtype, (dtype, Dv, device, eng))


def _ring_backward(q, k, v, do, dlse, P):
    """Causal attention over P equal blocks: forward by softmax_attn, backward block by
    block from the final (o, lse) and the gradients of both; returns float64 dq, dk, dv
    and o."""
    B, T, H, D = q.shape
    Hkv, Dv, device = k.shape[2], v.shape[-1], q.device
    o, lse = ops.softmax_attn(q, k, v, causal=True)
    n = T // P
    dq = torch.zeros(B, T, H, D, dtype=torch.float64, device=device)
    dk, dv = [], []
    for j in range(P):  # key block j
        kj, vj = k[:, j * n:(j + 1) * n], v[:, j * n:(j + 1) * n]
        dkj = torch.zeros(B, n, Hkv, D, dtype=torch.float64, device=device)
        dvj = torch.zeros(B, n, Hkv, Dv, dtype=torch.float64, device=device)
        for i in range(j, P):  # query blocks that see it
            r = slice(i * n, (i + 1) * n)
            gq, gk, gv = attn_block_backward(do[:, r].float(), q[:, r], kj, vj, o[:, r],
                                             lse[:, :, r], causal=i == j,
                                             dlse=dlse[:, :, r].float())
            assert gq.dtype == torch.float32
            dq[:, r] += gq.double()
            dkj += gk.double()
            dvj += gv.double()
        dk.append(dkj)
        dv.append(dvj)
    return dq, torch.cat(dk, 1), torch.cat(dv, 1), o


@pytest.mark.parametrize("eng", ENGINES)
def test_lse_only_gradient(eng):
    """A loss on lse alone (no gradient reaches o) still differentiates q and k."""
    for Dv in (8, 5):
        c = _case(B=1, T=9, H=2, Hkv=1, D=8, Dv=Dv, causal=True, dtype=torch.float32, seed=13)
        xc, xr = _leaves(_attn_inputs(c)), _leaves(_attn_inputs(c), torch.float64)
        with engine(eng):
            g = torch.autograd.grad(ops.softmax_attn(*xc)[1].sum(), xc[:2])
        g_ref = torch.autograd.grad(ops.softmax_attn_reference(*xr)[1].sum(), xr[:2])
        assert_within({n: rel_err(a, b) for n, a, b in zip("qk", g, g_ref)}, torch.float32, Dv)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,D,Dv", [(torch.bfloat16, 64, 64), (torch.float16, 128, 128),
                                        (torch.bfloat16, 64, 32), (torch.bfloat16, 60, 60),
                                        (torch.float32, 64, 64)])
@pytest.mark.parametrize("packed", [False, True])
def test_softmax_attn_cuda(dtype, D, Dv, packed):
    """The CUDA engines (flash kernel for half precision, padded where Dv != D or D is
    not a multiple of 8; the math engine for float32), GQA, gradients through o and lse."""
    c = _case(B=1 if packed else 2, T=300, H=4, Hkv=2, D=D, Dv=Dv, causal=True, dtype=dtype,
              seed=21)
    kw = dict(causal=True, cu_seqlens=_offsets(300, (1, 129)).cuda() if packed else None)
    errs = compare(lambda *x: ops.softmax_attn(*x, **kw),
                   lambda *x: ops.softmax_attn_reference(*x, **kw),
                   [x.cuda() for x in _attn_inputs(c)], ["q", "k", "v"], ["o", "lse"], 22)
    assert_within(errs, dtype, c)


# ---------------------------------------------------------------- short convolution

@st.composite
def conv_cases(draw):
    T = draw(st.integers(1, 40))
    packed = draw(st.booleans())
    cuts = tuple(sorted(draw(st.sets(st.integers(1, T - 1), max_size=3)))) if packed and T > 1 else ()
    return dict(B=1 if packed else draw(st.integers(1, 3)), T=T, C=draw(st.integers(1, 6)),
                w=draw(st.integers(1, 5)), bias=draw(st.booleans()),
                activation=draw(st.sampled_from([None, "silu"])), initial=draw(st.booleans()),
                final=draw(st.booleans()), packed=packed, cuts=cuts, dtype=draw(DTYPES),
                seed=draw(st.integers(0, 2**31 - 1)))


def _conv_case(**kw):
    base = dict(B=2, T=10, C=3, w=4, bias=True, activation="silu", initial=True, final=True,
                packed=False, cuts=(), dtype=torch.float32, seed=0)
    return {**base, **kw}


def _conv_inputs(c):
    gen = torch.Generator().manual_seed(c["seed"])
    N = len(c["cuts"]) + 1 if c["packed"] else c["B"]
    return (_randn(gen, c["B"], c["T"], c["C"], dtype=c["dtype"]),
            _randn(gen, c["C"], c["w"], dtype=c["dtype"]),
            _randn(gen, c["C"], dtype=c["dtype"]) if c["bias"] else None,
            _randn(gen, N, c["C"], c["w"] - 1, dtype=c["dtype"]) if c["initial"] else None)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@settings(max_examples=40)
@given(c=conv_cases())
@example(c=_conv_case(T=1, w=4, initial=True))
@example(c=_conv_case(T=1, B=1, w=1, packed=True, dtype=torch.bfloat16))
@example(c=_conv_case(T=30, B=1, w=4, packed=True, cuts=(1, 2, 4, 17), activation=None))
@example(c=_conv_case(T=3, B=3, w=5, initial=True, final=True, dtype=torch.bfloat16))
@example(c=_conv_case(T=6, B=1, C=1, w=1, activation=None, initial=False, final=False,
                      dtype=torch.bfloat16, seed=2147483646))  # dbias: a sum with cancellation
@example(c=_conv_case(T=37, B=1, C=1, w=1, bias=False, initial=False, final=False,
                      dtype=torch.bfloat16, seed=18))  # dweight: needs float32 compute
def test_short_conv_matches_reference(c, device):
    cu = _offsets(c["T"], c["cuts"]).to(device) if c["packed"] else None
    kw = dict(activation=c["activation"], output_final_state=c["final"], cu_seqlens=cu)

    def fn(x, w, b, s0):
        y, S = ops.short_conv(x, w, b, initial_state=s0, **kw)
        assert y.dtype == c["dtype"] and (S is None or S.dtype == c["dtype"])
        return y, S

    errs = compare(fn, lambda x, w, b, s0: ops.short_conv_reference(x, w, b, initial_state=s0, **kw),
                   [None if x is None else x.to(device) for x in _conv_inputs(c)],
                   ["x", "weight", "bias", "initial_state"], ["y", "final_state"],
                   c["seed"] + 1)
    assert_within(errs, c["dtype"], c)


@pytest.mark.parametrize("w", [1, 2, 4])
def test_short_conv_streaming(w):
    """Token-by-token steps, and the sequence cut in two with the state carried over,
    reproduce the full-sequence outputs and final state."""
    c = _conv_case(B=2, T=13, C=5, w=w)
    x, weight, bias, s0 = _conv_inputs(c)
    y, S = ops.short_conv(x, weight, bias, initial_state=s0, output_final_state=True)
    state, steps = s0, []
    for t in range(c["T"]):
        yt, state = ops.short_conv_step(x[:, t], weight, bias, state=state)
        steps.append(yt)
    assert rel_err(torch.stack(steps, 1), y) < 1e-6
    assert torch.equal(state, S)
    y1, S1 = ops.short_conv(x[:, :2], weight, bias, initial_state=s0, output_final_state=True)
    y2, S2 = ops.short_conv(x[:, 2:], weight, bias, initial_state=S1, output_final_state=True)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-6
    assert torch.equal(S2, S)


def test_short_conv_step_from_zero_state():
    c = _conv_case(B=2, T=1, C=3, w=3, initial=False)
    x, weight, bias, _ = _conv_inputs(c)
    y, _ = ops.short_conv(x, weight, bias)
    yt, state = ops.short_conv_step(x[:, 0], weight, bias)
    assert rel_err(yt, y[:, 0]) < 1e-6 and state.shape == (2, 3, 2)


# ---------------------------------------------------------------- long convolution

@settings(max_examples=30)
@given(B=st.integers(1, 2), T=st.integers(1, 200), C=st.integers(1, 4), frac=st.floats(0, 1),
       dtype=DTYPES, seed=st.integers(0, 2**31 - 1))
@example(B=1, T=1, C=1, frac=1.0, dtype=torch.float32, seed=1)
def test_long_conv_matches_reference(B, T, C, frac, dtype, seed):
    L = max(1, round(frac * T))
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, B, T, C, dtype=dtype)
    kernel = (torch.randn(C, L, generator=gen) / L ** 0.5).to(dtype)
    errs = compare(lambda x, k: (ops.long_conv(x, k),), lambda x, k: (ops.long_conv_reference(x, k),),
                   (x, kernel), ["x", "kernel"], ["y"], seed + 1)
    assert_within(errs, dtype, (B, T, C, L, dtype))


@settings(max_examples=15)
@given(cuts=st.lists(st.integers(1, 119), min_size=1, max_size=4, unique=True),
       frac=st.floats(0, 1), dtype=DTYPES, seed=st.integers(0, 2**31 - 1))
@example(cuts=[1, 119], frac=1.0, dtype=torch.float32, seed=3)  # one-token documents
def test_long_conv_packed_matches_reference(cuts, frac, dtype, seed):
    """Packed documents: no lag reaches across a document start (the reference convolves
    each document alone); a kernel as long as the whole stream is cut per document."""
    T, C = 120, 3
    L = max(1, round(frac * T))
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, 1, T, C, dtype=dtype)
    kernel = (torch.randn(C, L, generator=gen) / L ** 0.5).to(dtype)
    cu = torch.tensor([0, *sorted(cuts), T], dtype=torch.int32)
    errs = compare(lambda x, k: (ops.long_conv(x, k, cu_seqlens=cu),),
                   lambda x, k: (ops.long_conv_reference(x, k, cu_seqlens=cu),),
                   (x, kernel), ["x", "kernel"], ["y"], seed + 1)
    assert_within(errs, dtype, (cuts, L, dtype))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("T,L", [(4096, 4096), (4095, 700)])
def test_long_conv_long_sequence(T, L, device):
    gen = torch.Generator().manual_seed(T + L)
    x = torch.randn(1, T, 3, generator=gen).to(device)
    kernel = (torch.randn(3, L, generator=gen) / L ** 0.5).to(device)
    errs = compare(lambda x, k: (ops.long_conv(x, k),), lambda x, k: (ops.long_conv_reference(x, k),),
                   (x, kernel), ["x", "kernel"], ["y"], 5)
    assert_within(errs, torch.float32, (T, L))


def test_next_fast_len_is_smallest_5_smooth():
    def smooth(n):
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        return n == 1

    for m in range(1, 3000):
        n = next_fast_len(m)
        assert n >= m and smooth(n) and not any(smooth(j) for j in range(m, n)), m


# ---------------------------------------------------------------- validation and sp

def _attn_args():
    gen = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(1, 6, 4, 8, generator=gen), k=torch.randn(1, 6, 2, 8, generator=gen),
                v=torch.randn(1, 6, 2, 5, generator=gen))


def _conv_args():
    return dict(x=torch.randn(2, 6, 3), weight=torch.randn(3, 4))


BAD = [
    ("attn-q-3d", "softmax_attn", lambda a: dict(q=a["q"][0]), ["q:", "4-D"]),
    ("attn-k-headdim", "softmax_attn", lambda a: dict(k=a["k"][..., :4]), ["k:", "(1, *, *, 8)", "(1, 6, 2, 4)"]),
    ("attn-v-length", "softmax_attn", lambda a: dict(v=a["v"][:, :5]), ["v:", "(1, 6, 2, *)", "(1, 5, 2, 5)"]),
    ("attn-gqa", "softmax_attn", lambda a: dict(k=torch.randn(1, 6, 3, 8), v=torch.randn(1, 6, 3, 5)),
     ["k:", "divides the 4 query heads", "3 heads"]),
    ("attn-dtype", "softmax_attn", lambda a: dict(k=a["k"].double()), ["k:", "float32", "float64"]),
    ("attn-causal-length", "softmax_attn", lambda a: dict(k=a["k"][:, :4], v=a["v"][:, :4]),
     ["k:", "S == T = 6", "S = 4"]),
    ("attn-causal-type", "softmax_attn", lambda a: dict(causal=1), ["causal:", "bool", "int"]),
    ("attn-packed-length", "softmax_attn",
     lambda a: dict(k=a["k"][:, :4], v=a["v"][:, :4], causal=False, cu_seqlens=_offsets(6, (3,))),
     ["cu_seqlens:", "S == T = 6", "S = 4"]),
    ("attn-packed-end", "softmax_attn", lambda a: dict(cu_seqlens=_offsets(5, (3,))),
     ["cu_seqlens:", "T = 6", "last offset 5"]),
    ("attn-scale", "softmax_attn", lambda a: dict(scale="big"), ["scale:", "float", "str"]),
    ("attn-empty", "softmax_attn", lambda a: dict(q=a["q"][:, :0], causal=False), ["q:", "T >= 1"]),
    ("conv-weight-channels", "short_conv", lambda a: dict(weight=torch.randn(4, 4)),
     ["weight:", "(3, *)", "(4, 4)"]),
    ("conv-width-0", "short_conv", lambda a: dict(weight=torch.randn(3, 0)), ["weight:", "w >= 1"]),
    ("conv-bias", "short_conv", lambda a: dict(bias=torch.randn(4)), ["bias:", "(3)", "(4,)"]),
    ("conv-activation", "short_conv", lambda a: dict(activation="relu"), ["activation:", "'silu'", "'relu'"]),
    ("conv-state-width", "short_conv", lambda a: dict(initial_state=torch.randn(2, 3, 2)),
     ["initial_state:", "(*, 3, 3)", "(2, 3, 2)"]),
    ("conv-state-count", "short_conv", lambda a: dict(initial_state=torch.randn(3, 3, 3)),
     ["initial_state:", "(2, 3, 3)", "(3, 3, 3)"]),
    ("conv-packed-batch", "short_conv", lambda a: dict(cu_seqlens=_offsets(6, (2,))),
     ["cu_seqlens:", "B == 1", "B = 2"]),
    ("conv-final-type", "short_conv", lambda a: dict(output_final_state=None), ["output_final_state:", "bool"]),
    ("conv-x-device", "short_conv", lambda a: dict(weight=torch.empty(3, 4, device="meta")),
     ["weight:", "cpu", "meta"]),
    ("long-L-over-T", "long_conv", lambda a: dict(kernel=torch.randn(3, 7)), ["kernel:", "L <= T = 6", "L = 7"]),
    ("long-channels", "long_conv", lambda a: dict(kernel=torch.randn(2, 3)), ["kernel:", "(3, *)", "(2, 3)"]),
    ("long-int", "long_conv", lambda a: dict(x=torch.ones(2, 6, 3, dtype=torch.int64)), ["x:", "int64"]),
]


def _valid_args(op):
    if op == "softmax_attn":
        return {**_attn_args(), "causal": True}
    if op == "short_conv":
        return _conv_args()
    return dict(x=torch.randn(2, 6, 3), kernel=torch.randn(3, 6))


@pytest.mark.parametrize("op,make,fragments", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_raises(op, make, fragments):
    """Each case replaces arguments of a valid call; the message names the argument,
    what was expected and what came."""
    args = _valid_args(op)
    with pytest.raises(ValueError) as err:
        getattr(ops, op)(**{**args, **make(args)})
    for f in fragments:
        assert f in str(err.value), (f, str(err.value))


class FakeSP:
    """Records the call an op hands to sequence parallelism."""

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.call = (name, args, kwargs)
            return "sp-result"
        return record


def test_sp_receives_validated_call():
    a = _attn_args()
    sp = FakeSP()
    cu = _offsets(6, (2,))
    assert ops.softmax_attn(a["q"], a["k"], a["v"], causal=True, cu_seqlens=cu, sp=sp) == "sp-result"
    name, args, kw = sp.call
    assert name == "softmax_attn" and args[0] is a["q"]
    assert kw == dict(causal=True, scale=8 ** -0.5, cu_seqlens=cu)

    c = _conv_args()
    s0 = torch.randn(2, 3, 3)
    assert ops.short_conv(c["x"], c["weight"], None, "silu", s0, True, sp=sp) == "sp-result"
    assert sp.call == ("short_conv", (c["x"], c["weight"], None),
                       dict(activation="silu", initial_state=s0, output_final_state=True, cu_seqlens=None))

    # A shard may be shorter than the kernel; sp checks L against the global length.
    x, kernel = torch.randn(1, 4, 3), torch.randn(3, 8)
    assert ops.long_conv(x, kernel, sp=sp) == "sp-result"
    assert sp.call == ("long_conv", (x, kernel), dict(cu_seqlens=None))
    with pytest.raises(ValueError, match="kernel:"):
        ops.long_conv(x, torch.randn(2, 8), sp=sp)


def test_softmax_attn_strided_keys():
    """Keys whose head dim is not unit-stride (a transposed projection), which the CPU
    flash kernel reads wrongly as they are: outputs and gradients match the reference."""
    q = torch.randn(2, 24, 4, 4, requires_grad=True)
    kb = torch.randn(2, 16, 24, requires_grad=True)
    v = torch.randn(2, 24, 4, 4, requires_grad=True)
    w = torch.randn(2, 24, 4, 4)
    o, _ = ops.softmax_attn(q, kb.transpose(1, 2).reshape(2, 24, 4, 4), v)
    grads = torch.autograd.grad((o * w).sum(), [q, kb, v])
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, kb, v))
    ro, _ = ops.softmax_attn_reference(qd, kd.transpose(1, 2).reshape(2, 24, 4, 4), vd)
    rgrads = torch.autograd.grad((ro * w.double()).sum(), [qd, kd, vd])
    assert rel_err(o, ro) < 1e-5
    for g, r in zip(grads, rgrads):
        assert rel_err(g, r) < 1e-5
