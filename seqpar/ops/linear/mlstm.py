"""mLSTM (xLSTM's matrix memory) with a sigmoid input gate.

``f_t = sigmoid(f~_t)``, ``i_t = sigmoid(i~_t)``, ``C_t = f_t C_{t-1} + i_t k_t^T v_t``,
``n_t = f_t n_{t-1} + i_t k_t``, ``o_t = scale q_t C_t / max(|scale q_t n_t^T|, 1)``.

The pair (C, n) is one diagonal-transition state: simple GLA with ``g = log f_t``, keys
``i_t k_t`` and values ``[v_t, 1]`` carries ``[C_t, n_t^T]`` in a (K, V + 1) state, so
mLSTM runs on the ``diag`` engine (its PyTorch path and sequence parallelism) and only
the final division is its own. On one device with the Triton backend it runs its own
kernels (triton_mlstm: the normalizer as a vector, 16-bit inputs directly, float32 where
the normalizer's gradient cancels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validate import (
    autocast_inputs,
    check_backend,
    check_gate,
    check_qkv,
    check_scale,
    check_step_state,
    check_tensor,
    fail,
)
from ._family import pick_backend, reference_scan
from ._run import check_options, documents, linear_call
from .diag import DIAG
from .engine import LinearEngine, Sequences, StatePass, scale_state, segments


def mlstm_step(q, k, v, i, f, state, scale=None):
    """One-token step. q, k: (B, H, K); v: (B, H, V); i, f: (B, H) gate
    pre-activations; state: the pair (C (B, H, K, V), n (B, H, K)), float32.
    Returns o (B, H, V) in v's dtype and the new pair."""
    scale = check_scale(scale, q.shape[-1])
    if not (isinstance(state, (tuple, list)) and len(state) == 2):
        fail("state", "the pair (C (B, H, K, V), n (B, H, K))", type(state).__name__)
    C, n = state
    check_step_state(C, q, v)
    if not isinstance(n, torch.Tensor) or n.shape != q.shape:
        fail("state[1] (n)", f"a tensor of shape {tuple(q.shape)}",
             tuple(n.shape) if isinstance(n, torch.Tensor) else type(n).__name__)
    out_dtype = v.dtype
    q, k, v, i, f = (x.to(C.dtype) for x in (q, k, v, i, f))
    fg, ig = torch.sigmoid(f), torch.sigmoid(i)
    C = fg[..., None, None] * C + ig[..., None, None] * k[..., :, None] * v[..., None, :]
    n = fg[..., None] * n + ig[..., None] * k
    num = scale * torch.einsum("bhk,bhkv->bhv", q, C)
    den = scale * (q * n).sum(-1, keepdim=True)
    return (num / den.abs().clamp_min(1.0)).to(out_dtype), (C, n)


def mlstm_reference(q, k, v, i, f, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None):
    """Float64 token-by-token reference of :func:`mlstm`; the state is the pair (C, n)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    offsets = None if cu_seqlens is None else cu_seqlens.tolist()

    def zero(b):
        return (torch.zeros(b, H, K, V, dtype=torch.float64, device=q.device),
                torch.zeros(b, H, K, dtype=torch.float64, device=q.device))

    def step(x, S):
        return mlstm_step(*x, S, scale)

    return reference_scan(step, (q, k, v, i, f), initial_state, zero, output_final_state, offsets)


@autocast_inputs
def mlstm(q, k, v, i, f, *, scale=None, initial_state=None, output_final_state=False,
          cu_seqlens=None, chunk_size=64, backend="auto", sp=None):
    """mLSTM with sigmoid input and forget gates and the max(|n q|, 1) normalizer.

    Args:
        q, k: (B, T, H, K); v: (B, T, H, V). i, f: (B, T, H) gate pre-activations
        (any float dtype, used in float32). initial_state: the pair
        (C (N, H, K, V), n (N, H, K)) or None. Other keywords as in :func:`seqpar.ops.gla`;
        backend 'triton' without ``sp`` runs triton_mlstm's kernels on q, k, v as given,
        otherwise the ``diag`` engine runs on float32 copies.
    Returns:
        o: (B, T, H, V) in v's dtype; the final pair (C, n) in float32, or None.
    """
    B, T, H, K, V = check_qkv(q, k, v)
    i = check_gate("i", i, (B, T, H), q.device).float()
    f = check_gate("f", f, (B, T, H), q.device).float()
    scale = check_scale(scale, K)
    if initial_state is not None:
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise ValueError("initial_state: expected the pair (C (N, H, K, V), n (N, H, K)) or None, "
                             f"got {type(initial_state).__name__}")
        C0, n0 = initial_state
        check_tensor("initial_state[0] (C)", C0, shape=(None, H, K, V), device=q.device)
        check_tensor("initial_state[1] (n)", n0, shape=(C0.shape[0], H, K), device=q.device)
    triton = pick_backend(check_backend(backend), q) == "triton"
    if sp is not None and triton:
        check_options(output_final_state, chunk_size, backend)
        state0 = None if initial_state is None else torch.cat([C0.float(), n0.float()[..., None]], -1)
        o, S = sp.linear(MLSTM, (q, k, v, i, f), scale=scale, initial_state=state0,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                         chunk_size=chunk_size, backend=backend)
        return o, (None if S is None else (S[..., :V], S[..., V]))
    if triton:
        check_options(output_final_state, chunk_size, backend)
        offsets, N = documents(cu_seqlens, B, T, q.device)
        if initial_state is not None and initial_state[0].shape[0] != N:
            fail("initial_state", f"N = {N} states (one per batch row or document)",
                 f"{initial_state[0].shape[0]}")
        from .triton_mlstm import triton_mlstm

        return triton_mlstm(q, k, v, i, f, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, offsets=offsets)
    state0 = None if initial_state is None else torch.cat([C0.float(), n0.float()[..., None]], -1)
    # The diag engine runs on float32 copies and returns h in float32: o = h_C / |h_n| is
    # invariant to the scale of q, so the gradients through numerator and denominator
    # nearly cancel, and rounding h or its gradient to bf16 (as an engine on bf16 inputs
    # does) left gradient errors of ~10%.
    k_in = k.float() * torch.sigmoid(i)[..., None]
    v_aug = torch.cat([v.float(), torch.ones_like(v[..., :1], dtype=torch.float32)], -1)
    h, S = linear_call(DIAG, q.float(), k_in, v_aug, F.logsigmoid(f), gate="head", scale=scale,
                       initial_state=state0, output_final_state=output_final_state,
                       cu_seqlens=cu_seqlens, chunk_size=chunk_size, backend=backend, sp=sp)
    o = (h[..., :V] / h[..., V:].abs().clamp_min(1.0)).to(v.dtype)
    return o, (None if S is None else (S[..., :V], S[..., V]))


class MlstmEngine(LinearEngine):
    """mLSTM's own kernels (:mod:`.triton_mlstm`) under sequence parallelism. The pair
    (C, n) travels as one state (N, H, K, V + 1) with n as its last column; the
    transition is the product of the forget gates, (N, H, 1, 1). Without Triton, mLSTM
    runs on :data:`~.diag.DIAG` (see :func:`mlstm`)."""

    name = "mlstm"
    inputs = ("q", "k", "v", "i", "f")

    def state_width(self, V: int) -> int:
        return V + 1

    def begin(self, xs, seqs, *, scale, chunk_size, backend):
        return _TritonMlstmPass(xs, seqs, scale)


def _pair(S):
    return (None, None) if S is None else (S[..., :-1].contiguous(), S[..., -1].contiguous())


class _TritonMlstmPass(StatePass):
    """mLSTM's kernels on the packed stream of a shard's sequences; the state-only passes
    run segment by segment (:class:`~.engine.Segments`)."""

    def __init__(self, xs, seqs: Sequences, scale: float):
        from .triton_common import as_packed

        self.shape, self.seqs, self.scale = xs[2].shape, seqs, scale
        self.q, self.k, self.v, self.i, self.f = (as_packed(x) for x in xs)
        self.offsets = seqs.offsets
        self.seg = segments(tuple(self.offsets), self.q.device)
        self._decays = None

    def decays(self):
        if self._decays is None:
            from .triton_diag import diag_cumsum

            self._decays = self.seg.decays(diag_cumsum(F.logsigmoid(self.f), self.offsets))
        return self._decays

    def final(self, h0):
        from .triton_mlstm import mlstm_final_states

        if not self.seg.split:
            return torch.cat([x if x.dim() == 4 else x[..., None] for x in mlstm_final_states(
                self.k, self.v, self.i, self.f, *_pair(h0), self.offsets)], -1)
        C, n = mlstm_final_states(self.k, self.v, self.i, self.f, None, None, self.seg.offsets)
        _, after, total = self.decays()
        out = self.seg.combine(torch.cat([C, n[..., None]], -1), after)
        return out if h0 is None else out + scale_state(h0, total)

    def transition(self):
        total = self.decays()[2]
        return total.exp()[..., None, None]

    def finish(self, h0):
        from .triton_mlstm import mlstm_forward

        self.C0, self.n0 = _pair(h0)
        o, self.o32, self.u, CT, nT = mlstm_forward(self.q, self.k, self.v, self.i, self.f,
                                                     self.C0, self.n0, self.scale, self.offsets)
        return o.reshape(self.shape), torch.cat([CT, nT[..., None]], -1)

    def initial_grads(self, do, dht):
        from .triton_common import as_packed
        from .triton_mlstm import mlstm_initial_grads

        do = as_packed(do).contiguous()
        if not self.seg.split:
            dC, dn = mlstm_initial_grads(self.q, self.f, self.o32, self.u, do, *_pair(dht),
                                         self.scale, self.offsets)
            return torch.cat([dC, dn[..., None]], -1)
        dC, dn = mlstm_initial_grads(self.q, self.f, self.o32, self.u, do, None, None,
                                     self.scale, self.seg.offsets)
        before, _, total = self.decays()
        out = self.seg.combine(torch.cat([dC, dn[..., None]], -1), before)
        return out if dht is None else out + scale_state(dht, total)

    def backward(self, do, dht):
        from .triton_common import as_packed
        from .triton_mlstm import mlstm_backward

        dq, dk, dv, di, df, dC0, dn0 = mlstm_backward(
            self.q, self.k, self.v, self.i, self.f, self.C0, self.n0, self.o32, self.u,
            as_packed(do).contiguous(), *_pair(dht), self.scale, self.offsets)
        B, T = self.shape[:2]
        dxs = tuple(x.reshape(B, T, *x.shape[2:]) for x in (dq, dk, dv, di, df))
        dh0 = None if dC0 is None else torch.cat([dC0, dn0[..., None]], -1)
        return dxs, dh0


MLSTM = MlstmEngine()
