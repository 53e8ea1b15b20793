"""Softmax attention for hybrid models, returning the log-sum-exp so that partial results
over disjoint key sets merge exactly (ring attention, sequence parallelism).

Public entry point: :func:`softmax_attn`. Building blocks for sequence parallelism:

* :func:`attn_block` -- a query block against one key/value block, ``(o, lse)`` in
  float32, differentiable through both outputs;
* :func:`merge_attn` -- exact float32 merge of two partial results over disjoint keys;
* :func:`attn_block_backward` -- the gradient contribution of one key/value block given
  the *final* (merged) output and log-sum-exp, for a ring backward that does not keep
  every partial result alive.

Two engines compute a block. ``fused`` calls PyTorch's flash-attention kernels through
``torch.ops.aten`` (the CPU flash kernel; on CUDA the FA2 kernel for float16/bfloat16 with
head dims up to 256), the same entry points ``torch.distributed``'s context parallelism
uses, because public SDPA does not return the log-sum-exp; differing or odd head dims are
zero-padded to one the kernel takes. ``math`` is plain float32 (float64 for float64 input)
PyTorch, chunked over queries to bound memory, for everything else (float32 on CUDA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import autocast_inputs, check_cu_seqlens, check_scale, check_tensor, fail

_aten = torch.ops.aten
# Elements of one (B, H, rows, S) float32 score tile in the math engine: bounds its memory.
_MATH_TILE = 1 << 24


def _check_qkv(q, k, v, causal) -> tuple[int, ...]:
    """Validate (B, T, H, D) queries against (B, S, Hkv, D) / (B, S, Hkv, Dv) keys/values.

    Returns ``(B, T, H, D, S, Hkv, Dv)``.
    """
    check_tensor("q", q, ndim=4)
    B, T, H, D = q.shape
    if T == 0:
        fail("q", "at least one token (T >= 1)", f"shape {tuple(q.shape)}")
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("k", k, shape=(B, None, None, D))
    S, Hkv = k.shape[1], k.shape[2]
    if S == 0:
        fail("k", "at least one key (S >= 1)", f"shape {tuple(k.shape)}")
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, shape=(B, S, Hkv, None))
    if Hkv == 0 or H % Hkv:
        fail("k", f"a number of key/value heads that divides the {H} query heads (GQA)",
             f"{Hkv} heads")
    if not isinstance(causal, bool):
        fail("causal", "a bool", type(causal).__name__)
    if causal and S != T:
        fail("k", f"as many keys as queries (S == T = {T}) when causal=True; the causal mask "
             "is only defined for a block against the same positions", f"S = {S}")
    return B, T, H, D, S, Hkv, v.shape[-1]


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype of results and accumulation: float64 stays float64, everything else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_packed(cu_seqlens, B: int, T: int, S: int, device):
    if cu_seqlens is not None and S != T:
        fail("cu_seqlens", f"as many keys as queries (S == T = {T}) with packed sequences",
             f"S = {S}")
    return check_cu_seqlens(cu_seqlens, B, T, device)


# ---- engines: (B, H, T, D) layout, k/v with Hkv heads (GQA: query head h uses h // G) ----

def _fused_dim(q: torch.Tensor, v: torch.Tensor) -> int | None:
    """Head dim at which the flash kernel runs this block, or None for the math engine.

    The kernels want one head dim for q, k and v (on CUDA a multiple of 8, at most 256,
    in float16/bfloat16), so q/k and v are zero-padded to a common size: zero columns
    change neither the scores nor the real output columns.
    """
    P = max(q.shape[-1], v.shape[-1])
    if q.device.type == "cpu":
        return P
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        P = -(-P // 8) * 8
        return P if P <= 256 else None
    return None


def _pad(x: torch.Tensor, P: int) -> torch.Tensor:
    return x if x.shape[-1] == P else F.pad(x, (0, P - x.shape[-1]))


def _unit_stride(*xs: torch.Tensor):
    """The flash kernels read rows assuming a unit stride along the head dim (the CPU one
    returns wrong results for other strides); copy only tensors that lack it."""
    return [x if x.stride(-1) == 1 else x.contiguous() for x in xs]


def _flash_fwd(q, k, v, scale: float, causal: bool):
    """Flash kernel forward (one head dim): o in q's dtype, lse (B, H, T) float32."""
    q, k, v = _unit_stride(q, k, v)
    if q.device.type == "cpu":
        return _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    o, lse, *_ = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return o, lse


def _flash_bwd(do, q, k, v, o, lse, scale: float, causal: bool):
    """Flash kernel backward with a given output and log-sum-exp; grads in q's dtype."""
    # A strided lse (a slice of a longer one, as on a ring) is not read correctly by the
    # kernels (torch.distributed's context parallelism makes it contiguous for the same reason).
    do, o, lse = do.to(q.dtype), o.to(q.dtype), lse.contiguous()
    do, q, k, v, o = _unit_stride(do, q, k, v, o)
    if q.device.type == "cpu":
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, scale=scale)
    # Dense (not varlen) and no dropout: no sequence offsets and no RNG state are read.
    no_rng = torch.empty(0, dtype=torch.int64, device=q.device)
    return _aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, o, lse, None, None, q.shape[2], k.shape[2], 0.0, causal, no_rng, no_rng,
        scale=scale)


def _fused_fwd(q, k, v, scale: float, causal: bool, P: int):
    o, lse = _flash_fwd(_pad(q, P), _pad(k, P), _pad(v, P), scale, causal)
    return o[..., :v.shape[-1]], lse


def _fused_bwd(do, q, k, v, o, lse, scale: float, causal: bool, P: int):
    dq, dk, dv = _flash_bwd(_pad(do, P), _pad(q, P), _pad(k, P), _pad(v, P), _pad(o, P), lse,
                            scale, causal)
    D = q.shape[-1]
    return dq[..., :D], dk[..., :D], dv[..., :v.shape[-1]]


def _fused_lse_grad(dlse, q, k, lse, scale: float, causal: bool, P: int):
    """This block's share of the gradient of ``sum(dlse * lse)``, with
    ``P_ij = exp(s_ij - lse_i)`` (``lse`` may be the final lse of several blocks):
    ``dq_i = scale dlse_i sum_j P_ij k_j`` is attention with values k (renormalized from
    its own lse to ``lse``), and ``dk_j = scale sum_i P_ij dlse_i q_i`` is the value
    gradient of that attention for the output gradient ``dlse * q``, which the kernel's
    backward computes from ``lse`` alone."""
    o_k, lse_k = _fused_fwd(q, k, k, scale, causal, P)
    _, _, dk = _fused_bwd(dlse[..., None] * q.to(dlse.dtype), q, k, k, o_k, lse, scale, causal, P)
    w = dlse * (lse_k.to(dlse.dtype) - lse.to(dlse.dtype)).exp()
    return scale * w[..., None] * o_k.to(dlse.dtype), scale * dk.to(dlse.dtype)


def _expand_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _reduce_heads(dx: torch.Tensor, groups: int) -> torch.Tensor:
    return dx if groups == 1 else dx.unflatten(1, (-1, groups)).sum(2)


def _math_tiles(q, k, scale: float, causal: bool):
    """Yield ``(rows, scores)`` tiles: query rows slice and its (B, H, r, S) scaled,
    masked scores in the compute dtype (float64 stays float64, else float32)."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    rows = max(1, _MATH_TILE // max(1, B * H * S))
    cd = _acc_dtype(q)
    kc = k.to(cd)
    for r0 in range(0, T, rows):
        r = slice(r0, min(T, r0 + rows))
        s = (q[:, :, r].to(cd) @ kc.transpose(-1, -2)) * scale
        if causal:
            i = torch.arange(r.start, r.stop, device=q.device)[:, None]
            s = s.masked_fill(torch.arange(S, device=q.device) > i, float("-inf"))
        yield r, s


def _math_fwd(q, k, v, scale: float, causal: bool):
    G = q.shape[1] // k.shape[1]
    k, v = _expand_heads(k, G), _expand_heads(v, G)
    o = q.new_empty(*q.shape[:3], v.shape[-1], dtype=_acc_dtype(q))
    lse = q.new_empty(q.shape[:3], dtype=o.dtype)
    vc = v.to(o.dtype)
    for r, s in _math_tiles(q, k, scale, causal):
        lse[:, :, r] = s.logsumexp(-1)
        o[:, :, r] = (s - lse[:, :, r, None]).exp() @ vc
    return o, lse


def _math_bwd(do, q, k, v, o, lse, scale: float, causal: bool, dlse=None):
    """``dS = P * (dP - rowsum(dO * O) + dlse)`` tile by tile, P recomputed from lse."""
    G = q.shape[1] // k.shape[1]
    k, v = _expand_heads(k, G), _expand_heads(v, G)
    cd = _acc_dtype(q)
    kc, vc, do, o = k.to(cd), v.to(cd), do.to(cd), o.to(cd)
    dq = torch.empty(q.shape, dtype=cd, device=q.device)
    dk = torch.zeros(k.shape, dtype=cd, device=q.device)
    dv = torch.zeros(v.shape, dtype=cd, device=q.device)
    delta = (do * o).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(cd)
    for r, s in _math_tiles(q, k, scale, causal):
        p = (s - lse[:, :, r, None].to(cd)).exp()
        dv += p.transpose(-1, -2) @ do[:, :, r]
        ds = p * (do[:, :, r] @ vc.transpose(-1, -2) - delta[:, :, r, None]) * scale
        dq[:, :, r] = ds @ kc
        dk += ds.transpose(-1, -2) @ q[:, :, r].to(cd)
    return dq, _reduce_heads(dk, G), _reduce_heads(dv, G)


def _block_fwd(q, k, v, scale, causal):
    """(B, H, T, D) engine dispatch: o in the engine's dtype, lse (B, H, T) float."""
    P = _fused_dim(q, v)
    if P is None:
        return _math_fwd(q, k, v, scale, causal)
    return _fused_fwd(q, k, v, scale, causal, P)


def _block_bwd(do, q, k, v, o, lse, scale, causal, dlse=None):
    """(B, H, T, D) engine dispatch of the backward; ``do`` may be None (only lse used)."""
    P = _fused_dim(q, v)
    if P is None:
        if do is None:
            do = torch.zeros_like(o, dtype=lse.dtype)
        return _math_bwd(do, q, k, v, o, lse, scale, causal, dlse)
    if do is None:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    else:
        dq, dk, dv = _fused_bwd(do, q, k, v, o, lse, scale, causal, P)
    if dlse is not None:
        dq_l, dk_l = _fused_lse_grad(dlse, q, k, lse, scale, causal, P)
        dq, dk = dq.to(dq_l.dtype) + dq_l, dk.to(dk_l.dtype) + dk_l
    return dq, dk, dv


def _bhtd(x: torch.Tensor) -> torch.Tensor:
    """(B, T, H, D) <-> (B, H, T, D), a view either way."""
    return x.transpose(1, 2)


class _AttnBlock(torch.autograd.Function):
    """Block attention on (B, T, H, D) tensors with gradients through both o and lse."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, causal: bool):
        q, k, v = _bhtd(q), _bhtd(k), _bhtd(v)
        o, lse = _block_fwd(q, k, v, scale, causal)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.causal = scale, causal
        ctx.set_materialize_grads(False)
        acc = _acc_dtype(q)
        # A fresh tensor, not a view of the kernel's buffer, so callers may modify it in place.
        o = _bhtd(o).to(acc)
        return (o.clone() if o._base is not None else o), lse.to(acc)

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _block_bwd(None if do is None else _bhtd(do), q, k, v, o, lse, ctx.scale,
                                ctx.causal, dlse)
        return (_bhtd(dq).to(q.dtype), _bhtd(dk).to(k.dtype), _bhtd(dv).to(v.dtype), None, None)


def attn_block(q, k, v, *, causal: bool, scale: float | None = None):
    """Attention of a query block against one key/value block, for merging.

    Args:
        q: (B, T, H, D); k: (B, S, Hkv, D); v: (B, S, Hkv, Dv); one float dtype, one
            device; ``H % Hkv == 0`` (query head h reads key/value head ``h // (H // Hkv)``).
        causal: True when queries and keys are the same positions (``S == T``): query i
            sees keys ``j <= i``. False: every query sees every key (a key block wholly
            in the past). A block wholly in the future contributes nothing: skip it.
        scale: score scale, default ``D ** -0.5``.
    Returns:
        o: (B, T, H, Dv) float32; lse: (B, H, T) float32 (float64 for float64 input),
        natural log of the softmax denominator of the scaled scores. Both are
        differentiable with respect to q, k and v, so chains of :func:`merge_attn` can be
        differentiated by autograd.
    """
    _check_qkv(q, k, v, causal)
    return _AttnBlock.apply(q, k, v, check_scale(scale, q.shape[-1]), causal)


def merge_attn(o1, lse1, o2, lse2):
    """Merge attention results of the same queries over two disjoint key sets, exactly.

    Args:
        o1, o2: (B, T, H, Dv); lse1, lse2: (B, H, T); any float dtypes.
    Returns:
        o (B, T, H, Dv) and lse (B, H, T) of attention over the union, computed and
        returned in float32 (float64 if an input is float64).
        Every query row must see at least one key in one of the two parts (an lse of
        -inf on one side is fine, on both sides the row is undefined).
    """
    check_tensor("o1", o1, ndim=4)
    check_tensor("o2", o2, shape=tuple(o1.shape), device=o1.device)
    B, T, H, _ = o1.shape
    check_tensor("lse1", lse1, shape=(B, H, T), device=o1.device)
    check_tensor("lse2", lse2, shape=(B, H, T), device=o1.device)
    acc = torch.float32
    for x in (o1, lse1, o2, lse2):
        acc = torch.promote_types(acc, x.dtype)
    lse1, lse2 = lse1.to(acc), lse2.to(acc)
    lse = torch.logaddexp(lse1, lse2)
    w1 = (lse1 - lse).exp().transpose(1, 2)[..., None]
    w2 = (lse2 - lse).exp().transpose(1, 2)[..., None]
    return w1 * o1.to(acc) + w2 * o2.to(acc), lse


def attn_block_backward(do, q, k, v, o, lse, *, causal: bool, scale: float | None = None,
                        dlse=None):
    """Gradient contribution of one key/value block, given the final merged result.

    With ``o`` and ``lse`` the output and log-sum-exp after merging every block, the
    softmax probabilities of this block are ``exp(scale q k^T - lse)``, so the usual
    attention backward restricted to this block gives exactly its share of the
    gradient: ``dq`` summed over blocks and each block's ``dk``, ``dv`` equal the
    gradients of the full attention. This is the ring-attention backward that keeps
    only the final (o, lse), not every partial result.

    Args:
        do: (B, T, H, Dv) gradient of the final output; o: (B, T, H, Dv) final output;
        lse: (B, H, T) final log-sum-exp; dlse: (B, H, T) gradient of the final lse, or
        None. q, k, v, causal, scale as in :func:`attn_block`.
    Returns:
        dq (B, T, H, D), dk (B, S, Hkv, D), dv (B, S, Hkv, Dv), float32 (float64 for
        float64 input).
    """
    B, T, H, D, S, Hkv, Dv = _check_qkv(q, k, v, causal)
    check_tensor("do", do, shape=(B, T, H, Dv), device=q.device)
    check_tensor("o", o, shape=(B, T, H, Dv), device=q.device)
    check_tensor("lse", lse, shape=(B, H, T), device=q.device)
    acc = _acc_dtype(q)
    if dlse is not None:
        dlse = check_tensor("dlse", dlse, shape=(B, H, T), device=q.device).to(acc)
    dq, dk, dv = _block_bwd(_bhtd(do), _bhtd(q), _bhtd(k), _bhtd(v), _bhtd(o), lse.to(acc),
                            check_scale(scale, D), causal, dlse)
    return _bhtd(dq).to(acc), _bhtd(dk).to(acc), _bhtd(dv).to(acc)


@autocast_inputs
def softmax_attn(q, k, v, *, causal: bool = True, scale=None, cu_seqlens=None, sp=None):
    """Softmax attention returning the log-sum-exp.

    Args:
        q: (B, T, H, D) float16/bfloat16/float32/float64. k: (B, S, Hkv, D); v:
            (B, S, Hkv, Dv), same dtype and device; ``H % Hkv == 0`` (grouped-query
            attention: query head h reads key/value head ``h // (H // Hkv)``).
        causal: query i sees keys ``j <= i``; requires ``S == T``.
        scale: score scale, default ``D ** -0.5``.
        cu_seqlens: int32 (N + 1,) document offsets of packed input (``B == 1``,
            ``S == T``): attention never crosses a document boundary (block-diagonal,
            causal within a document if ``causal``). Documents run one after another.
        sp: a ``seqpar.parallel.SequenceParallel``; each rank passes its own shard.
    Returns:
        o: (B, T, H, Dv) in q's dtype; lse: (B, H, T) float32 (float64 for float64 input),
        natural log of the softmax denominator of the scaled scores (differentiable).
    """
    B, T, H, D, S, Hkv, Dv = _check_qkv(q, k, v, causal)
    scale = check_scale(scale, D)
    if sp is not None:
        return sp.softmax_attn(q, k, v, causal=causal, scale=scale, cu_seqlens=cu_seqlens)
    offsets = _check_packed(cu_seqlens, B, T, S, q.device)
    if offsets is None:
        o, lse = attn_block(q, k, v, causal=causal, scale=scale)
    else:
        parts = [attn_block(q[:, a:b], k[:, a:b], v[:, a:b], causal=causal, scale=scale)
                 for a, b in zip(offsets, offsets[1:])]
        o = torch.cat([p[0] for p in parts], 1)
        lse = torch.cat([p[1] for p in parts], 2)
    return o.to(q.dtype), lse


def softmax_attn_reference(q, k, v, causal: bool = True, scale=None, cu_seqlens=None):
    """Float64 reference of :func:`softmax_attn`: explicit scores, mask and softmax.

    Materializes the (T, S) score matrix; for tests only. Returns o (B, T, H, Dv) and
    lse (B, H, T), both float64.
    """
    B, T, H, D, S, Hkv, Dv = _check_qkv(q, k, v, causal)
    scale = check_scale(scale, D)
    G = H // Hkv
    qd, kd, vd = (_bhtd(x).to(torch.float64) for x in (q, k, v))
    kd, vd = _expand_heads(kd, G), _expand_heads(vd, G)
    s = (qd @ kd.transpose(-1, -2)) * scale
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    visible = (j <= i) if causal else torch.ones(T, S, dtype=torch.bool, device=q.device)
    offsets = _check_packed(cu_seqlens, B, T, S, q.device)
    if offsets is not None:
        lengths = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], device=q.device)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
        visible = visible & (doc[:, None] == doc[None, :])
    s = s.masked_fill(~visible, float("-inf"))
    lse = s.logsumexp(-1)
    return _bhtd((s - lse[..., None]).exp() @ vd), lse
