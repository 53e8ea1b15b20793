"""The op catalogue: every entry calls its op, step and reference by the names it
declares, draws inputs with the shapes, dtypes and value ranges it documents, and its
regimes differ where the op has decays."""
from __future__ import annotations

import inspect

import pytest
import torch

from seqpar import ops
from seqpar.ops import catalog
from seqpar.ops.catalog import state_parts

ALL = [catalog.get(n) for n in catalog.names()]
B, T, H, K, V = 2, 9, 4, 8, 6


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.name)
def test_names_are_parameters(spec):
    """Every declared input is a parameter of fn, reference and step; the public op is
    the one :mod:`seqpar.ops` exports."""
    for f in (spec.fn, spec.reference, spec.step):
        if f is None:
            continue
        params = inspect.signature(f).parameters
        missing = [n for n in spec.names if n not in params]
        assert not missing, f"{spec.name}: {f.__name__} lacks {missing}"
    assert getattr(ops, spec.fn.__name__) is spec.fn
    assert spec.variant_of is None or spec.variant_of == spec.fn.__name__
    assert spec.state == () or spec.accepts("initial_state")


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.name)
def test_shapes_dtypes_and_call(spec):
    """Inputs have the declared shapes and dtypes; the op runs on them (and on its
    state) and returns outputs of the documented arity."""
    xs = spec.make_inputs(B, T, H, K, V, dtype=torch.bfloat16, requires_grad=True)
    assert list(xs) == list(spec.names)
    sizes = spec.resolve(B, T, H, K, V)
    for inp in spec.inputs:
        x = xs[inp.name]
        assert x.shape == spec.shape(inp, sizes) and x.requires_grad and x.is_leaf
        assert x.dtype == (torch.bfloat16 if inp.dtype == "data" else torch.float32), inp.name
    kw = {}
    if spec.state:
        s0 = spec.make_state(B, H, K, V)
        shapes = spec.state_shape(B, H, K, V)
        shapes = shapes if isinstance(shapes[0], tuple) else (shapes,)
        assert [tuple(p.shape) for p in state_parts(s0)] == list(shapes)
        kw = dict(initial_state=s0, output_final_state=True)
    out = spec.outputs_of(spec.fn(**xs, **kw))
    assert len(out) == len(spec.outputs)
    assert out[0].shape[:2] == (B, T)
    if spec.state:
        assert [p.shape for p in state_parts(out[1])] == [p.shape for p in state_parts(s0)]


def _values(name, decay, seed=0):
    spec = catalog.get(name)
    return spec.make_inputs(B, 64, H, K, V, decay=decay, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["simple_gla", "gla", "gated_delta_rule", "retention"])
def test_log_decays(name):
    """Log decays are <= 0, and strong ones reach far lower than mild ones."""
    mild, strong = _values(name, "mild")["g"], _values(name, "strong")["g"]
    assert (mild <= 0).all() and (strong <= 0).all()
    assert strong.mean() < 4 * mild.mean() and strong.min() < -0.5 and mild.max() > -0.1


def test_retention_decay_is_constant_per_head():
    g = _values("retention", "mild")["g"]
    assert torch.equal(g, g[:1, :1].expand_as(g))
    assert torch.allclose(g[0, 0].double().exp(), 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64)))


@pytest.mark.parametrize("name", ["delta_rule", "gated_delta_rule"])
def test_delta_rule_inputs(name):
    xs = _values(name, "strong")
    assert torch.allclose(xs["k"].norm(dim=-1), torch.ones(()), atol=1e-5)
    assert ((xs["beta"] > 0) & (xs["beta"] < 1)).all()


def test_mlstm_regimes():
    """Forget-gate pre-activations: strong mostly negative, mild and normalizer positive
    (the latter with shifted, aligned q, k, v)."""
    f = {d: _values("mlstm", d)["f"] for d in ("mild", "strong", "normalizer")}
    assert f["strong"].mean() < -4 and 1 < f["mild"].mean() < 3 and f["normalizer"].mean() > 5
    assert _values("mlstm", "normalizer")["q"].mean() > 0.5


def test_conv_sizes_override():
    spec = catalog.get("short_conv")
    xs = spec.make_inputs(1, 10, 2, 4, 4, W=3)
    assert xs["x"].shape == (1, 10, 8) and xs["weight"].shape == (8, 3)
    assert spec.state_shape(5, 2, 4, 4, W=3) == (5, 8, 2)
    assert catalog.get("long_conv").make_inputs(1, 10, 2, 4, 4, L=7)["kernel"].shape == (8, 7)
    assert catalog.get("softmax_attn").make_inputs(1, 10, 4, 8, 4, Hkv=2)["k"].shape == (1, 10, 2, 8)


def test_seeded_and_on_device():
    spec = catalog.get("gla")
    a = spec.make_inputs(B, T, H, K, V, generator=torch.Generator().manual_seed(3))
    b = spec.make_inputs(B, T, H, K, V, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a[n], b[n]) for n in a)
    meta = spec.make_inputs(B, T, H, K, V, device="meta", generator=torch.Generator().manual_seed(3))
    assert all(x.device.type == "meta" for x in meta.values())


def test_lookup_and_bad_arguments_raise():
    assert catalog.names("conv") == ["short_conv", "long_conv"]
    assert "retention" in catalog.names("linear") and "retention" not in catalog.names(variants=False)
    with pytest.raises(ValueError, match="name: .*'nope'"):
        catalog.get("nope")
    with pytest.raises(ValueError, match="family"):
        catalog.names("ssm")
    spec = catalog.get("gla")
    with pytest.raises(ValueError, match="decay: .*'normalizer'"):
        spec.make_inputs(B, T, H, K, V, decay="normalizer")
    with pytest.raises(ValueError, match="cu_seqlens: .*B = 2"):
        spec.make_inputs(B, T, H, K, V, cu_seqlens=torch.tensor([0, 3, T], dtype=torch.int32))
    with pytest.raises(ValueError, match="sizes: .*Z"):
        spec.make_inputs(B, T, H, K, V, Z=3)
