"""Oracles 1, 2, 3 and 6 of the fusion core, on every supported architecture.

* 1: permuting every traced channel group at random leaves a model's outputs unchanged (and permuting a
  producing layer alone, without its consumers, does not);
* 2: NT at sparsity 0 is the output-averaging ensemble (ConvNeXt: see ``test_nt_sparsity0``);
* 3: NT at the default sparsity returns the member architecture, loadable into a fresh model, trainable;
* 6: grouped, depthwise and channel-multiplier convolutions (``grouped`` and ``regnety_002``) pass 2 and 3
  with ``groups`` unchanged.

Members are built once per architecture (module-scoped fixture: pytest groups the tests by architecture,
so only one architecture's members are alive at a time). The largest models run with two members only.
"""

from __future__ import annotations

import gc
from functools import cached_property

import pytest
import torch
import torch.nn as nn
from conftest import fusion_example_input, make_fusion_member

import fusion
from fusion.build import build_model
from fusion.trace import full_state

SMALL = ["mlp", "grouped", "resnet18", "mobilenetv3_small_100", "efficientnet_b0", "regnety_002", "convnext_atto"]
BIG = ["vgg11", "vgg11_bn", "resnet50", "densenet121"]
LAYERNORM_OVER_CHANNELS = {"convnext_atto"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Case:
    """The members of one architecture and the fusion results several tests share (computed lazily)."""

    def __init__(self, arch: str):
        self.arch = arch
        self.sizes = (2, 3) if arch in SMALL else (2,)
        self.members = [make_fusion_member(arch, seed) for seed in range(max(self.sizes))]
        self.x = fusion_example_input(arch)
        self._nt: dict = {}

    @cached_property
    def graph(self) -> fusion.ChannelGraph:
        return fusion.channel_groups(self.members[0], self.x)

    def ensemble_out(self, n: int) -> torch.Tensor:
        with torch.no_grad():
            return fusion.ensemble(self.members[:n])(self.x)

    def nt(self, n: int, sparsity=None) -> nn.Module:
        key = (n, sparsity)
        if key not in self._nt:
            opts = {} if sparsity is None else {"sparsity": sparsity}
            self._nt[key] = fusion.fuse(self.members[:n], "nt", example_inputs=self.x, **opts)
        return self._nt[key]


@pytest.fixture(scope="module", params=SMALL + BIG)
def case(request):
    c = Case(request.param)
    yield c
    del c
    gc.collect()


def _out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ---------------------------------------------------------------------------- oracle 1
def test_random_group_permutation_keeps_outputs(case):
    model = case.members[0]
    reference = _out(model, case.x)
    state = full_state(model)
    g = case.graph
    assert g.groups, "no channel group traced"
    for seed in (1, 2):
        new = g.assemble([state], g.random_permutation(torch.Generator().manual_seed(seed)))
        # the permutation must really move tensors, or this test could not fail
        moved = [name for name in g.tensor_dims if not torch.equal(new[name], state[name])]
        assert len(moved) >= len(g.tensor_dims) // 2, f"only {len(moved)} of {len(g.tensor_dims)} group tensors moved"
        assert rel_err(_out(build_model(model, new), case.x), reference) < 1e-5


def _roll_positions(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Index along a tensor dim that moves every unit of a group to the next unit's place."""
    index = torch.arange(size)
    src = positions.roll(1, dims=0).reshape(-1)
    dst = positions.reshape(-1)
    keep = (dst >= 0) & (src >= 0)
    index[dst[keep]] = src[keep]
    return index


def test_permuting_only_the_producer_changes_outputs(case):
    """Negative control for oracle 1: a group's consumers must follow its producer."""
    model = case.members[0]
    reference = _out(model, case.x)
    state = full_state(model)
    groups = [g for g in case.graph.groups if g.n_units > 1]
    assert groups
    changed = 0
    for g in groups[:3]:
        new = dict(state)
        for s in g.slots:
            if s.layer == g.name and s.role == "out":
                index = _roll_positions(s.positions, state[s.tensor].shape[s.dim])
                new[s.tensor] = state[s.tensor].index_select(s.dim, index)
        assert any(not torch.equal(new[k], state[k]) for k in state)
        changed += rel_err(_out(build_model(model, new), case.x), reference) > 1e-3
    assert changed == len(groups[:3])


# ---------------------------------------------------------------------------- oracle 2
def test_nt_sparsity0(case):
    """NT at sparsity 0 keeps the whole block-diagonal concatenation: the output average of the members.

    Not for models with LayerNorm over channels (ConvNeXt): the concatenated model's LayerNorm normalizes
    over all members' channels together, so its output is not the ensemble's. What holds there instead:
    sparsity 0 of N identical copies is the member itself (duplicated channels leave a LayerNorm's mean
    and variance unchanged), and for different members the result is not the ensemble.
    """
    for n in case.sizes:
        fused = case.nt(n, 0.0)
        ens = case.ensemble_out(n)
        member_params = sum(p.numel() for p in case.members[0].parameters())
        assert sum(p.numel() for p in fused.parameters()) > 0.9 * n * member_params
        if case.arch in LAYERNORM_OVER_CHANNELS:
            assert rel_err(_out(fused, case.x), ens) > 1e-2, "LayerNorm model unexpectedly equals the ensemble"
            copies = [case.members[0]] * n
            same = fusion.fuse(copies, "nt", example_inputs=case.x, sparsity=0.0)
            assert rel_err(_out(same, case.x), _out(case.members[0], case.x)) < 1e-5
        else:
            assert rel_err(_out(fused, case.x), ens) < 2e-5, f"N={n}"


# ---------------------------------------------------------------------------- oracle 3 and 6
def _conv_shapes(model: nn.Module) -> dict:
    return {
        name: (m.in_channels, m.out_channels, m.groups)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    }


def test_nt_default_is_member_architecture(case):
    member_state = case.members[0].state_dict()
    for n in case.sizes:
        fused = case.nt(n)
        assert not fused.training
        state = fused.state_dict()
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in member_state.items()}
        assert _conv_shapes(fused) == _conv_shapes(case.members[0])  # groups of grouped convs unchanged
        fresh = make_fusion_member(case.arch, 100 + n)
        fresh.load_state_dict(state, strict=True)
        out = _out(fresh, case.x)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, _out(fused, case.x), rtol=1e-5, atol=1e-6)
        # the fused model draws on every member (the members differ, so one member never wins every group)
        for m in case.members[:n]:
            assert any(not torch.equal(state[k], v) for k, v in m.state_dict().items() if v.is_floating_point())


def test_nt_default_trains(case):
    fused = case.nt(max(case.sizes))
    gen = torch.Generator().manual_seed(7)
    x = fusion_example_input(case.arch, batch=4, seed=3)
    y = torch.randint(0, 10, (4,), generator=gen)
    fused.train()
    opt = torch.optim.SGD(fused.parameters(), lr=0.01)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(fused(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(float(nn.functional.cross_entropy(fused(x), y)))
    fused.eval()
    assert all(map(lambda v: v == v, losses)), losses  # no NaN
    assert losses[-1] < losses[0], losses


def test_sparsity0_multiplies_grouped_conv_groups(case):
    """Oracle 6: the concatenation of N grouped convolutions is one convolution with N times the groups."""
    convs = {k: v for k, v in _conv_shapes(case.members[0]).items() if v[2] > 1}
    if not convs:
        pytest.skip(f"{case.arch} has no grouped convolution")
    fused = _conv_shapes(case.nt(2, 0.0))
    for name, (cin, cout, groups) in convs.items():
        assert fused[name] == (2 * cin, 2 * cout, 2 * groups), name
