"""The linear family's PyTorch chunk path on packed documents: one batched run equals
each document run alone (outputs, final states, every gradient), and its autograd graph
does not depend on how many documents there are, only on the longest one's chunk count.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import autograd_nodes, rel_err
from seqpar import ops

H, K, V = 2, 8, 6

# op, gate shape after (B, T, H): None (no gate), () (one per head) or (K,) (per key)
OPS = {
    "linear_attn": (ops.linear_attn, None, False),
    "simple_gla": (ops.simple_gla, (), False),
    "gla": (ops.gla, (K,), False),
    "delta_rule": (ops.delta_rule, None, True),
    "gated_delta_rule": (ops.gated_delta_rule, (), True),
}


def _inputs(name: str, T: int, gen: torch.Generator) -> list:
    _, gate, delta = OPS[name]
    q = torch.randn(1, T, H, K, generator=gen)
    k = torch.randn(1, T, H, K, generator=gen)
    if delta:
        k = F.normalize(k, dim=-1)
    xs = [q, k, torch.randn(1, T, H, V, generator=gen)]
    if gate is not None:
        xs.append(F.logsigmoid(2 * torch.randn(1, T, H, *gate, generator=gen)))
    if delta:
        xs.append(torch.rand(1, T, H, generator=gen))
    return [x.requires_grad_() for x in xs]


def _call(name, xs, **kw):
    return OPS[name][0](*xs, scale=0.5, backend="torch", **kw)


@pytest.mark.parametrize("name", list(OPS))
def test_packed_equals_documents_alone(name):
    """Lengths 1, below, at and above the chunk, several chunks: the packed call's
    outputs, final states and the gradients of every input and initial state equal
    those of each document called alone (relative L2 1e-5: the same algorithm with
    the sequence cut differently)."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    lengths = [1, 7, 8, 9, 19, 3, 1, 12]
    offsets = [0]
    for L in lengths:
        offsets.append(offsets[-1] + L)
    xs = _inputs(name, offsets[-1], gen)
    h0 = torch.randn(len(lengths), H, K, V, generator=gen, requires_grad=True)
    o, S = _call(name, xs, initial_state=h0, output_final_state=True, chunk_size=8,
                 cu_seqlens=torch.tensor(offsets, dtype=torch.int32))
    alone = [_call(name, [x[:, s:e] for x in xs], initial_state=h0[i:i + 1],
                   output_final_state=True, chunk_size=8)
             for i, (s, e) in enumerate(zip(offsets, offsets[1:]))]
    ro, rS = torch.cat([a[0] for a in alone], 1), torch.cat([a[1] for a in alone])
    assert rel_err(o, ro) < 1e-5 and rel_err(S, rS) < 1e-5
    do, dS = torch.randn(o.shape, generator=gen), torch.randn(S.shape, generator=gen)
    got = torch.autograd.grad((o * do).sum() + (S * dS).sum(), [*xs, h0])
    want = torch.autograd.grad((ro * do).sum() + (rS * dS).sum(), [*xs, h0])
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < 1e-5, i


@pytest.mark.parametrize("name", list(OPS))
def test_packed_graph_depends_on_longest_document_only(name):
    """2 and 10 packed documents whose longest ones have 4 chunks make the same
    autograd graph: nothing in it is per document."""
    gen = torch.Generator().manual_seed(0)

    def graph(offsets):
        xs = _inputs(name, offsets[-1], gen)
        o, S = _call(name, xs, initial_state=torch.randn(len(offsets) - 1, H, K, V,
                                                         requires_grad=True),
                     output_final_state=True, chunk_size=4,
                     cu_seqlens=torch.tensor(offsets, dtype=torch.int32))
        return autograd_nodes(o.sum() + S.sum())

    assert graph([0, 16, 32]) == graph([0, 16, 32, *range(34, 50, 2)])
