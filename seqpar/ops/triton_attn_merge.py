"""One fused pass merging two partial attention results over disjoint key sets.

:func:`merge_into` writes ``o = (w1 o1 + w2 o2) / (w1 + w2)`` and ``lse = m + log(w1 + w2)``
with ``w_i = exp(lse_i - m)``, ``m = max(lse1, lse2)``, computed in float32 and stored in
the destination's dtype: the result of merging in float32 and rounding once. Sequence
parallel attention uses it where a query row has exactly two partial results, which
is every row of a two-rank zigzag ring; the separate PyTorch ops it replaces read and
write the output five times.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(o1, o2, out, l1, l2, lout, T, H, D,
                  s1b, s1t, s1h, s2b, s2t, s2h, sob, sot, soh,
                  m1b, m1h, m2b, m2h, mob, moh,
                  BH: tl.constexpr, BD: tl.constexpr):
    # One program: token t of batch row b, BH heads of all D columns. lse tensors are
    # (B, H, T) with unit stride along T.
    i_bt, i_h = tl.program_id(0), tl.program_id(1)
    b, t = (i_bt // T).to(tl.int64), (i_bt % T).to(tl.int64)
    h = i_h * BH + tl.arange(0, BH)
    d = tl.arange(0, BD)
    mh, md = h < H, d < D
    a = tl.load(l1 + b * m1b + h * m1h + t, mask=mh, other=0.0)
    c = tl.load(l2 + b * m2b + h * m2h + t, mask=mh, other=0.0)
    m = tl.maximum(a, c)  # finite: every row sees a key on one side at least
    w1, w2 = tl.exp(a - m), tl.exp(c - m)
    s = w1 + w2
    mask = mh[:, None] & md[None, :]
    x1 = tl.load(o1 + b * s1b + t * s1t + h[:, None] * s1h + d[None, :], mask=mask, other=0.0)
    x2 = tl.load(o2 + b * s2b + t * s2t + h[:, None] * s2h + d[None, :], mask=mask, other=0.0)
    y = (x1.to(tl.float32) * (w1 / s)[:, None] + x2.to(tl.float32) * (w2 / s)[:, None])
    tl.store(out + b * sob + t * sot + h[:, None] * soh + d[None, :],
             y.to(out.dtype.element_ty), mask=mask)
    tl.store(lout + b * mob + h * moh + t, m + tl.log(s), mask=mh)


def merge_into(out: torch.Tensor, lse: torch.Tensor, o1: torch.Tensor, lse1: torch.Tensor,
               o2: torch.Tensor, lse2: torch.Tensor) -> None:
    """Merge ``(o1, lse1)`` and ``(o2, lse2)`` into ``out`` and ``lse`` in one pass.

    o1, o2, out: (B, T, H, D), any float dtypes, unit stride along D; lse1, lse2, lse:
    (B, H, T) float32 with unit stride along T. ``out`` and ``lse`` may alias the
    inputs row for row. Every row must see a key on at least one side.
    """
    B, T, H, D = out.shape
    BD = triton.next_power_of_2(D)
    BH = min(triton.next_power_of_2(H), max(1, 4096 // BD))
    _merge_kernel[(B * T, triton.cdiv(H, BH))](
        o1, o2, out, lse1, lse2, lse, T, H, D,
        o1.stride(0), o1.stride(1), o1.stride(2), o2.stride(0), o2.stride(1), o2.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse1.stride(0), lse1.stride(1), lse2.stride(0), lse2.stride(1), lse.stride(0),
        lse.stride(1), BH=BH, BD=BD, num_warps=4)
