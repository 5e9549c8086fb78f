"""Provenance oracles: the record a method attaches must name the member units the fused units really are.

For an MLP the first layer's rows are copied, not mixed, by NT (the input is shared), so fused row k must
equal row u of member m for its one source (k, m, u) — after any number of iterative or hierarchical steps,
which is what :func:`fusion.provenance.compose` has to get right. Averaging records every member's unit u.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fusion
from fusion.provenance import Provenance


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("method", ["nt", "nt_iterative", "nt_hierarchical"])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_nt_sources_are_the_kept_rows(method, n):
    members = [_mlp(s) for s in range(n)]
    fused = fusion.fuse(members, method)
    prov = fusion.provenance_of(fused)
    assert isinstance(prov, Provenance) and prov.n_members == n
    graph = fusion.channel_groups(members[0], torch.randn(1, 6))
    first = next(gi for gi, g in enumerate(graph.groups) if g.name == "0")
    k, m, u, w = prov.group_sources(first, graph.groups[first].n_units)
    assert torch.equal(k, torch.arange(10)), "one source per fused unit, every fused unit covered"
    assert torch.allclose(w, torch.ones_like(w))
    for ki, mi, ui in zip(k.tolist(), m.tolist(), u.tolist()):
        assert torch.equal(fused[0].weight[ki], members[mi][0].weight[ui])
        assert torch.equal(fused[0].bias[ki], members[mi][0].bias[ui])
    if method == "nt_iterative" and n > 2:
        assert int(m.max()) == n - 1, "the last member must contribute (it weighs most)"


def test_combine_is_the_weighted_mean_of_sources():
    members = [_mlp(s) for s in range(3)]
    fused = fusion.fuse(members, "avg")
    prov = fusion.provenance_of(fused)
    values = [torch.randn(10, 2) for _ in members]
    out = prov.combine(0, 10, values)
    assert torch.allclose(out, sum(values) / 3, atol=1e-6)
    weighted = Provenance("interpolate", 2, None, member_weights=(0.25, 0.75))
    assert torch.allclose(weighted.combine(0, 10, values[:2]), 0.25 * values[0] + 0.75 * values[1], atol=1e-6)


def test_ot_provenance_follows_the_permutation():
    a = _mlp(0)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    b = _mlp(0)
    with torch.no_grad():
        b[0].weight.copy_(a[0].weight[perm])
        b[0].bias.copy_(a[0].bias[perm])
        b[2].weight.copy_(a[2].weight[:, perm])
    fused = fusion.fuse([a, b], "ot")
    prov = fusion.provenance_of(fused)
    graph = fusion.channel_groups(a, torch.randn(1, 6))
    first = next(gi for gi, g in enumerate(graph.groups) if g.name == "0")
    k, m, u, w = prov.group_sources(first, 10)
    inverse = torch.argsort(perm)
    for ki, mi, ui in zip(k.tolist(), m.tolist(), u.tolist()):
        assert ui == (ki if mi == 0 else int(inverse[ki])), "member 1's unit inverse[k] is anchor unit k"
    assert torch.allclose(w, torch.full_like(w, 0.5))
