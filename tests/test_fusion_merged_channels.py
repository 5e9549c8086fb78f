"""A reshape that merges a token tensor's channel axis, the fastest, with the axes before it (Transformer in
Transformer: inner pixel tokens ``(B * N, P, C)`` -> each patch's outer features ``(B, N, P * C)``): channel c is
the P positions ``p * C + c``, one repeated segment per pixel. And TNT's attention, whose q and k come from one
Linear ``qk`` and v from another.

Oracles: the float64 self-check passes; a random permutation keeps the function; NT at sparsity 0 is the ensemble
(no normalization across channels here) and widens both the inner channels and the merged axis; the default NT
loads strictly; the channel-slowest layout (torch-pruning's flatten mapping) is refused by the self-check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fusion
from fusion.groups import ChannelGraph, ChannelGroup, Slot
from fusion.state import full_state
from fusion.verify import verify_permutation_invariance

N, P, C, D = 4, 3, 8, 10  # patches, pixels per patch, inner channels, outer channels


class PixelsInPatches(nn.Module):
    """pixels (B * N, P, 6) -> inner embed -> TNT attention (qk, v) + skip -> inner MLP + skip ->
    reshape (B, N, P * C) -> proj -> + outer embed -> mean -> classifier."""

    def __init__(self):
        super().__init__()
        from timm.models.tnt import Attention

        self.inner = nn.Linear(6, C)
        self.attn = Attention(C, C, num_heads=2, qkv_bias=True)
        self.fc1, self.fc2 = nn.Linear(C, 12), nn.Linear(12, C)
        self.outer, self.proj = nn.Linear(6 * P, D), nn.Linear(P * C, D)
        self.head = nn.Linear(D, 5)

    def forward(self, x):  # x: (B, N, P, 6)
        b = x.shape[0]
        pix = self.inner(x.reshape(b * N, P, 6))
        pix = pix + self.attn(pix)
        pix = pix + self.fc2(torch.relu(self.fc1(pix)))
        patch = self.outer(x.reshape(b, N, P * 6)) + self.proj(pix.reshape(b, N, -1))
        return self.head(torch.relu(patch).mean(1))


def _members(n: int = 2) -> list[nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(PixelsInPatches().eval())
    return out


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


X = torch.randn(2, N, P, 6, generator=torch.Generator().manual_seed(0))


def test_channel_fastest_merge_is_repeated_segments():
    members = _members()
    graph = fusion.channel_groups(members[0], X)  # coverage and the float64 self-check pass
    inner = next(g for g in graph.groups if any((s.tensor, s.dim) == ("inner.weight", 0) for s in g.slots))
    proj = next(s for s in inner.slots if s.tensor == "proj.weight")
    assert proj.positions.shape == (C, 1, P)
    assert proj.positions[3, 0].tolist() == [3, C + 3, 2 * C + 3]  # channel 3 of every pixel
    heads = next(g for g in graph.groups if g.unit_kind == "head")
    assert heads.n_units == 2 and {"attn.qk", "attn.v", "attn.proj"} <= set(heads.layers)

    state = graph.assemble(
        [full_state(members[0])], graph.random_permutation(torch.Generator().manual_seed(4))
    )
    permuted = PixelsInPatches()
    permuted.load_state_dict(state, strict=True)
    assert _rel(_out(permuted, X), _out(members[0], X)) < 1e-5

    wide = fusion.fuse(members, "nt", example_inputs=X, sparsity=0.0)
    assert wide.proj.in_features == P * 2 * C and wide.attn.num_heads == 4
    assert _rel(_out(wide, X), _out(fusion.ensemble(members), X)) < 1e-6
    fused = fusion.fuse(members, "nt", example_inputs=X)
    fresh = PixelsInPatches()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(_out(fresh, X), _out(fused, X))


def test_channel_slowest_layout_is_refused():
    model = _members(1)[0]
    graph = fusion.channel_groups(model, X)
    groups = []
    for g in graph.groups:
        slots = []
        for s in g.slots:
            if s.tensor == "proj.weight" and s.dim == 1:  # channel c at c * P + p instead of p * C + c
                pos = torch.arange(C * P).reshape(C, 1, P)
                s = Slot(s.tensor, s.dim, s.role, s.kind, s.is_weight, s.layer, pos)
            slots.append(s)
        groups.append(ChannelGroup(g.name, g.n_units, slots, g.unit_kind))
    broken = ChannelGraph(groups=groups, output_layers=graph.output_layers, shapes=graph.shapes)
    with pytest.raises(fusion.FusionError, match="not traced completely"):
        verify_permutation_invariance(model, broken, X)
