"""One description per op: its callable, one-token step, float64 reference, engine, and
the inputs that exercise it.

Tests, benchmarks and examples draw their inputs from here rather than writing them out
per op, so a new op is described once (:class:`OpSpec`, registered in :data:`SPECS`) and
every catalogue-driven test and benchmark picks it up.

Sizes. :meth:`OpSpec.make_inputs` takes ``B, T, H, K, V``; the other sizes an input may
use are derived from them and can be overridden by keyword: ``N`` (sequences: B, or the
packed documents), ``G`` (groups of Mamba-2's B and C shared across heads, default 1),
``Hkv`` (key/value heads of attention, default H), ``C = H * K`` (conv channels), ``W``
(short conv width, default 4) and ``L`` (long conv kernel length, default T).

Regimes (``decay=``). ``'mild'``: decays near 1 (memories of tens of tokens);
``'strong'``: per-token decays down to ~e^-15 and beyond (exp underflow, cancellation in
cumulative gates); ``'normalizer'`` (mLSTM only): aligned keys and long memory, so the
max(|q n|, 1) normalizer is active and its gradients nearly cancel. Ops without decays
draw the same values in 'mild' and 'strong'.

Every value of the dict :meth:`OpSpec.make_inputs` returns is a floating-point tensor the
op differentiates. :meth:`OpSpec.sample` draws a whole call (inputs, packed offsets,
initial states) as a :class:`Sample`: ``spec.fn(**s.inputs, **s.kwargs, ...)``; options
(``chunk_size``, ``backend``, ``sp``, ...) are the caller's.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .linear import (
    delta_rule,
    delta_rule_reference,
    delta_rule_step,
    gated_delta_rule,
    gated_delta_rule_reference,
    gated_delta_rule_step,
    gla,
    gla_reference,
    gla_step,
    linear_attn,
    linear_attn_reference,
    linear_attn_step,
    mamba2,
    mamba2_reference,
    mamba2_step,
    mlstm,
    mlstm_reference,
    mlstm_step,
    simple_gla,
    simple_gla_reference,
    simple_gla_step,
)
from .linear.delta import DELTA
from .linear.diag import DIAG
from .linear.engine import LinearEngine
from .linear.mlstm import MLSTM
from .long_conv import long_conv, long_conv_reference
from .short_conv import short_conv, short_conv_reference, short_conv_step
from .softmax_attn import softmax_attn, softmax_attn_reference
from .validate import fail

FAMILIES = ("linear", "attn", "conv")
REGIMES = ("mild", "strong", "normalizer")

Draw = Callable[[tuple, torch.Generator, str], torch.Tensor]


# ---------------------------------------------------------------- value distributions
# Each draws float32 values of ``shape`` with ``gen`` (on the generator's device) for a
# regime; the caller casts them to the input's dtype and device.

def _randn(shape, gen):
    return torch.randn(shape, generator=gen, device=gen.device)


def normal(shape, gen, decay):
    """Standard normal."""
    return _randn(shape, gen)


def unit(shape, gen, decay):
    """Unit L2 norm along the last dimension (the delta rules' keys: their transition
    ``I - beta k^T k`` is a contraction only for ``|k| <= 1``)."""
    return F.normalize(_randn(shape, gen), dim=-1)


def shifted(shift: float) -> Draw:
    """Standard normal, plus ``shift`` in the 'normalizer' regime (aligned vectors)."""
    def draw(shape, gen, decay):
        x = _randn(shape, gen)
        return x + shift if decay == "normalizer" else x
    draw.__doc__ = f"Standard normal (+ {shift} in the 'normalizer' regime)."
    return draw


def fan_in(shape, gen, decay):
    """Normal scaled by ``shape[-1] ** -0.5`` (conv taps: outputs of order one)."""
    return _randn(shape, gen) / math.sqrt(shape[-1])


def log_decay(shape, gen, decay):
    """Log decay <= 0: ``logsigmoid(x + 2)`` (mild, a_t ~ 0.88) or ``logsigmoid(3 x - 6)``
    (strong, a_t down to ~e^-15)."""
    x = _randn(shape, gen)
    return F.logsigmoid(3 * x - 6 if decay == "strong" else x + 2)


def key_log_decay(shape, gen, decay):
    """GLA's per-key log decay over (..., K): :func:`log_decay`, but in the strong regime
    only the even key channels decay strongly and the odd ones mildly, so one state
    holds channels that forget within a token beside channels that keep tens of tokens
    (the spread of cumulative decays a chunk's key-gate factorization must survive)."""
    x = _randn(shape, gen)
    if decay != "strong":
        return F.logsigmoid(x + 2)
    even = torch.arange(shape[-1], device=x.device) % 2 == 0
    return F.logsigmoid(torch.where(even, 3 * x - 6, x + 2))


def constant_log_decay(shape, gen, decay):
    """Retention's fixed per-head log decay ``log(1 - 2^-(e + h))`` over (B, T, H), e = 5
    (mild, RetNet's) or 1 (strong); the same at every token and batch row."""
    H = shape[-1]
    e = 5.0 if decay == "mild" else 1.0
    h = torch.arange(H, dtype=torch.float64, device=gen.device)
    return torch.log1p(-(2.0 ** (-e - h))).float().expand(shape).contiguous()


def probability(shape, gen, decay):
    """In (0, 1): ``sigmoid(x)`` (the delta rules' write strength beta)."""
    return torch.sigmoid(_randn(shape, gen))


def forget_preact(shape, gen, decay):
    """mLSTM forget-gate pre-activation: ``x + 2`` (mild), ``3 x - 6`` (strong),
    ``x + 6`` (normalizer: long memory)."""
    x = _randn(shape, gen)
    return {"mild": x + 2, "strong": 3 * x - 6, "normalizer": x + 6}[decay]


def time_step(shape, gen, decay):
    """Mamba-2's dt > 0: ``softplus(x - 4)`` (mild, ~0.02, Mamba's initial range) or
    ``softplus(2 x + 1)`` (strong, ~0.1 to 5)."""
    x = _randn(shape, gen)
    return F.softplus(2 * x + 1 if decay == "strong" else x - 4)


def negative_rate(shape, gen, decay):
    """Mamba-2's A < 0 per head: ``-exp(u)``, u ~ U(0, log 16) (its initial range)."""
    u = torch.rand(shape, generator=gen, device=gen.device)
    return -torch.exp(u * math.log(16.0))


# Draws whose values depend on the regime: the decays and what acts as one.
DECAYS = (log_decay, key_log_decay, constant_log_decay, forget_preact, time_step)


# ---------------------------------------------------------------- specs

def _source(generator, device) -> tuple[torch.Generator, torch.device]:
    """The generator to draw with (default: seeded with 0 on ``device``, else CPU) and
    the device to put the values on (default: the generator's)."""
    gen = generator if generator is not None else torch.Generator(
        device=device if device is not None else "cpu").manual_seed(0)
    return gen, (torch.device(device) if device is not None else gen.device)


@dataclass(frozen=True)
class Input:
    """One tensor argument: its keyword name, its shape in size symbols, how its values
    are drawn, and its dtype ('data': the dtype asked for, e.g. q, k, v; 'float32':
    gates and parameters that ops use in float32)."""
    name: str
    dims: tuple[str, ...]
    draw: Draw = normal
    dtype: str = "data"

    @property
    def timed(self) -> bool:
        """Laid out ``(B, T, ...)``: sliced per token by a step, sharded by SP. Others
        (weights, kernels, per-head parameters) are replicated."""
        return self.dims[:2] == ("B", "T")


@dataclass(frozen=True)
class OpSpec:
    """An op described once.

    Attributes:
        name: catalogue key (an op of :mod:`seqpar.ops`, or a variant such as
            'retention', which runs ``simple_gla`` with a constant decay).
        fn: the public op. step: its one-token step or None. reference: its float64
            reference (same arguments as ``fn`` less ``chunk_size``, ``backend``, ``sp``).
        engine: the linear family's engine object (:data:`~seqpar.ops.linear.diag.DIAG`,
            ``DELTA``, ``MLSTM``: its reference step, chunk path, kernels and SP algebra);
            None for attention and convolutions, which have no engine object.
            :attr:`engine_name` names it for display. family: 'linear', 'attn', 'conv'.
        inputs: the tensor arguments, in call order (all accepted by keyword).
        state: the parts of the initial/final state ((), one, or mLSTM's pair).
        outputs: names of what ``fn`` returns (one name: a bare tensor).
        regimes: the ``decay=`` values :meth:`make_inputs` accepts.
        variant_of: the op ``fn`` is, for variants (benchmarks skip them).
        bf16_grad_tol: gradients (by input name) whose relative error with bf16 inputs
            may exceed the precision contract's 2e-2, and their bound (the entry says why).
    """
    name: str
    fn: Callable
    step: Callable | None
    reference: Callable
    engine: LinearEngine | None
    family: str
    inputs: tuple[Input, ...]
    state: tuple[Input, ...] = ()
    outputs: tuple[str, ...] = ("o", "final_state")
    regimes: tuple[str, ...] = ("mild", "strong")
    variant_of: str | None = None
    bf16_grad_tol: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.family not in FAMILIES:
            fail("family", "one of " + ", ".join(FAMILIES), repr(self.family))
        if (self.family == "linear") != isinstance(self.engine, LinearEngine):
            fail("engine", "a LinearEngine for the linear family, None for the others",
                 f"{self.engine!r} for family {self.family!r}")

    @property
    def decays(self) -> bool:
        """Whether an input is a decay (or forget gate, or time step) whose 'strong'
        regime draws other values than 'mild'."""
        return any(i.draw in DECAYS for i in self.inputs)

    @property
    def engine_name(self) -> str:
        """The engine's name: 'diag', 'delta', 'mlstm', or the family ('attn', 'conv')."""
        return self.family if self.engine is None else self.engine.name

    # -- sizes

    def resolve(self, B: int, T: int, H: int, K: int, V: int, N: int | None = None,
                **over) -> dict[str, int]:
        """Every size symbol of this op (see the module docstring), with overrides."""
        s = dict(B=B, T=T, H=H, K=K, V=V, N=B if N is None else N, G=1, Hkv=H, C=H * K,
                 W=4, L=T)
        bad = sorted(set(over) - set(s))
        if bad:
            fail("sizes", "keywords among " + ", ".join(s), ", ".join(bad))
        s.update(over)
        s["W-1"] = s["W"] - 1
        return s

    def shape(self, inp: Input, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] for d in inp.dims)

    # -- inputs

    @property
    def names(self) -> tuple[str, ...]:
        """Tensor argument names in call order."""
        return tuple(i.name for i in self.inputs)

    @property
    def timed(self) -> tuple[str, ...]:
        """Names of the inputs laid out (B, T, ...) (sharded under SP)."""
        return tuple(i.name for i in self.inputs if i.timed)

    def accepts(self, keyword: str) -> bool:
        """Whether ``fn`` takes ``keyword`` (e.g. 'initial_state', 'chunk_size')."""
        return keyword in inspect.signature(self.fn).parameters

    def make_inputs(self, B: int, T: int, H: int, K: int, V: int, *,
                    dtype: torch.dtype = torch.float32, device=None,
                    generator: torch.Generator | None = None, requires_grad: bool = False,
                    cu_seqlens: torch.Tensor | None = None, decay: str = "mild",
                    **sizes) -> dict[str, torch.Tensor]:
        """Fresh inputs ``{name: tensor}`` in call order, so ``fn(**inputs, ...)`` runs.

        dtype: of the data inputs (q, k, v, x, ...); gates and per-head parameters are
        float32. device: default the generator's (CPU without one); values are drawn on
        the generator's device and moved. generator: default seeded with 0.
        requires_grad: return leaves requiring grad. cu_seqlens: packed offsets the
        inputs will be called with (then B must be 1). decay: a regime of
        :attr:`regimes`. sizes: overrides of derived sizes (G, Hkv, C, W, L).
        """
        if decay not in self.regimes:
            fail("decay", f"one of {self.regimes} for {self.name}", repr(decay))
        if cu_seqlens is not None and B != 1:
            fail("cu_seqlens", "B == 1 with packed documents", f"B = {B}")
        gen, device = _source(generator, device)
        s = self.resolve(B, T, H, K, V, **sizes)
        out = {}
        for inp in self.inputs:
            x = inp.draw(self.shape(inp, s), gen, decay)
            x = x.to(device=device, dtype=dtype if inp.dtype == "data" else torch.float32)
            out[inp.name] = x.requires_grad_() if requires_grad else x
        return out

    def step_inputs(self, inputs: dict, t: int) -> dict:
        """The arguments of ``step`` at token ``t``: timed inputs sliced ``[:, t]``."""
        timed = set(self.timed)
        return {n: (x[:, t] if n in timed else x) for n, x in inputs.items()}

    # -- states

    def state_shape(self, N: int, H: int, K: int, V: int, **sizes):
        """Shape of the initial/final state: a tuple, a tuple of tuples (mLSTM's pair
        (C, n)), or None for stateless ops."""
        if not self.state:
            return None
        s = self.resolve(N, 1, H, K, V, N=N, **sizes)
        shapes = tuple(self.shape(p, s) for p in self.state)
        return shapes[0] if len(shapes) == 1 else shapes

    def make_state(self, N: int, H: int, K: int, V: int, *, dtype: torch.dtype = torch.float32,
                   device=None, generator: torch.Generator | None = None,
                   requires_grad: bool = False, **sizes):
        """A random initial state (standard normal) of :meth:`state_shape`: a tensor, a
        pair, or None. Recurrent states are float32; a conv state takes ``dtype``."""
        if not self.state:
            return None
        gen, device = _source(generator, device)
        s = self.resolve(N, 1, H, K, V, N=N, **sizes)
        parts = []
        for p in self.state:
            x = p.draw(self.shape(p, s), gen, "mild")
            x = x.to(device=device, dtype=dtype if p.dtype == "data" else torch.float32)
            parts.append(x.requires_grad_() if requires_grad else x)
        return parts[0] if len(parts) == 1 else tuple(parts)

    def outputs_of(self, result) -> tuple:
        """``fn``'s (or ``reference``'s) result as a tuple named by :attr:`outputs`."""
        return result if isinstance(result, tuple) else (result,)

    # -- whole calls

    def sample(self, B: int, T: int, H: int, K: int, V: int, *, seed: int = 0,
               generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
               device=None, cu_seqlens: Sequence[int] | torch.Tensor | None = None,
               initial: bool = True, decay: str = "mild", **sizes) -> Sample:
        """One call's fresh inputs: :meth:`make_inputs`, then (``initial``, for ops with
        a state) a random initial state of each sequence (the B rows, or the packed
        documents), drawn in that order from one generator.

        seed: seeds a CPU generator when ``generator`` is None (values are then the same
        on every device). cu_seqlens: packed document offsets from 0 to T (ints or an
        int32 tensor; B must be 1) or None. dtype, device, decay, sizes: as for
        :meth:`make_inputs`; the state is float32 (a conv state takes ``dtype``).
        """
        gen = generator if generator is not None else torch.Generator().manual_seed(seed)
        device = torch.device(device) if device is not None else gen.device
        cu = None
        if cu_seqlens is not None:
            offsets = (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor)
                       else list(cu_seqlens))
            if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != T:
                fail("cu_seqlens", f"offsets from 0 to T = {T}", offsets)
            cu = torch.tensor(offsets, dtype=torch.int32, device=device)
        xs = self.make_inputs(B, T, H, K, V, dtype=dtype, device=device, generator=gen,
                              cu_seqlens=cu, decay=decay, **sizes)
        N = B if cu is None else len(cu) - 1
        state = (self.make_state(N, H, K, V, dtype=dtype, device=device, generator=gen, **sizes)
                 if initial else None)
        return Sample(xs, state, cu, self.accepts("initial_state"))


@dataclass(frozen=True)
class Sample:
    """One call's inputs, from :meth:`OpSpec.sample`.

    Attributes:
        inputs: ``{name: tensor}`` in call order (see :meth:`OpSpec.make_inputs`).
        initial_state: a tensor, mLSTM's pair ``(C, n)``, or None.
        cu_seqlens: int32 document offsets ``(N + 1,)`` on the inputs' device, or None.
        stateful: whether the op takes ``initial_state`` (then :attr:`kwargs` passes it).
    """
    inputs: dict[str, torch.Tensor]
    initial_state: torch.Tensor | tuple[torch.Tensor, ...] | None
    cu_seqlens: torch.Tensor | None
    stateful: bool = True

    @property
    def kwargs(self) -> dict:
        """The call's keywords besides the inputs: ``cu_seqlens`` and, for ops with a
        state, ``initial_state``."""
        kw = {"cu_seqlens": self.cu_seqlens}
        if self.stateful:
            kw["initial_state"] = self.initial_state
        return kw

    @property
    def tensors(self) -> list[torch.Tensor]:
        """The inputs, then the state's parts: what gradients are taken of."""
        return [*self.inputs.values(), *state_parts(self.initial_state)]

    @property
    def names(self) -> list[str]:
        """Names of :attr:`tensors`: the input names, then ``initial_state[i]``."""
        n = len(state_parts(self.initial_state))
        return [*self.inputs, *(f"initial_state[{i}]" for i in range(n))]

    def leaves(self, dtype: torch.dtype | None = None, device=None) -> Sample:
        """A copy whose tensors are fresh leaves requiring grad, cast to ``dtype`` and
        moved to ``device`` where given (``cu_seqlens`` moved too)."""
        def leaf(x):
            return x.detach().to(device=device or x.device, dtype=dtype or x.dtype,
                                 copy=True).requires_grad_()

        s = self.initial_state
        s = None if s is None else (tuple(map(leaf, s)) if isinstance(s, tuple) else leaf(s))
        cu = self.cu_seqlens
        cu = cu.to(device) if cu is not None and device is not None else cu
        return Sample({n: leaf(x) for n, x in self.inputs.items()}, s, cu, self.stateful)


# Inputs shared by the linear family.
Q, K_, V_ = (Input("q", ("B", "T", "H", "K")), Input("k", ("B", "T", "H", "K")),
             Input("v", ("B", "T", "H", "V")))
K_UNIT = Input("k", ("B", "T", "H", "K"), unit)
G_HEAD = Input("g", ("B", "T", "H"), log_decay, "float32")
BETA = Input("beta", ("B", "T", "H"), probability)
STATE = (Input("initial_state", ("N", "H", "K", "V"), normal, "float32"),)


def _specs() -> list[OpSpec]:
    return [
        OpSpec("linear_attn", linear_attn, linear_attn_step, linear_attn_reference, DIAG, "linear",
               (Q, K_, V_), STATE),
        OpSpec("simple_gla", simple_gla, simple_gla_step, simple_gla_reference, DIAG, "linear",
               (Q, K_, V_, G_HEAD), STATE),
        OpSpec("retention", simple_gla, simple_gla_step, simple_gla_reference, DIAG, "linear",
               (Q, K_, V_, Input("g", ("B", "T", "H"), constant_log_decay, "float32")), STATE,
               variant_of="simple_gla"),
        OpSpec("gla", gla, gla_step, gla_reference, DIAG, "linear",
               (Q, K_, V_, Input("g", ("B", "T", "H", "K"), key_log_decay, "float32")), STATE),
        OpSpec("delta_rule", delta_rule, delta_rule_step, delta_rule_reference, DELTA, "linear",
               (Q, K_UNIT, V_, BETA), STATE),
        OpSpec("gated_delta_rule", gated_delta_rule, gated_delta_rule_step,
               gated_delta_rule_reference, DELTA, "linear", (Q, K_UNIT, V_, G_HEAD, BETA), STATE),
        OpSpec("mlstm", mlstm, mlstm_step, mlstm_reference, MLSTM, "linear",
               (Input("q", Q.dims, shifted(1.0)), Input("k", K_.dims, shifted(1.0)),
                Input("v", V_.dims, shifted(2.0)), Input("i", ("B", "T", "H"), normal, "float32"),
                Input("f", ("B", "T", "H"), forget_preact, "float32")),
               (STATE[0], Input("initial_state[1]", ("N", "H", "K"), normal, "float32")),
               regimes=("mild", "strong", "normalizer")),
        # Mamba-2 (SSD): x, B, C as v, k, q of the diag engine, dt folded into the gates.
        OpSpec("mamba2", mamba2, mamba2_step, mamba2_reference, DIAG, "linear",
               (Input("x", ("B", "T", "H", "V")), Input("dt", ("B", "T", "H"), time_step, "float32"),
                Input("A", ("H",), negative_rate, "float32"), Input("B", ("B", "T", "G", "K")),
                Input("C", ("B", "T", "G", "K")), Input("D", ("H",), normal, "float32")),
               STATE,
               # The op rounds dt into the 16-bit keys (k = dt B) while the gate keeps it in
               # float32, so with bf16 inputs the gradients of dt and A, sums over the key
               # channels or over every token, reach 4e-2.
               bf16_grad_tol={"dt": 6e-2, "A": 6e-2}),
        OpSpec("softmax_attn", softmax_attn, None, softmax_attn_reference, None, "attn",
               (Q, Input("k", ("B", "T", "Hkv", "K")), Input("v", ("B", "T", "Hkv", "V"))),
               outputs=("o", "lse")),
        OpSpec("short_conv", short_conv, short_conv_step, short_conv_reference, None, "conv",
               (Input("x", ("B", "T", "C")), Input("weight", ("C", "W"), fan_in),
                Input("bias", ("C",))),
               (Input("initial_state", ("N", "C", "W-1")),), outputs=("y", "final_state")),
        OpSpec("long_conv", long_conv, None, long_conv_reference, None, "conv",
               (Input("x", ("B", "T", "C")), Input("kernel", ("C", "L"), fan_in)), outputs=("y",)),
    ]


SPECS: dict[str, OpSpec] = {s.name: s for s in _specs()}


def state_parts(state) -> list:
    """A state as a list of tensors: [] for None, the pair's two parts, or [state]."""
    if state is None:
        return []
    return list(state) if isinstance(state, (tuple, list)) else [state]


def get(name: str) -> OpSpec:
    """The :class:`OpSpec` registered as ``name``."""
    if name not in SPECS:
        fail("name", "an op of the catalogue: " + ", ".join(SPECS), repr(name))
    return SPECS[name]


def names(family: str | None = None, *, variants: bool = True) -> list[str]:
    """Catalogue keys in registration order, of one family ('linear', 'attn', 'conv')
    if given; ``variants=False`` leaves out variants of another op (e.g. 'retention')."""
    if family is not None and family not in FAMILIES:
        fail("family", "None or one of " + ", ".join(FAMILIES), repr(family))
    return [n for n, s in SPECS.items()
            if (family is None or s.family == family) and (variants or s.variant_of is None)]
