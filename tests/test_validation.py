"""Bad input to the linear family raises ValueError naming the argument, what was
expected and what came. Each case mutates one argument of an otherwise valid call."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from seqpar import ops

B, T, H, K, V = 2, 12, 2, 8, 6


def _inputs():
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    return dict(
        q=q, k=k, v=v,
        g_head=torch.nn.functional.logsigmoid(torch.randn(B, T, H)),
        g_key=torch.nn.functional.logsigmoid(torch.randn(B, T, H, K)),
        beta=torch.rand(B, T, H),
    )


def _call(op, x, **over):
    """Call ``op`` with valid arguments, replaced by ``over``."""
    args = dict(q=x["q"], k=x["k"], v=x["v"])
    if op in ("simple_gla", "gated_delta_rule"):
        args["g"] = x["g_head"]
    if op == "gla":
        args["g"] = x["g_key"]
    if op in ("delta_rule", "gated_delta_rule"):
        args["beta"] = x["beta"]
    if op == "mlstm":
        args["i"], args["f"] = x["g_head"], x["g_head"]
    kwargs = {n: over.pop(n) for n in list(over) if n not in args}
    args.update(over)
    return getattr(ops, op)(**args, **kwargs)


def _packed(n):
    """B == 1 inputs for packed-sequence cases."""
    x = _inputs()
    return {n_: t[:1] for n_, t in x.items()}


LINEAR = ["linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "mlstm"]

CASES = [
    # (id, op, override builder, message fragments)
    ("q-not-tensor", "linear_attn", lambda x: dict(q=x["q"].tolist()), ["q:", "torch.Tensor", "list"]),
    ("q-3d", "linear_attn", lambda x: dict(q=x["q"][0]), ["q:", "4-D", "3-D"]),
    ("q-empty-T", "linear_attn", lambda x: dict(q=x["q"][:, :0], k=x["k"][:, :0], v=x["v"][:, :0]),
     ["q:", "T >= 1"]),
    ("k-shape", "gla", lambda x: dict(k=x["k"][..., :4]), ["k:", f"({B}, {T}, {H}, {K})", f"({B}, {T}, {H}, 4)"]),
    ("v-length", "simple_gla", lambda x: dict(v=x["v"][:, :5]), ["v:", "shape", f"({B}, 5, {H}, {V})"]),
    ("k-dtype", "delta_rule", lambda x: dict(k=x["k"].double()), ["k:", "float32", "float64"]),
    ("q-int", "linear_attn", lambda x: dict(q=x["q"].long(), k=x["k"].long(), v=x["v"].long()),
     ["q:", "dtype", "int64"]),
    ("v-device", "linear_attn", lambda x: dict(v=torch.empty(B, T, H, V, device="meta")), ["v:", "cpu", "meta"]),
    ("g-head-for-gla", "gla", lambda x: dict(g=x["g_head"]), ["g:", f"({B}, {T}, {H}, {K})"]),
    ("g-key-for-simple-gla", "simple_gla", lambda x: dict(g=x["g_key"]), ["g:", f"({B}, {T}, {H})"]),
    ("g-device", "gated_delta_rule", lambda x: dict(g=torch.empty(B, T, H, device="meta")), ["g:", "meta"]),
    ("beta-shape", "gated_delta_rule", lambda x: dict(beta=x["beta"][..., None]), ["beta:", f"({B}, {T}, {H})"]),
    ("mlstm-i-shape", "mlstm", lambda x: dict(i=x["g_key"]), ["i:", f"({B}, {T}, {H})"]),
    ("mlstm-state-not-pair", "mlstm", lambda x: dict(initial_state=torch.zeros(B, H, K, V)),
     ["initial_state", "pair", "Tensor"]),
    ("mlstm-n-shape", "mlstm", lambda x: dict(initial_state=(torch.randn(B, H, K, V), torch.randn(B, H, V))),
     ["initial_state[1]", f"({B}, {H}, {K})"]),
    ("state-shape", "gla", lambda x: dict(initial_state=torch.randn(B, H, V, K)),
     ["initial_state:", f"({B}, {H}, {K}, {V})", f"({B}, {H}, {V}, {K})"]),
    ("backend-name", "simple_gla", lambda x: dict(backend="cuda"), ["backend:", "'triton'", "'cuda'"]),
    ("chunk-size-zero", "gla", lambda x: dict(chunk_size=0), ["chunk_size:", "positive int", "0"]),
    ("chunk-size-float", "delta_rule", lambda x: dict(chunk_size=32.0), ["chunk_size:", "32.0"]),
    ("scale-str", "linear_attn", lambda x: dict(scale="0.1"), ["scale:", "float", "str"]),
    ("final-state-flag", "linear_attn", lambda x: dict(output_final_state="yes"), ["output_final_state:", "bool"]),
    ("cu-seqlens-batch", "linear_attn", lambda x: dict(cu_seqlens=torch.tensor([0, 5, T], dtype=torch.int32)),
     ["cu_seqlens:", "B == 1", f"B = {B}"]),
]

PACKED_CASES = [
    ("cu-seqlens-start", lambda: torch.tensor([1, 5, T], dtype=torch.int32), ["cu_seqlens:", "first offset 0", "1"]),
    ("cu-seqlens-end", lambda: torch.tensor([0, 5, T - 1], dtype=torch.int32), ["cu_seqlens:", f"T = {T}", f"{T - 1}"]),
    ("cu-seqlens-order", lambda: torch.tensor([0, 7, 5, T], dtype=torch.int32),
     ["cu_seqlens:", "increasing", "7 followed by 5"]),
    ("cu-seqlens-empty-doc", lambda: torch.tensor([0, 5, 5, T], dtype=torch.int32), ["cu_seqlens:", "5 followed by 5"]),
    ("cu-seqlens-float", lambda: torch.tensor([0.0, 5.0, T]), ["cu_seqlens:", "int32", "float32"]),
    ("cu-seqlens-2d", lambda: torch.tensor([[0, 5, T]], dtype=torch.int32), ["cu_seqlens:", "1-D", "2-D"]),
    ("cu-seqlens-single", lambda: torch.tensor([0], dtype=torch.int32), ["cu_seqlens:", "two offsets"]),
]


def _check(exc, fragments):
    msg = str(exc.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


@pytest.mark.parametrize("name,op,over,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_argument(name, op, over, fragments):
    x = _inputs()
    with pytest.raises(ValueError) as exc:
        _call(op, x, **over(x))
    _check(exc, fragments)


@pytest.mark.parametrize("op", LINEAR)
@pytest.mark.parametrize("name,cu,fragments", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_bad_cu_seqlens(op, name, cu, fragments):
    with pytest.raises(ValueError) as exc:
        _call(op, _packed(op), cu_seqlens=cu())
    _check(exc, fragments)


def test_cu_seqlens_read_once_per_tensor(monkeypatch):
    """The offsets are read to the host once per cu_seqlens tensor, not once per op call
    (each read of a CUDA tensor waits for the device); a write in place or another
    tensor is read again, so the checks always see the current values."""
    from seqpar.ops.validate import check_cu_seqlens

    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    cu = torch.tensor([0, 5, T], dtype=torch.int32)
    assert check_cu_seqlens(cu, 1, T, cu.device) == [0, 5, T]
    assert check_cu_seqlens(cu, 1, T, cu.device) == [0, 5, T]
    assert len(reads) == 1
    cu[1] = 7
    assert check_cu_seqlens(cu, 1, T, cu.device) == [0, 7, T]
    assert len(reads) == 2
    cu[1] = 0  # an empty first document, written in place after a good read
    with pytest.raises(ValueError, match="0 followed by 0"):
        check_cu_seqlens(cu, 1, T, cu.device)
    other = torch.tensor([0, 7, T], dtype=torch.int32)
    assert check_cu_seqlens(other, 1, T, other.device) == [0, 7, T]
    assert len(reads) == 4
    with pytest.raises(ValueError, match=f"T = {T + 1}"):  # same tensor, another length
        check_cu_seqlens(other, 1, T + 1, other.device)


@pytest.mark.parametrize("op", [o for o in LINEAR if o != "mlstm"])
def test_state_count_follows_documents(op):
    """With three packed documents the initial state needs three rows, not B."""
    cu = torch.tensor([0, 3, 7, T], dtype=torch.int32)
    with pytest.raises(ValueError) as exc:
        _call(op, _packed(op), cu_seqlens=cu, initial_state=torch.randn(1, H, K, V))
    _check(exc, ["initial_state:", f"(3, {H}, {K}, {V})", f"(1, {H}, {K}, {V})"])


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = _inputs()
    with pytest.raises(ValueError) as exc:
        _call("linear_attn", x, backend="triton")
    _check(exc, ["backend:", "CUDA", "cpu"])


@pytest.mark.parametrize("op", LINEAR + ["softmax_attn"])
def test_autocast_takes_mixed_qkv(op):
    """Under autocast the ops take q, k, v of mixed dtypes, as layers produce them under
    CUDA autocast (F.normalize of q and k in float32 beside a bf16 v): they run in the
    autocast dtype, exactly as with those inputs cast first, and gradients reach the
    float32 leaves. Outside autocast the same call is refused."""
    x = _inputs()
    if op == "softmax_attn":
        x["v"] = torch.randn(B, T, H, K)
    q, k = x["q"].requires_grad_(), x["k"].requires_grad_()
    v = x["v"].bfloat16().requires_grad_()

    def call(q, k, v):
        if op == "softmax_attn":
            return ops.softmax_attn(q, k, v)[0]
        return _call(op, x, q=q, k=k, v=v)[0]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = call(q, k, v)
    ref = call(q.detach().bfloat16(), k.detach().bfloat16(), v.detach())
    assert o.dtype == torch.bfloat16
    assert torch.equal(o, ref)
    o.float().sum().backward()
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0
    assert v.grad.dtype == torch.bfloat16 and v.grad.abs().sum() > 0
    with pytest.raises(ValueError) as exc:
        call(q, k, v)
    _check(exc, ["v:", "float32", "bfloat16"])


def test_ops_need_no_extras():
    """The library below the programs (ops, parallel, layers, models) imports neither rich
    nor matplotlib: they are extras of `seqpar train` and `seqpar bench`."""
    code = ("import sys\n"
            "sys.modules['rich'] = sys.modules['matplotlib'] = None  # importing them fails\n"
            "import seqpar.ops, seqpar.parallel, seqpar.layers, seqpar.models\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_step_state_shape_and_scale_are_checked():
    """A one-token step refuses a state of the wrong shape, naming it, and every op
    refuses a scale that is not a positive finite number (no silent wrong answer)."""
    from seqpar import ops

    q, v = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    g = torch.zeros(2, 3, 4)
    for bad in (torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 5, 4), torch.zeros(3, 4, 5)):
        with pytest.raises(ValueError, match=r"state: expected a tensor of shape \(B, H, K, V\)"):
            ops.gla_step(q, q, v, g, bad)
    with pytest.raises(ValueError, match="state"):
        ops.gated_delta_rule_step(q, q, v, g[..., 0], g[..., 0], torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="state"):
        ops.mlstm_step(q, q, v, g[..., 0], g[..., 0], (torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 5)))
    x = torch.randn(1, 4, 2, 8)
    for scale in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale: expected a positive finite float"):
            ops.linear_attn(x, x, x, scale=scale)
