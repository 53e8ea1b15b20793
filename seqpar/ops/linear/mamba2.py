"""Mamba-2's state space duality (SSD) layer as one more diagonal-transition op.

Per head h, with ``dt_t > 0``, ``A_h < 0``, keys ``B_t`` and queries ``C_t`` of the
head's group (d_state K) and inputs ``x_t`` (head dim V):

``S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t^T x_t``,  ``y_t = C_t S_t + D_h x_t``

with the state ``S`` of shape (K, V). That is :func:`simple_gla` with ``q = C``,
``k = dt B``, ``v = x``, ``g = dt A`` and scale 1, plus the skip ``D x``: this module
only maps the inputs, so the chunk path, the Triton kernels and sequence parallelism
are simple GLA's.

Conventions follow mamba_ssm's ``mamba_chunk_scan_combined`` (layout (B, T, H, ...),
``n_groups`` G dividing H with head h reading group ``h // (H // G)``, optional
``dt_bias`` and ``dt_softplus``), except for the state: seqpar's (N, H, K, V), the
transpose of mamba_ssm's (N, H, headdim, d_state). The ``z`` gate is left to the layer
(Mamba-2 applies it inside its gated RMSNorm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validate import check_tensor, fail
from .simple_gla import simple_gla


def _effective_dt(dt, dt_bias, dt_softplus: bool):
    """``softplus(dt + dt_bias)`` (each part optional), in dt's dtype."""
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    return F.softplus(dt) if dt_softplus else dt


def _skip(D, H: int, V: int, dtype):
    """D as a tensor broadcasting against (..., H, V): (H, 1) or (H, V)."""
    D = D.to(dtype)
    return D[:, None] if D.dim() == 1 else D


class _Skip(torch.autograd.Function):
    """``o + D x`` in x's dtype, with D's gradient a contraction over tokens that
    accumulates in float32: as an autograd product in bf16, each term ``dy x`` would be
    rounded before the sum, and a sum small against its terms (they cancel) would keep
    little relative precision."""

    @staticmethod
    def forward(ctx, o, x, D):
        ctx.save_for_backward(x, D)
        return o + x * _skip(D, *x.shape[-2:], x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, D = ctx.saved_tensors
        dx = dy * _skip(D, *x.shape[-2:], dy.dtype)
        dD = torch.einsum("bthv,bthv->hv" if D.dim() == 2 else "bthv,bthv->h", dy, x.to(dy.dtype))
        return dy, dx, dD.to(D.dtype)


def _check(x, dt, A, B, C, D, dt_bias, dt_softplus, per_token: bool):
    """Validate a call (``per_token``: the step's (N, H, ...) layout without T); returns
    ``(H, G, K, V)``."""
    lead = 2 if per_token else 3
    check_tensor("x", x, ndim=lead + 1)
    if not per_token and x.shape[1] == 0:
        fail("x", "at least one token (T >= 1)", f"shape {tuple(x.shape)}")
    *bt, H, V = x.shape
    check_tensor("B", B, ndim=lead + 1, dtypes=(x.dtype,), device=x.device)
    G, K = B.shape[-2:]
    check_tensor("B", B, shape=(*bt, G, K))
    if H % G:
        fail("B", f"a number of groups dividing the H = {H} heads of x (shape (*, G, K))",
             f"shape {tuple(B.shape)}")
    check_tensor("C", C, shape=(*bt, G, K), dtypes=(x.dtype,), device=x.device)
    check_tensor("dt", dt, shape=(*bt, H), device=x.device)
    check_tensor("A", A, shape=(H,), device=x.device)
    if D is not None:
        check_tensor("D", D, device=x.device)
        if tuple(D.shape) not in ((H,), (H, V)):
            fail("D", f"shape ({H},) or ({H}, {V}) or None", f"shape {tuple(D.shape)}")
    if dt_bias is not None:
        check_tensor("dt_bias", dt_bias, shape=(H,), device=x.device)
    if not isinstance(dt_softplus, bool):
        fail("dt_softplus", "a bool", type(dt_softplus).__name__)
    return H, G, K, V


def mamba2(x, dt, A, B, C, *, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
           output_final_state=False, cu_seqlens=None, chunk_size=64, backend="auto", sp=None):
    """Mamba-2's SSD scan.

    Args:
        x: (B, T, H, V) float16/bfloat16/float32 inputs (V = head dim).
        dt: (B, T, H) time steps, any float dtype, used in float32; after ``dt_bias``
            and ``dt_softplus`` they must be >= 0 (then every decay is <= 1).
        A: (H,) rates < 0, any float dtype. B, C: (B, T, G, K) in x's dtype, G | H
            (n_groups; K = d_state). Groups are broadcast to heads by a copy, and
            ``dt B`` is one more (B, T, H, K) tensor in x's dtype.
        D: (H,) or (H, V) skip weight, or None. dt_bias: (H,) or None, added to dt.
        dt_softplus: apply softplus to ``dt (+ dt_bias)``.
        initial_state: (N, H, K, V), N = B or the number of packed documents.
        cu_seqlens, chunk_size, backend, sp: as in :func:`seqpar.ops.gla`.
    Returns:
        y: (B, T, H, V) in x's dtype; final state (N, H, K, V) float32, or None.
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        # As every op here: run on x, B, C in the autocast dtype, with autocast off.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, B, C = (t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (x, B, C))
        with torch.autocast(x.device.type, enabled=False):
            return mamba2(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                          initial_state=initial_state, output_final_state=output_final_state,
                          cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend, sp=sp)
    H, G, K, V = _check(x, dt, A, B, C, D, dt_bias, dt_softplus, per_token=False)
    b, T = x.shape[:2]
    dt = _effective_dt(dt.float(), dt_bias, dt_softplus)
    g = dt * A.float()
    # dt folded into the keys: (b, T, G, 1, K) * (b, T, G, H/G, 1) is the per-head copy
    # the group broadcast needs anyway.
    k = (B[:, :, :, None] * dt.reshape(b, T, G, H // G, 1).to(B.dtype)).reshape(b, T, H, K)
    q = C if G == H else C.repeat_interleave(H // G, dim=2)
    o, S = simple_gla(q, k, x, g, scale=1.0, initial_state=initial_state,
                      output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                      chunk_size=chunk_size, backend=backend, sp=sp)
    if D is not None:
        o = _Skip.apply(o, x, D)
    return o, S


def mamba2_step(x, dt, A, B, C, state, *, D=None, dt_bias=None, dt_softplus=False):
    """One token of :func:`mamba2` for generation, computed in the state's dtype.

    x: (N, H, V); dt: (N, H); A: (H,); B, C: (N, G, K); state: (N, H, K, V) (float32
    in generation, float64 in the reference). Returns y (N, H, V) in x's dtype and the
    new state.
    """
    H, G, K, V = _check(x, dt, A, B, C, D, dt_bias, dt_softplus, per_token=True)
    check_tensor("state", state, shape=(x.shape[0], H, K, V), device=x.device)
    cd = state.dtype
    dt = _effective_dt(dt.to(cd), dt_bias, dt_softplus)
    Bh, Ch = (t.to(cd).repeat_interleave(H // G, dim=1) for t in (B, C))
    xc = x.to(cd)
    state = (state * torch.exp(dt * A.to(cd))[..., None, None]
             + (dt[..., None] * Bh)[..., :, None] * xc[..., None, :])
    y = torch.einsum("nhk,nhkv->nhv", Ch, state)
    if D is not None:
        y = y + xc * _skip(D, H, V, cd)
    return y.to(x.dtype), state


def mamba2_reference(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, initial_state=None,
                     output_final_state=False, cu_seqlens=None):
    """Float64 token-by-token reference of :func:`mamba2` (its own recurrence, not the
    simple GLA mapping). Returns y (B, T, H, V) and the final state (N, H, K, V), float64."""
    H, G, K, V = _check(x, dt, A, B, C, D, dt_bias, dt_softplus, per_token=False)
    b, T = x.shape[:2]
    f64 = torch.float64
    offsets = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    if cu_seqlens is not None and b != 1:
        fail("cu_seqlens", "B == 1 with packed documents", f"B = {b}")
    n_seq = b if cu_seqlens is None else len(offsets) - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=(n_seq, H, K, V), device=x.device)

    def up(t):
        return None if t is None else t.to(f64)

    x, dt, A, B, C, D, dt_bias = map(up, (x, dt, A, B, C, D, dt_bias))
    ys, finals = [], []
    for d, (s, e) in enumerate(zip(offsets, offsets[1:])):  # batch rows together, or one document
        if initial_state is None:
            S = torch.zeros(b if cu_seqlens is None else 1, H, K, V, dtype=f64, device=x.device)
        else:
            S = up(initial_state if cu_seqlens is None else initial_state[d:d + 1])
        out = []
        for t in range(s, e):
            y, S = mamba2_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], S, D=D, dt_bias=dt_bias,
                               dt_softplus=dt_softplus)
            out.append(y)
        ys.append(torch.stack(out, 1))
        finals.append(S)
    return torch.cat(ys, 1), (torch.cat(finals, 0) if output_final_state else None)
