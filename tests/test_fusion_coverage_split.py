"""Splits, chunks, slices and concatenations along the channel axis (issue 13, coverage).

torch-pruning 1.6 maps channels through these operations wrongly (chunks numbered in the order their
consumers were found, a chunk's size taken from the tensor it was split from, two reverse mappings applied
in the wrong order on a split-to-cat edge, nothing at all along the channel axis of token tensors), which
left channels claimed twice or by no group. The tracer re-derives those mappings from autograd's record and
splits a group into the channels that are interchangeable (same chunk). Each model here is a small version
of a timm pattern (FasterNet's partial convolution, CSP's halves, InceptionNeXt's four branches, a token
MLP that chunks its hidden layer); the oracles are the usual ones: a random permutation of every group
keeps the function (the trace's self-check), NT at sparsity 0 is the output ensemble, and default NT loads
strictly into a fresh model and runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import claims, model_out, rel_err

import fusion
from fusion.build import build_model
from fusion.state import full_state


class PartialConv(nn.Module):
    """FasterNet: a 3x3 convolution on the first ``k`` channels only (fixed split sizes), the rest untouched.
    The chunk going straight into the concatenation is found by the tracer before the convolution's."""

    def __init__(self, c: int = 8, k: int = 3, sliced: bool = False):
        super().__init__()
        self.k, self.sliced = k, sliced
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.partial = nn.Conv2d(k, k, 3, padding=1)
        self.mix = nn.Conv2d(c, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        if self.sliced:
            x1, x2 = x[:, : self.k], x.narrow(1, self.k, x.shape[1] - self.k)
        else:
            x1, x2 = torch.split(x, [self.k, x.shape[1] - self.k], dim=1)
        x = torch.cat((self.partial(x1), x2), 1)
        return self.fc(F.relu(self.mix(x)).mean((2, 3)))


class CrossStage(nn.Module):
    """CSP: the expansion's channels are chunked into halves, one half runs a residual block, the halves are
    concatenated (the untouched half straight from the split) and mixed by a transition convolution."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.exp = nn.Conv2d(3, c, 3, padding=1)
        self.block1 = nn.Conv2d(c // 2, 5, 1)
        self.block2 = nn.Conv2d(5, c // 2, 3, padding=1)
        self.transition = nn.Conv2d(c, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        xs, xb = F.relu(self.exp(x)).chunk(2, dim=1)
        xb = xb + self.block2(F.relu(self.block1(xb)))
        x = F.relu(self.transition(torch.cat([xs, xb], dim=1)))
        return self.fc(x.mean((2, 3)))


class FourBranches(nn.Module):
    """InceptionNeXt: four chunks of unequal size, three through their own depthwise convolution, the
    chunks consumed in another order than they were split in, a layer scale; and PiT's position embedding."""

    def __init__(self, c: int = 10):
        super().__init__()
        self.sizes = [4, 2, 2, 2]
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.hw = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.w = nn.Conv2d(2, 2, (1, 3), padding=(0, 1), groups=2)
        self.h = nn.Conv2d(2, 2, (3, 1), padding=(1, 0), groups=2)
        self.mix = nn.Conv2d(c, 6, 1)
        self.fc = nn.Linear(6, 4)
        # a layer scale reshaped to (1, C, 1, 1) and a position embedding shaped like the feature map (PiT)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.pos_embed = nn.Parameter(torch.randn(1, c, 12, 12) * 0.1)

    def forward(self, x):
        x = F.relu(self.stem(x)) + self.pos_embed
        x_id, x_hw, x_w, x_h = torch.split(x, self.sizes, dim=1)
        x = x + self.gamma.reshape(1, -1, 1, 1) * torch.cat(
            (x_id, self.hw(x_hw), self.w(x_w), self.h(x_h)), dim=1
        )
        return self.fc(F.relu(self.mix(x)).mean((2, 3)))


class TokenChunk(nn.Module):
    """A token MLP (B, N, C) whose hidden layer is chunked along the last axis and re-concatenated in the
    other order: torch-pruning maps splits only along dim 1."""

    def __init__(self, c: int = 6, hidden: int = 10):
        super().__init__()
        self.embed = nn.Linear(4, c)
        self.fc1 = nn.Linear(c, hidden)
        self.fc2 = nn.Linear(hidden, c)
        self.head = nn.Linear(c, 3)

    def forward(self, x):  # x: (B, N, 4)
        h = self.embed(x)
        a, b = self.fc1(h).chunk(2, dim=-1)
        h = h + self.fc2(torch.cat([F.gelu(b), torch.tanh(a)], dim=-1))
        return self.head(h.mean(1))


def _members(cls, n: int = 2):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        out.append(cls().eval())
    return out


def _x(cls):
    torch.manual_seed(100)
    return torch.randn(2, 7, 4) if cls is TokenChunk else torch.randn(2, 3, 12, 12)


CASES = [PartialConv, CrossStage, FourBranches, TokenChunk]


@pytest.mark.parametrize("cls", CASES, ids=lambda c: c.__name__)
def test_split_models_trace_and_every_channel_is_claimed_once(cls):
    model = _members(cls, 1)[0]
    x = _x(cls)
    graph = fusion.channel_groups(model, x)  # self-check included: a random permutation keeps the function
    for tensor, dims in graph.tensor_dims.items():
        for d in dims:
            assert torch.equal(
                claims(graph, tensor, d), torch.ones(graph.shapes[tensor][d], dtype=torch.long)
            ), (
                tensor,
                d,
            )
    # the permutation really moves tensors (or the self-check could not fail), and keeps the function
    state = full_state(model)
    new = graph.assemble([state], graph.random_permutation(torch.Generator().manual_seed(3)))
    assert sum(not torch.equal(new[k], state[k]) for k in graph.tensor_dims) >= len(graph.tensor_dims) // 2
    assert rel_err(model_out(build_model(model, new), x), model_out(model, x)) < 1e-5


def test_a_split_group_becomes_one_group_per_chunk():
    """The stem's channels reach the partial convolution (first 3) or not (last 5): two groups, because a
    channel cannot cross the split boundary; permuting across it changes the function (negative control)."""
    model = _members(PartialConv, 1)[0]
    x = _x(PartialConv)
    graph = fusion.channel_groups(model, x)
    stem = [g for g in graph.groups if g.name == "stem"]
    assert sorted(g.n_units for g in stem) == [3, 5]
    three = next(g for g in stem if g.n_units == 3)
    assert "partial" in three.layers
    assert "partial" not in next(g for g in stem if g.n_units == 5).layers
    # swap stem channel 0 (first chunk) with channel 5 (second chunk) and its consumers' columns alike
    state = full_state(model)
    perm = torch.arange(8)
    perm[0], perm[5] = 5, 0
    new = dict(state)
    new["stem.weight"], new["stem.bias"] = state["stem.weight"][perm], state["stem.bias"][perm]
    new["mix.weight"] = state["mix.weight"][:, perm]
    assert rel_err(model_out(build_model(model, new), x), model_out(model, x)) > 1e-3


@pytest.mark.parametrize("sliced", [False, True], ids=["split", "slice"])
def test_fixed_size_split_fuses_at_member_width(sliced):
    """Fixed chunk sizes (FasterNet): default NT (member width) and averaging load strictly and run; NT keeps
    each chunk's width, so the fused model's split still adds up."""
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(PartialConv(sliced=sliced).eval())
    x = _x(PartialConv)
    for method in ("nt", "avg"):
        fused = fusion.fuse(members, method, example_inputs=x)
        fresh = PartialConv(sliced=sliced).eval()
        fresh.load_state_dict(fused.state_dict(), strict=True)
        assert torch.isfinite(model_out(fresh, x)).all()


@pytest.mark.parametrize("cls", [CrossStage, TokenChunk], ids=lambda c: c.__name__)
def test_nt_at_sparsity0_is_the_ensemble_through_chunks(cls):
    """Chunk sizes taken from the tensor (``chunk(2)``) follow the width: the concatenated model is exactly
    the output ensemble, which needs every chunk's channels of both members placed in the right chunk."""
    members = _members(cls)
    x = _x(cls)
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-5
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = cls().eval()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.isfinite(model_out(fresh, x)).all()


@pytest.mark.parametrize("arch", ["inception_next_atto", "fasternet_t0"])
def test_timm_split_models_trace_with_every_channel_claimed_once(arch):
    """The timm models of the refusal class (64x64 input): InceptionNeXt also needs its layer scale
    ``gamma.reshape(1, -1, 1, 1)`` to keep channels where they are (torch-pruning guessed a flatten of
    stride 4 there); the self-check runs inside ``channel_groups``."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    graph = fusion.channel_groups(model, x)
    for tensor, dims in graph.tensor_dims.items():
        for d in dims:
            assert (claims(graph, tensor, d) == 1).all(), (tensor, d)


class Aggregation(nn.Module):
    """DLA's aggregation node: one tensor concatenated twice with another between (``cat([a, c, a])``), so
    one group holds two separate runs of the consumer's input channels with another group's run between."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.root = nn.Conv2d(11, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        a, c = F.relu(self.a(x)), F.relu(self.c(x))
        return self.fc(F.relu(self.root(torch.cat([a, c, a], 1))).mean((2, 3)))


def test_a_group_concatenated_twice_around_another_keeps_the_concatenation_order():
    """Each run becomes a slot of its own, so assembly writes a, c, a in the concatenation's order (it used
    to write a, a, c: a wrong model, refused by the self-check); NT at sparsity 0 is the ensemble."""
    members = _members(Aggregation)
    x = _x(Aggregation)
    graph = fusion.channel_groups(members[0], x)
    a = next(g for g in graph.groups if g.name == "a")
    runs = sorted(int(s.positions.min()) for s in a.slots if s.tensor == "root.weight")
    assert runs == [0, 7]
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-5
