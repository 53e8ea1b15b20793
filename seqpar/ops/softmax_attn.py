"""Softmax attention for hybrid models, returning the log-sum-exp so that partial results
over disjoint key sets merge exactly (ring attention, sequence parallelism).

Public entry point: :func:`softmax_attn`. Building blocks for sequence parallelism:

* :func:`attn_block` -- a query block against one key/value block, ``(o, lse)`` in
  float32, differentiable through both outputs;
* :func:`attn_block_forward` -- the same without autograd and without a float32 copy;
* :func:`merge_attn` -- exact float32 merge of two partial results over disjoint keys;
  :func:`merge_attn_into` the same into given tensors, one fused pass on CUDA;
* :func:`attn_block_backward` -- the gradient contribution of one key/value block given
  the *final* (merged) output and log-sum-exp, for a ring backward that does not keep
  every partial result alive.

Engines. :func:`softmax_attn` runs on the fastest one that applies, one call for the
whole batch or packed stream:

* ``cudnn`` -- cuDNN attention through ``torch.ops.aten`` (the kernel PyTorch's SDPA
  picks on Hopper), with its log-sum-exp: CUDA, float16/bfloat16, one head dim for q, k
  and v that cuDNN takes, no GQA, not packed;
* ``flash`` -- PyTorch's flash-attention kernels (the CPU flash kernel; on CUDA FA2 for
  float16/bfloat16, head dims up to 256, GQA); differing or odd head dims are
  zero-padded to one the kernel takes;
* ``varlen`` -- FA2's variable-length kernel for packed documents on CUDA: one call over
  the stream, attention block-diagonal by ``cu_seqlens``;
* ``math`` -- plain float32 (float64 for float64 input) PyTorch, tiled over queries to
  bound memory, each tile reading only the keys it can see (its documents, the causal
  past); everything else (float32 on CUDA, packed input on CPU).

The SP building blocks run on ``cudnn`` wherever it takes the block's shapes (a query
block against a longer key block included), else on ``flash`` or ``math``: the ring needs
the backward from a given (merged) output and log-sum-exp, which all three compute from
those two alone. The entry points are the ones ``torch.distributed``'s context
parallelism uses, because public SDPA does not return the log-sum-exp.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import warnings

import torch
import torch.nn.functional as F

from .validate import autocast_inputs, check_cu_seqlens, check_scale, check_tensor, fail

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


def _doc_ids(offsets, n: int, device) -> torch.Tensor:
    """int64 (n,): the packed document of each position, from host ``offsets``."""
    lengths = torch.tensor([e - s for s, e in itertools.pairwise(offsets)])
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(device)


def _math_tiles(q, k, scale: float, causal: bool, offsets=None):
    """Yield ``(rows, keys, scores)`` tiles: a query rows slice, the slice of keys those
    rows can see (from the start of the first row's document, up to the last row when
    causal) and their (B, H, r, s) scaled, masked scores in the compute dtype (float64
    stays float64, else float32). ``offsets``: host document offsets (packed, S == T)."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    rows = max(1, _MATH_TILE // max(1, B * H * S))
    cd = _acc_dtype(q)
    doc = None if offsets is None else _doc_ids(offsets, T, q.device)
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        k0, k1 = 0, (r1 if causal else S)
        if offsets is not None:
            k0 = offsets[bisect.bisect_right(offsets, r0) - 1]
            if not causal:
                k1 = offsets[bisect.bisect_left(offsets, r1)]
        r, ks = slice(r0, r1), slice(k0, k1)
        s = (q[:, :, r].to(cd) @ k[:, :, ks].to(cd).transpose(-1, -2)) * scale
        hide = None
        if causal:
            hide = torch.arange(k0, k1, device=q.device) > torch.arange(r0, r1, device=q.device)[:, None]
        if doc is not None:
            other = doc[ks][None, :] != doc[r][:, None]
            hide = other if hide is None else hide | other
        if hide is not None:
            s = s.masked_fill(hide, float("-inf"))
        yield r, ks, s


def _math_fwd(q, k, v, scale: float, causal: bool, offsets=None):
    G = q.shape[1] // k.shape[1]
    k, v = _expand_heads(k, G), _expand_heads(v, G)
    o = q.new_empty(*q.shape[:3], v.shape[-1], dtype=_acc_dtype(q))
    lse = q.new_empty(q.shape[:3], dtype=o.dtype)
    for r, ks, s in _math_tiles(q, k, scale, causal, offsets):
        lse[:, :, r] = s.logsumexp(-1)
        o[:, :, r] = (s - lse[:, :, r, None]).exp() @ v[:, :, ks].to(o.dtype)
    return o, lse


def _math_bwd(do, q, k, v, o, lse, scale: float, causal: bool, dlse=None, offsets=None):
    """``dS = P * (dP - rowsum(dO * O) + dlse)`` tile by tile, P recomputed from lse."""
    G = q.shape[1] // k.shape[1]
    k, v = _expand_heads(k, G), _expand_heads(v, G)
    cd = _acc_dtype(q)
    do, o = do.to(cd), o.to(cd)
    dq = torch.empty(q.shape, dtype=cd, device=q.device)
    dk = torch.zeros(k.shape, dtype=cd, device=q.device)
    dv = torch.zeros(v.shape, dtype=cd, device=q.device)
    delta = (do * o).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(cd)
    for r, ks, s in _math_tiles(q, k, scale, causal, offsets):
        p = (s - lse[:, :, r, None].to(cd)).exp()
        dv[:, :, ks] += p.transpose(-1, -2) @ do[:, :, r]
        ds = p * (do[:, :, r] @ v[:, :, ks].to(cd).transpose(-1, -2) - delta[:, :, r, None]) * scale
        dq[:, :, r] = ds @ k[:, :, ks].to(cd)
        dk[:, :, ks] += ds.transpose(-1, -2) @ q[:, :, r].to(cd)
    return dq, _reduce_heads(dk, G), _reduce_heads(dv, G)


def _block_kernel(q, k, v, causal: bool) -> str:
    """The kernel that runs one (B, H, T, D) block: ``cudnn`` where cuDNN takes its shapes
    (as SDPA would pick it), else ``flash``, or ``math`` where no fused kernel applies."""
    if _fused_dim(q, v) is None:
        return "math"
    if q.is_cuda and _cudnn_fits(_bhtd(q), _bhtd(k), _bhtd(v), causal):
        return "cudnn"
    return "flash"


def _bthd_rows(x: torch.Tensor) -> torch.Tensor:
    """A (B, H, T, D) view of (B, T, H, D)-contiguous memory, the layout SDPA hands cuDNN
    (copied only if ``x`` is not such a view already, e.g. a slice of a batch)."""
    t = _bhtd(x)
    return x if t.is_contiguous() else _bhtd(t.contiguous())


def _cudnn_block_fwd(q, k, v, scale: float, causal: bool):
    q, k, v = (_bthd_rows(x) for x in (q, k, v))
    o, lse, *_ = _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal,
                                                           False, scale=scale)
    return o, lse[..., 0]


def _cudnn_block_bwd(do, q, k, v, o, lse, scale: float, causal: bool):
    """cuDNN's backward from a given output and log-sum-exp (e.g. merged over blocks).

    Dense and without dropout, cuDNN reads no sequence offsets and no RNG state, and its
    maximal lengths are the block's; the output gradient is read with o's strides."""
    q, k, v = (_bthd_rows(x) for x in (q, k, v))
    o, do = _bthd_rows(o.to(q.dtype)), do.to(q.dtype)
    if do.stride() != o.stride():
        do = torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=o.device).copy_(do)
    no_rng = torch.empty(0, dtype=torch.int64, device=q.device)
    return _aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, o, lse[..., None].to(torch.float32).contiguous(), no_rng, no_rng, None,
        None, None, q.shape[2], k.shape[2], 0.0, causal, scale=scale)


def _block_fwd(q, k, v, scale, causal):
    """(B, H, T, D) engine dispatch: o in the engine's dtype, lse (B, H, T) float."""
    kind = _block_kernel(q, k, v, causal)
    if kind == "math":
        return _math_fwd(q, k, v, scale, causal)
    if kind == "cudnn":
        try:
            return _cudnn_block_fwd(q, k, v, scale, causal)
        except RuntimeError as e:
            _cudnn_failed(e)
    return _fused_fwd(q, k, v, scale, causal, _fused_dim(q, v))


def _block_bwd(do, q, k, v, o, lse, scale, causal, dlse=None):
    """(B, H, T, D) engine dispatch of the backward; ``do`` may be None (only lse used)."""
    kind = _block_kernel(q, k, v, causal)
    if kind == "math":
        if do is None:
            do = torch.zeros_like(o, dtype=lse.dtype)
        return _math_bwd(do, q, k, v, o, lse, scale, causal, dlse)
    P = _fused_dim(q, v)
    if do is None:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    elif kind == "cudnn":
        dq, dk, dv = _cudnn_block_bwd(do, q, k, v, o, lse, scale, causal)
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


def attn_block_forward(q, k, v, *, causal: bool, scale: float | None = None):
    """:func:`attn_block` without autograd and without a cast: for callers that merge in
    float32 themselves and differentiate with :func:`attn_block_backward`.

    Returns o (B, T, H, Dv) in the kernel's dtype (q's on the fused kernels, float32 or
    float64 on the math engine) and lse (B, H, T) float32 (float64 for float64 input).
    """
    _check_qkv(q, k, v, causal)
    o, lse = _block_fwd(_bhtd(q), _bhtd(k), _bhtd(v), check_scale(scale, q.shape[-1]), causal)
    return _bhtd(o), lse.to(_acc_dtype(q))


def merge_attn_into(out, lse, o1, lse1, o2, lse2) -> None:
    """:func:`merge_attn` written into ``out`` (B, T, H, Dv), any float dtype, and ``lse``
    (B, H, T) float32: computed in float32 (float64 if an input is float64) and rounded
    once. On CUDA one fused Triton pass; elsewhere PyTorch. ``out`` and ``lse`` may be
    the inputs' own rows (an in-place merge)."""
    check_tensor("o1", o1, ndim=4)
    B, T, H, Dv = o1.shape
    for name, x in (("o2", o2), ("out", out)):
        check_tensor(name, x, shape=(B, T, H, Dv), device=o1.device)
    for name, x in (("lse1", lse1), ("lse2", lse2), ("lse", lse)):
        check_tensor(name, x, shape=(B, H, T), device=o1.device)
    fused = (o1.is_cuda and lse.dtype == torch.float32 and torch.float64 not in
             (o1.dtype, o2.dtype, out.dtype, lse1.dtype, lse2.dtype))
    if not fused:
        o, m = merge_attn(o1, lse1, o2, lse2)
        out.copy_(o)
        lse.copy_(m)
        return
    from .triton_attn_merge import merge_into

    rows = [x if x.stride(-1) == 1 else x.contiguous() for x in (o1, o2)]
    lses = [x.float() if x.stride(-1) == 1 else x.float().contiguous() for x in (lse1, lse2)]
    if out.stride(-1) == 1 and lse.stride(-1) == 1:
        merge_into(out, lse, rows[0], lses[0], rows[1], lses[1])
        return
    o, m = torch.empty_like(out, memory_format=torch.contiguous_format), torch.empty_like(lse)
    merge_into(o, m, rows[0], lses[0], rows[1], lses[1])
    out.copy_(o)
    lse.copy_(m)


def attn_block_backward(do, q, k, v, o, lse, *, causal: bool, scale: float | None = None,
                        dlse=None, cast: bool = True):
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
        cast: False leaves each gradient in the dtype its kernel produced (q's on the
            fused kernels; float32 where the math engine or a gradient of lse adds in),
            for callers that accumulate in float32 themselves.
    Returns:
        dq (B, T, H, D), dk (B, S, Hkv, D), dv (B, S, Hkv, Dv), float32 (float64 for
        float64 input) unless ``cast`` is False.
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
    if not cast:
        return _bhtd(dq), _bhtd(dk), _bhtd(dv)
    return _bhtd(dq).to(acc), _bhtd(dk).to(acc), _bhtd(dv).to(acc)


# ---- the public op's engines: (B, T, H, D) tensors; o in q's dtype, lse (B, H, T) float32 ----

# Cleared when a cuDNN call fails on this machine (an old cuDNN, an unsupported GPU); the
# flash kernel then serves instead, with one warning.
_cudnn_usable = True


def _cudnn_fits(q, k, v, causal: bool) -> bool:
    """Whether cuDNN attention takes these (B, T, H, D) queries against (B, S, H, D) keys
    and values, as SDPA would decide."""
    if not (_cudnn_usable and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)):
        return False
    D = q.shape[-1]
    if k.shape[2] != q.shape[2] or v.shape[-1] != D or D % 8 or D > 128:
        return False
    return _cudnn_takes(*q.shape[:3], k.shape[1], D, q.dtype, causal, q.device)


@functools.lru_cache(maxsize=256)
def _cudnn_takes(B, T, H, S, D, dtype, causal, device) -> bool:
    try:
        # As the kernel will see them: (B, T, H, D)-contiguous, viewed as (B, H, T, D).
        q = _bhtd(torch.empty(B, T, H, D, dtype=dtype, device=device))
        kv = _bhtd(torch.empty(B, S, H, D, dtype=dtype, device=device))
        params = torch.backends.cuda.SDPAParams(q, kv, kv, None, 0.0, causal, False)
        return bool(torch.backends.cuda.can_use_cudnn_attention(params, False))
    except (AttributeError, TypeError, RuntimeError):
        return False


def _cudnn_failed(e: RuntimeError) -> None:
    """Stop using cuDNN on this machine (an old library, an unsupported GPU), with one
    warning: the flash kernel serves from now on."""
    global _cudnn_usable
    _cudnn_usable = False
    warnings.warn(f"seqpar.ops.softmax_attn: cuDNN attention failed ({str(e)[:200]}); "
                  "using the flash kernel from now on", stacklevel=4)


def _engine(q, k, v, causal: bool, packed: bool) -> str:
    if _fused_dim(q, v) is None:
        return "math"
    if q.device.type != "cuda":
        return "math" if packed else "flash"
    if packed:
        return "varlen"
    return "cudnn" if _cudnn_fits(q, k, v, causal) else "flash"


def _rows(x: torch.Tensor) -> torch.Tensor:
    """A (B, T, H, D) tensor with rows of unit stride along D (what the kernels read)."""
    return x if x.stride(-1) == 1 else x.contiguous()


# Each engine: ``fwd(q, k, v, scale, causal, pack) -> (o, lse, saved, meta)`` and
# ``bwd(do, q, k, v, o, lse, saved, meta, scale, causal, pack) -> (dq, dk, dv)``, all in
# (B, T, H, D) layout; ``saved`` are the tensors the backward needs beyond q, k, v, o and
# lse (kept through ``save_for_backward``, so activation checkpointing frees them too),
# ``meta`` its other values.

def _cudnn_fwd(q, k, v, scale, causal, pack):
    o, lse = _cudnn_block_fwd(_bhtd(q), _bhtd(k), _bhtd(v), scale, causal)
    return _bhtd(o), lse, (), ()


def _cudnn_bwd(do, q, k, v, o, lse, saved, meta, scale, causal, pack):
    dq, dk, dv = _cudnn_block_bwd(*(_bhtd(x) for x in (do, q, k, v, o)), lse, scale, causal)
    return _bhtd(dq), _bhtd(dk), _bhtd(dv)


def _flash_fwd_pub(q, k, v, scale, causal, pack):
    o, lse = _fused_fwd(_bhtd(q), _bhtd(k), _bhtd(v), scale, causal, _fused_dim(q, v))
    return _bhtd(o), lse, (), ()


def _flash_bwd_pub(do, q, k, v, o, lse, saved, meta, scale, causal, pack):
    dq, dk, dv = _fused_bwd(_bhtd(do), _bhtd(q), _bhtd(k), _bhtd(v), _bhtd(o), lse, scale,
                            causal, _fused_dim(q, v))
    return _bhtd(dq), _bhtd(dk), _bhtd(dv)


def _varlen_fwd(q, k, v, scale, causal, pack):
    """FA2 over the packed stream (B == 1): inputs (T, H, P) with cu_seqlens."""
    cu, offsets = pack
    P = _fused_dim(q, v)
    longest = max(e - s for s, e in itertools.pairwise(offsets))
    q3, k3, v3 = (_rows(_pad(x[0], P)) for x in (q, k, v))
    o, lse, rng, unused, _ = _aten._flash_attention_forward(
        q3, k3, v3, cu, cu, longest, longest, 0.0, causal, False, scale=scale)
    return o[None, ..., :v.shape[-1]], lse[None], (o, rng, unused), (longest,)


def _varlen_bwd(do, q, k, v, o, lse, saved, meta, scale, causal, pack):
    cu, _ = pack
    (o3, rng, unused), (longest,) = saved, meta
    P = o3.shape[-1]
    q3, k3, v3, do3 = (_rows(_pad(x[0], P)) for x in (q, k, v, do.to(q.dtype)))
    dq, dk, dv = _aten._flash_attention_backward(
        do3, q3, k3, v3, o3, lse[0].contiguous(), cu, cu, longest, longest, 0.0, causal, rng, unused,
        scale=scale)
    D = q.shape[-1]
    return dq[None, ..., :D], dk[None, ..., :D], dv[None, ..., :v.shape[-1]]


def _math_fwd_pub(q, k, v, scale, causal, pack):
    o, lse = _math_fwd(_bhtd(q), _bhtd(k), _bhtd(v), scale, causal, pack and pack[1])
    return _bhtd(o), lse, (), ()


def _math_bwd_pub(do, q, k, v, o, lse, saved, meta, scale, causal, pack, dlse=None):
    dq, dk, dv = _math_bwd(_bhtd(do), _bhtd(q), _bhtd(k), _bhtd(v), _bhtd(o), lse, scale,
                           causal, dlse, pack and pack[1])
    return _bhtd(dq), _bhtd(dk), _bhtd(dv)


_ENGINES = {"cudnn": (_cudnn_fwd, _cudnn_bwd), "flash": (_flash_fwd_pub, _flash_bwd_pub),
            "varlen": (_varlen_fwd, _varlen_bwd), "math": (_math_fwd_pub, _math_bwd_pub)}


class _Attention(torch.autograd.Function):
    """:func:`softmax_attn` on one device: (B, T, H, D) in, o (B, T, H, Dv) in q's dtype
    and lse (B, H, T) float32 (float64 for float64 input) out, both differentiable.

    A gradient reaching lse is handled by the math engine directly; on the kernels by
    ``d lse_i / d s_ij = P_ij``: ``dq_i += scale dlse_i (P k)_i`` (attention with values
    k) and ``dk_j += scale (P^T (dlse q))_j`` (that attention's value gradient for the
    output gradient ``dlse q``), one more forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, causal: bool, pack, engine: str):
        o, lse, saved, meta = _ENGINES[engine][0](q, k, v, scale, causal, pack)
        ctx.save_for_backward(q, k, v, o, lse, *saved)
        ctx.meta, ctx.scale, ctx.causal, ctx.pack, ctx.engine = meta, scale, causal, pack, engine
        ctx.set_materialize_grads(False)
        return o.to(q.dtype), lse.to(_acc_dtype(q))

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *saved = ctx.saved_tensors
        fwd, bwd = _ENGINES[ctx.engine]
        args = (ctx.scale, ctx.causal, ctx.pack)
        if ctx.engine == "math":
            do = torch.zeros_like(o) if do is None else do
            dq, dk, dv = bwd(do, q, k, v, o, lse, saved, ctx.meta, *args, dlse=dlse)
        else:
            if do is None:
                dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
            else:
                dq, dk, dv = bwd(do, q, k, v, o, lse, saved, ctx.meta, *args)
            if dlse is not None:
                o_k, _, saved_k, meta_k = fwd(q, k, k, *args)
                w = dlse.to(torch.float32).transpose(1, 2)[..., None]  # (B, T, H, 1)
                _, _, dk_l = bwd((w * q.float()).to(q.dtype), q, k, k, o_k, lse, saved_k, meta_k,
                                 *args)
                dq = dq.float() + ctx.scale * w * o_k.float()
                dk = dk.float() + ctx.scale * dk_l.float()
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _run_attention(q, k, v, scale, causal, pack):
    engine = _engine(q, k, v, causal, pack is not None)
    if engine != "cudnn":
        return _Attention.apply(q, k, v, scale, causal, pack, engine)
    try:
        # cuDNN gets (B, T, H, D)-contiguous tensors, the layout SDPA hands it from
        # projections (keys and values split from one projection are strided); copied
        # here, before the op, so that only the copies are kept for the backward.
        return _Attention.apply(*(x.contiguous() for x in (q, k, v)), scale, causal, pack, engine)
    except RuntimeError as e:
        _cudnn_failed(e)
        return _Attention.apply(q, k, v, scale, causal, pack, "flash")


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
            causal within a document if ``causal``), in one kernel call for the stream.
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
    pack = None
    if offsets is not None and len(offsets) > 2:
        pack = (cu_seqlens.to(torch.int32), tuple(offsets))
    return _run_attention(q, k, v, scale, causal, pack)


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
        lengths = torch.tensor([b - a for a, b in itertools.pairwise(offsets)], device=q.device)
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=q.device), lengths)
        visible = visible & (doc[:, None] == doc[None, :])
    s = s.masked_fill(~visible, float("-inf"))
    lse = s.logsumexp(-1)
    return _bhtd((s - lse[..., None]).exp() @ vd), lse
