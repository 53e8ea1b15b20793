"""The CUDA engines of ``ops.softmax_attn`` (cuDNN, FA2 varlen), their plumbing on CPU.

The aten entry points they call are replaced by CPU stand-ins with the same contract
(argument order, (B, H, T, D) and (T, H, D) layouts, cuDNN's (B, H, T, 1) and FA2
varlen's (H, T) log-sum-exp, the output gradient read with the output's strides), built
from the CPU flash kernel. So the argument order, layouts, reshapes and the gradient
through lse are checked here against the float64 reference; the kernels themselves are
checked on the GPU by ``tests/test_attn_conv_ops.py -m gpu``.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from conftest import rel_err
from seqpar import ops

attn_mod = importlib.import_module("seqpar.ops.softmax_attn")
cpu_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class FakeAten:
    """torch.ops.aten with the CUDA attention entry points computed on CPU."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return getattr(torch.ops.aten, name)

    def _scaled_dot_product_cudnn_attention(self, q, k, v, bias, want_lse, dropout, causal, debug,
                                            *, scale):
        assert bias is None and want_lse is True and dropout == 0.0 and not debug
        self.calls.append("cudnn")
        o, lse = cpu_fwd(q, k, v, 0.0, causal, scale=scale)
        return (o, lse[..., None], None, None, q.shape[2], k.shape[2], torch.tensor(0),
                torch.tensor(0), None)

    def _scaled_dot_product_cudnn_attention_backward(self, do, q, k, v, o, lse, seed, offset, bias,
                                                     cq, ck, mq, mk, dropout, causal, *, scale):
        assert do.stride() == o.stride(), "cuDNN reads the output gradient with o's strides"
        assert lse.shape == (*q.shape[:3], 1) and bias is None and cq is None and ck is None
        assert (mq, mk) == (q.shape[2], k.shape[2])
        self.calls.append("cudnn_bwd")
        return cpu_bwd(do.contiguous(), q, k, v, o, lse[..., 0], 0.0, causal, scale=scale)

    @staticmethod
    def _docs(cu):
        return list(zip(cu.tolist(), cu.tolist()[1:]))

    def _flash_attention_forward(self, q, k, v, cq, ck, mq, mk, dropout, causal, debug, *, scale):
        assert q.dim() == 3 and cq is ck and dropout == 0.0 and not debug
        docs = self._docs(cq)
        assert mq == mk == max(e - s for s, e in docs), "max_q/max_k: the longest document"
        self.calls.append("varlen")
        o, lse = torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
        for s, e in docs:
            od, ld = cpu_fwd(*(x[s:e].transpose(0, 1)[None] for x in (q, k, v)), 0.0, causal,
                             scale=scale)
            o[s:e], lse[:, s:e] = od[0].transpose(0, 1), ld[0]
        return o, lse, torch.zeros(2, dtype=torch.int64), torch.zeros((), dtype=torch.int64), None

    def _flash_attention_backward(self, do, q, k, v, o, lse, cq, ck, mq, mk, dropout, causal, rng,
                                  unused, *, scale):
        assert lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous()
        self.calls.append("varlen_bwd")
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        for s, e in self._docs(cq):
            b = lambda x: x[s:e].transpose(0, 1)[None]  # noqa: E731, B023
            g = cpu_bwd(b(do).contiguous(), b(q), b(k), b(v), b(o), lse[None, :, s:e].contiguous(),
                        0.0, causal, scale=scale)
            for dst, src in zip((dq, dk, dv), g):
                dst[s:e] = src[0].transpose(0, 1)
        return dq, dk, dv


@pytest.fixture
def fake(monkeypatch):
    aten = FakeAten()
    monkeypatch.setattr(attn_mod, "_aten", aten)
    return aten


def _inputs(seed, T, H, Hkv, D, Dv, B=1):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, Dv))
    return [torch.randn(*s, generator=gen).requires_grad_() for s in shapes]


def _check(q, k, v, cu, seed, dlse=True):
    """Outputs and q, k, v gradients of the op (o and lse both in the loss) against the
    float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    o, lse = ops.softmax_attn(q, k, v, causal=True, cu_seqlens=cu)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    wl = torch.randn(lse.shape, generator=gen, dtype=torch.float64) if dlse else None
    xr = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, rl = ops.softmax_attn_reference(*xr, causal=True, cu_seqlens=cu)

    def loss(o_, l_):
        return (o_.double() * wo).sum() + ((l_.double() * wl).sum() if dlse else 0)

    g = torch.autograd.grad(loss(o, lse), (q, k, v))
    gr = torch.autograd.grad(loss(ro, rl), xr)
    errs = {"o": rel_err(o, ro), "lse": rel_err(lse, rl)}
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip("qkv", g, gr)})
    assert all(e < 1e-4 for e in errs.values()), errs


@pytest.mark.parametrize("dlse", [False, True])
def test_cudnn_engine_plumbing(fake, monkeypatch, dlse):
    monkeypatch.setattr(attn_mod, "_engine", lambda q, k, v, causal, packed: "cudnn")
    q, k, v = _inputs(1, 37, 3, 3, 16, 16, B=2)
    # keys and values split from one projection, as the attention layer makes them
    kv = torch.randn(2, 37, 2, 3, 16).requires_grad_()
    k, v = kv.unbind(2)
    _check(q, k, v, None, 2, dlse)
    assert fake.calls.count("cudnn") == (2 if dlse else 1) and "cudnn_bwd" in fake.calls


@pytest.mark.parametrize("dlse", [False, True])
@pytest.mark.parametrize("H,Hkv,D,Dv", [(4, 2, 16, 16), (2, 2, 12, 8)])
def test_varlen_engine_plumbing(fake, monkeypatch, dlse, H, Hkv, D, Dv):
    monkeypatch.setattr(attn_mod, "_engine", lambda q, k, v, causal, packed: "varlen" if packed else "flash")
    q, k, v = _inputs(3, 50, H, Hkv, D, Dv)
    cu = torch.tensor([0, 1, 20, 21, 50], dtype=torch.int32)
    _check(q, k, v, cu, 4, dlse)
    assert "varlen" in fake.calls and "varlen_bwd" in fake.calls


def test_one_document_is_the_dense_path(fake, monkeypatch):
    """cu_seqlens = [0, T] is one document: the dense engine, not the varlen one."""
    monkeypatch.setattr(attn_mod, "_engine", lambda q, k, v, causal, packed: "varlen" if packed else "cudnn")
    q, k, v = _inputs(5, 20, 2, 2, 8, 8)
    _check(q, k, v, torch.tensor([0, 20], dtype=torch.int32), 6)
    assert "varlen" not in fake.calls and "cudnn" in fake.calls


@pytest.mark.parametrize("dlse", [False, True])
def test_cudnn_block_plumbing(fake, monkeypatch, dlse):
    """The SP building blocks on cuDNN, as a ring rank runs them: the later queries
    against the earlier keys (a longer, unmasked key block) and against their own
    positions (causal), merged; each block's backward from the merged (o, lse) alone."""
    monkeypatch.setattr(attn_mod, "_block_kernel", lambda q, k, v, causal: "cudnn")
    q, k, v = _inputs(9, 40, 2, 2, 16, 16, B=2)
    m, gen = 25, torch.Generator().manual_seed(10)
    blocks = [(slice(0, m), False), (slice(m, 40), True)]
    qb = q[:, m:]
    parts = [attn_mod.attn_block_forward(qb, k[:, s], v[:, s], causal=c) for s, c in blocks]
    o, lse = attn_mod.merge_attn(*parts[0], *parts[1])
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    wl = torch.randn(lse.shape, generator=gen, dtype=torch.float64) if dlse else None
    dq = torch.zeros(qb.shape, dtype=torch.float64)
    dk, dv = torch.zeros(k.shape, dtype=torch.float64), torch.zeros(v.shape, dtype=torch.float64)
    for s, c in blocks:
        a, b, g = attn_mod.attn_block_backward(
            wo.float(), qb.detach(), k[:, s].detach(), v[:, s].detach(), o, lse, causal=c,
            dlse=None if wl is None else wl.float(), cast=False)
        dq += a.double()
        dk[:, s] += b.double()
        dv[:, s] += g.double()
    xr = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ro, rl = ops.softmax_attn_reference(*xr, causal=True)
    loss = (ro[:, m:] * wo).sum() + ((rl[:, :, m:] * wl).sum() if dlse else 0)
    gr = torch.autograd.grad(loss, xr)
    errs = {"o": rel_err(o, ro[:, m:]), "lse": rel_err(lse, rl[:, :, m:]),
            "dq": rel_err(dq, gr[0][:, m:]), "dk": rel_err(dk, gr[1]), "dv": rel_err(dv, gr[2])}
    assert all(e < 1e-4 for e in errs.values()), errs
    assert fake.calls.count("cudnn") >= 2 and fake.calls.count("cudnn_bwd") == 2, fake.calls


def test_cudnn_failure_falls_back_to_flash(monkeypatch):
    """A cuDNN that fails (old library, unsupported GPU) warns once and the flash kernel
    serves from then on."""
    class Broken(FakeAten):
        def _scaled_dot_product_cudnn_attention(self, *a, **kw):
            raise RuntimeError("cuDNN Frontend error: no valid execution plans")

    monkeypatch.setattr(attn_mod, "_aten", Broken())
    monkeypatch.setattr(attn_mod, "_cudnn_usable", True)
    monkeypatch.setattr(attn_mod, "_engine",
                        lambda q, k, v, causal, packed: "cudnn" if attn_mod._cudnn_usable else "flash")
    q, k, v = _inputs(7, 16, 2, 2, 8, 8)
    with pytest.warns(UserWarning, match="cuDNN attention failed"):
        _check(q, k, v, None, 8)
    assert attn_mod._cudnn_usable is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D,T,B", [(64, 300, 2), (128, 1000, 1)])
def test_cudnn_engine_on_gpu(monkeypatch, dtype, D, T, B):
    """Shapes cuDNN takes (no GQA, one head dim): the op picks cuDNN where the GPU and
    library support it (else flash, as SDPA would) and matches the float64 reference in
    outputs, lse and every gradient (loss on both o and lse), keys and values strided
    as the attention layer makes them."""
    chosen = []
    pick = attn_mod._engine
    monkeypatch.setattr(attn_mod, "_engine", lambda *a: chosen.append(pick(*a)) or chosen[-1])
    gen = torch.Generator().manual_seed(D)
    q = torch.randn(B, T, 4, D, generator=gen).to(dtype).cuda().requires_grad_()
    kv = torch.randn(B, T, 2, 4, D, generator=gen).to(dtype).cuda().requires_grad_()
    k, v = kv.unbind(2)
    o, lse = ops.softmax_attn(q, k, v, causal=True)
    wo = torch.randn(o.shape, generator=gen).to(dtype).double().cuda()
    wl = torch.randn(lse.shape, generator=gen, dtype=torch.float64).cuda()
    g = torch.autograd.grad((o.double() * wo).sum() + (lse.double() * wl).sum(), (q, kv))
    xr = [x.detach().double().requires_grad_() for x in (q, kv)]
    ro, rl = ops.softmax_attn_reference(xr[0], *xr[1].unbind(2), causal=True)
    gr = torch.autograd.grad((ro * wo).sum() + (rl * wl).sum(), xr)
    errs = {"o": rel_err(o, ro), "lse": rel_err(lse, rl), "dq": rel_err(g[0], gr[0]),
            "dkv": rel_err(g[1], gr[1])}
    assert chosen and chosen[0] in ("cudnn", "flash"), chosen
    assert all(e < 2e-2 for e in errs.values()), (chosen, errs)
    print(f"engine {chosen[0]}: {errs}")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fused_merge_kernel(out_dtype):
    """The fused merge (the Triton kernel, interpreted on CPU) equals merge_attn in
    float64: a strided first input as a kernel writes it, a bfloat16 second one, head
    count and dim that are not powers of two, a row whose first side sees no key."""
    from seqpar.ops.triton_attn_merge import merge_into

    gen = torch.Generator().manual_seed(12)
    B, T, H, D = 2, 7, 5, 24
    o1 = torch.randn(B, H, T, D, generator=gen).transpose(1, 2)
    o2 = torch.randn(B, T, H, D, generator=gen).bfloat16()
    l1, l2 = (torch.randn(B, H, T, generator=gen) * 3 for _ in range(2))
    l1[:, :, 3] = float("-inf")
    out, lse = torch.empty(B, T, H, D, dtype=out_dtype), torch.empty(B, H, T)
    merge_into(out, lse, o1, l1, o2, l2)
    ro, rl = attn_mod.merge_attn(o1.double(), l1.double(), o2.double(), l2.double())
    tol = 1e-6 if out_dtype == torch.float32 else 4e-3
    assert rel_err(out, ro) < tol and rel_err(lse, rl) < 1e-6, (rel_err(out, ro), rel_err(lse, rl))
    # the side without keys has weight exactly zero: the row is the other side's output
    assert torch.equal(out[:, 3], o2[:, 3].to(out_dtype))
