"""Linears over the token axis (MLP-Mixer's and gMLP's token mixing): ``fusion.axes`` labels every axis of the
traced forward pass, so a Linear applied after a transpose is known to read and write positions.

Oracles: the float64 self-check passes; the positions (the token Linears' input columns, the last one's rows and
bias) are in no group, the hidden units of a token MLP are; a random permutation keeps the function; the
concatenation of a member with itself is the member (a token Linear is shared by all channels, so between
different members the concatenation averages it, as it averages the classifier: there is no block-diagonal
form, and NT at sparsity 0 is not the ensemble); the default NT loads strictly; a trace missing a coupling, and
torch-pruning's own trace without the rewiring, are refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fusion
from fusion.groups import ChannelGraph, ChannelGroup
from fusion.state import full_state
from fusion.verify import verify_permutation_invariance


class TokenMixer(nn.Module):
    """conv patches -> tokens (B, N, C) -> token MLP over N (+ skip) -> gMLP block: fc1 -> chunk -> u * proj over
    N of v -> fc2 (+ skip) -> mean -> classifier. No normalization across channels."""

    def __init__(self, dim: int = 12, tokens: int = 16, hidden: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.tok1, self.tok2 = nn.Linear(tokens, hidden), nn.Linear(hidden, tokens)
        self.fc1, self.proj, self.fc2 = nn.Linear(dim, 16), nn.Linear(tokens, tokens), nn.Linear(8, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.tok2(torch.nn.functional.gelu(self.tok1(x.transpose(1, 2)))).transpose(1, 2)
        u, v = torch.nn.functional.gelu(self.fc1(x)).chunk(2, dim=-1)
        x = x + self.fc2(u * self.proj(v.transpose(1, 2)).transpose(1, 2))
        return self.head(x.mean(1))


def _members(dim: int, n: int = 2) -> list[nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(TokenMixer(dim).eval())
    return out


def _out(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # 4 x 4 = 16 tokens


@pytest.mark.parametrize("dim", [12, 16])  # 16: as many channels as tokens (sizes cannot tell them apart)
def test_token_linears_are_traced_by_axis(dim):
    members = _members(dim)
    graph = fusion.channel_groups(members[0], X)  # coverage and the float64 self-check pass
    claimed = {(s.tensor, s.dim) for g in graph.groups for s in g.slots}
    for fixed in (
        ("tok1.weight", 1),
        ("tok2.weight", 0),
        ("tok2.bias", 0),
        ("proj.weight", 0),
        ("proj.weight", 1),
    ):
        assert fixed not in claimed  # positions
    hidden = next(g for g in graph.groups if any(s.tensor == "tok1.weight" for s in g.slots))
    assert hidden.n_units == 10 and {(s.tensor, s.dim) for s in hidden.slots} == {
        ("tok1.weight", 0),
        ("tok1.bias", 0),
        ("tok2.weight", 1),
    }
    # the gate multiplies channel i of u with channel i of v, which passed through proj: pairs
    gate = next(g for g in graph.groups if any((s.tensor, s.dim) == ("fc1.weight", 0) for s in g.slots))
    assert gate.unit_kind == "coupled channels" and gate.n_units == 8
    stream = next(g for g in graph.groups if any(s.tensor == "stem.weight" for s in g.slots))
    assert {"fc1.weight", "fc2.weight", "head.weight"} <= {s.tensor for s in stream.slots}

    state = graph.assemble(
        [full_state(members[0])], graph.random_permutation(torch.Generator().manual_seed(2))
    )
    permuted = TokenMixer(dim)
    permuted.load_state_dict(state, strict=True)
    assert _rel(_out(permuted, X), _out(members[0], X)) < 1e-5

    a, b = members
    same = fusion.fuse([a, a], "nt", example_inputs=X, sparsity=0.0)
    assert same.tok1.out_features == 20 and same.proj.weight.shape == (16, 16)
    assert _rel(_out(same, X), _out(a, X)) < 1e-5
    fused = fusion.fuse([a, b], "nt", example_inputs=X)
    fresh = TokenMixer(dim)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(_out(fresh, X), _out(fused, X))


def test_a_missing_coupling_and_the_unrewired_trace_are_refused(monkeypatch):
    model = _members(12, 1)[0]
    graph = fusion.channel_groups(model, X)
    # the hidden units of the token MLP permuted on tok1's rows but not on tok2's columns
    groups = [
        ChannelGroup(
            g.name, g.n_units, [s for s in g.slots if (s.tensor, s.dim) != ("tok2.weight", 1)], g.unit_kind
        )
        for g in graph.groups
    ]
    broken = ChannelGraph(groups=groups, output_layers=graph.output_layers, shapes=graph.shapes)
    with pytest.raises(fusion.FusionError, match="not traced completely"):
        verify_permutation_invariance(model, broken, X)
    # torch-pruning alone ties the positions to the stream's channels
    import fusion.trace as trace

    monkeypatch.setattr(trace, "label_axes", lambda dg: set())
    with pytest.raises(fusion.FusionError):
        trace._trace(model, X, None)


# ---------------------------------------------------------------------------- a channels-last position embedding
class ChannelsLast(nn.Module):
    """conv patches -> channels last (B, H, W, C) + position embedding (1, H, W, C) (VOLO) -> tokens -> MLP ->
    classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 4, 8))
        self.fc1, self.fc2, self.head = nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 5)

    def forward(self, x):
        x = (self.stem(x).permute(0, 2, 3, 1) + self.pos_embed).flatten(1, 2)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


def test_channels_last_position_embedding_holds_channels_last():
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(ChannelsLast().eval())
    graph = fusion.channel_groups(members[0], X)
    stream = next(g for g in graph.groups if any(s.tensor == "stem.weight" for s in g.slots))
    assert ("pos_embed", 3) in {(s.tensor, s.dim) for s in stream.slots}
    state = graph.assemble(
        [full_state(members[0])], graph.random_permutation(torch.Generator().manual_seed(2))
    )
    permuted = ChannelsLast()
    permuted.load_state_dict(state, strict=True)
    assert _rel(_out(permuted, X), _out(members[0], X)) < 1e-5
    wide = fusion.fuse(members, "nt", example_inputs=X, sparsity=0.0)
    assert wide.pos_embed.shape == (1, 4, 4, 16)
    assert _rel(_out(wide, X), _out(fusion.ensemble(members), X)) < 1e-6
    fused = fusion.fuse(members, "nt", example_inputs=X)
    fresh = ChannelsLast()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    groups = [
        ChannelGroup(g.name, g.n_units, [s for s in g.slots if s.tensor != "pos_embed"], g.unit_kind)
        for g in graph.groups
    ]
    broken = ChannelGraph(groups=groups, output_layers=graph.output_layers, shapes=graph.shapes)
    with pytest.raises(fusion.FusionError, match="not traced completely"):
        verify_permutation_invariance(members[0], broken, X)


class ChannelsLastMap(nn.Module):
    """The same on the channels-last map itself: the MLP's Linears flatten (B, H, W, C) to (B * H * W, C)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 4, 8))
        self.fc1, self.fc2, self.head = nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1) + self.pos_embed
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean((1, 2)))


def test_linear_on_a_channels_last_map_keeps_channels():
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(ChannelsLastMap().eval())
    graph = fusion.channel_groups(members[0], X)
    stream = next(g for g in graph.groups if any(s.tensor == "stem.weight" for s in g.slots))
    fc1 = next(s for s in stream.slots if s.tensor == "fc1.weight")
    assert fc1.positions.shape == (8, 1, 1)  # each channel once (a flatten mapping claimed two columns each)
    state = graph.assemble(
        [full_state(members[0])], graph.random_permutation(torch.Generator().manual_seed(2))
    )
    permuted = ChannelsLastMap()
    permuted.load_state_dict(state, strict=True)
    assert _rel(_out(permuted, X), _out(members[0], X)) < 1e-5
    wide = fusion.fuse(members, "nt", example_inputs=X, sparsity=0.0)
    assert _rel(_out(wide, X), _out(fusion.ensemble(members), X)) < 1e-6
    fresh = ChannelsLastMap()
    fresh.load_state_dict(fusion.fuse(members, "nt", example_inputs=X).state_dict(), strict=True)
    # (no negative control: two rules map this reshape -- axes.channels_last_views and the reshape re-mapping
    # from the channel axes trace.py tracks -- and the model traces with either one alone)
