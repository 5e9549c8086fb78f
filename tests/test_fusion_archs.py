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
import re
from functools import cached_property

import pytest
import torch
import torch.nn as nn
from conftest import FUSION_BIG, FUSION_SMALL, fusion_example_input, make_fusion_member, model_out, rel_err

import fusion
from fusion.build import build_model
from fusion.state import full_state

SMALL, BIG = FUSION_SMALL, FUSION_BIG
LAYERNORM_OVER_CHANNELS = {"convnext_atto"}


class Case:
    """The members of one architecture and the fusion results several tests share (computed lazily)."""

    def __init__(self, arch: str):
        self.arch = arch
        self.sizes = (2, 3) if arch in SMALL else (2,)
        self.members = [make_fusion_member(arch, seed) for seed in range(max(self.sizes))]
        self.x = fusion_example_input(arch)
        self._nt: dict = {}

    def fresh(self) -> nn.Module:
        """A new, uninitialised instance of the member's architecture (built on the meta device: free)."""
        with torch.device("meta"):
            return make_fusion_member(self.arch, 0, randomize=False)

    @cached_property
    def graph(self) -> fusion.ChannelGraph:
        return fusion.channel_groups(self.members[0], self.x)

    def ensemble_out(self, n: int) -> torch.Tensor:
        with torch.no_grad():
            return fusion.ensemble(self.members[:n])(self.x)

    def nt(self, n: int) -> nn.Module:
        """NT at the default sparsity (kept: two tests use it)."""
        if n not in self._nt:
            self._nt[n] = fusion.fuse(self.members[:n], "nt", example_inputs=self.x)
        return self._nt[n]


@pytest.fixture(scope="module", params=SMALL + BIG)
def case(request):
    c = Case(request.param)
    yield c
    del c
    gc.collect()


# ---------------------------------------------------------------------------- oracle 1
def test_random_group_permutation_keeps_outputs(case):
    model = case.members[0]
    reference = model_out(model, case.x)
    state = full_state(model)
    g = case.graph
    assert g.groups, "no channel group traced"
    new = g.assemble([state], g.random_permutation(torch.Generator().manual_seed(1)))
    # the permutation must really move tensors, or this test could not fail
    moved = [name for name in g.tensor_dims if not torch.equal(new[name], state[name])]
    assert len(moved) >= len(g.tensor_dims) // 2, (
        f"only {len(moved)} of {len(g.tensor_dims)} group tensors moved"
    )
    assert rel_err(model_out(build_model(model, new), case.x), reference) < 1e-5


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
    reference = model_out(model, case.x)
    state = full_state(model)
    groups = [g for g in case.graph.groups if g.n_units > 1][:2]
    assert groups
    for g in groups:
        new = dict(state)
        for s in g.slots:
            if s.layer == g.name and s.role == "out":
                index = _roll_positions(s.positions, state[s.tensor].shape[s.dim])
                new[s.tensor] = state[s.tensor].index_select(s.dim, index)
        assert any(not torch.equal(new[k], state[k]) for k in state)
        assert rel_err(model_out(build_model(model, new), case.x), reference) > 1e-3, g


# ---------------------------------------------------------------------------- oracle 2 (and 6)
def _conv_shapes(model: nn.Module) -> dict:
    return {
        name: (m.in_channels, m.out_channels, m.groups)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    }


def test_nt_sparsity0(case):
    """NT at sparsity 0 keeps the whole block-diagonal concatenation: the output average of the members.

    Not for models with LayerNorm over channels (ConvNeXt): the concatenated model's LayerNorm normalizes
    over all members' channels together, so its output is not the ensemble's. What holds there instead:
    sparsity 0 of N identical copies is the member itself (duplicated channels leave a LayerNorm's mean
    and variance unchanged), and for different members the result is not the ensemble.

    Grouped convolutions (oracle 6) become one convolution with N times the groups.
    """
    member_convs = _conv_shapes(case.members[0])
    member_params = sum(p.numel() for p in case.members[0].parameters())
    for n in case.sizes:
        fused = fusion.fuse(case.members[:n], "nt", example_inputs=case.x, sparsity=0.0)
        assert not fused.training
        assert sum(p.numel() for p in fused.parameters()) > 0.9 * n * member_params
        for name, (cin, cout, groups) in _conv_shapes(fused).items():
            c0, o0, g0 = member_convs[name]
            stem = c0 == 3  # the input image is shared by the members
            assert (cin, cout, groups) == (c0 if stem else n * c0, n * o0, n * g0 if g0 > 1 else 1), name
        out, ens = model_out(fused, case.x), case.ensemble_out(n)
        del fused
        if case.arch in LAYERNORM_OVER_CHANNELS:
            assert rel_err(out, ens) > 1e-2, "LayerNorm model unexpectedly equals the ensemble"
        else:
            assert rel_err(out, ens) < 2e-5, f"N={n}"
    if case.arch in LAYERNORM_OVER_CHANNELS:
        copies = [case.members[0]] * 2
        same = fusion.fuse(copies, "nt", example_inputs=case.x, sparsity=0.0)
        assert rel_err(model_out(same, case.x), model_out(case.members[0], case.x)) < 1e-5


# ---------------------------------------------------------------------------- oracle 3 (and 6)
def test_nt_default_is_member_architecture(case):
    member_state = case.members[0].state_dict()
    for n in case.sizes:
        fused = case.nt(n)
        assert not fused.training
        state = fused.state_dict()
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in member_state.items()}
        assert _conv_shapes(fused) == _conv_shapes(case.members[0])  # groups of grouped convs unchanged
        fresh = case.fresh()
        fresh.load_state_dict(state, strict=True, assign=True)  # strict: same keys and shapes
        out = model_out(fresh, case.x)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, model_out(fused, case.x), rtol=1e-5, atol=1e-6)
        # the fused model draws on every member (the members differ, so one member never wins every group)
        for m in case.members[:n]:
            assert any(
                not torch.equal(state[k], v) for k, v in m.state_dict().items() if v.is_floating_point()
            )


def test_nt_default_trains(case):
    """A fresh model holding the fused state trains: in train mode the forward and backward run, every
    parameter gets a finite gradient and BatchNorm statistics update; a few SGD steps lower the loss.

    The descent is checked with normalization statistics and dropout fixed (eval mode): with 4 images of
    32x32 (1x1 final feature maps), train-mode BatchNorm is so ill-conditioned that even an unfused timm
    member fails it (efficientnet_b0: squared gradient norm ~6e8; a step of 1e-6 along it does not follow
    the linear prediction), so a loss check in train mode would test the batch, not the fusion.
    """
    model = case.fresh()
    model.load_state_dict(
        {k: v.clone() for k, v in case.nt(max(case.sizes)).state_dict().items()}, assign=True
    )
    hand_built = case.arch in ("mlp", "grouped")
    batch, lr = (8, 1e-2) if hand_built else (4, 1e-3)
    x = fusion_example_input(case.arch, batch=batch, seed=3)
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(7))

    stats = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(not torch.equal(model.state_dict()[k], v) for k, v in stats.items())

    model.eval()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tried = []
    # plain gradient descent with a step small enough lowers the loss whenever the gradients are right;
    # randomized members differ in curvature, so the step is shrunk until descent shows (at most 3 tries)
    for step in (lr, lr / 10, lr / 100):
        model.load_state_dict(start)
        opt = torch.optim.SGD(model.parameters(), lr=step)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        with torch.no_grad():
            losses.append(nn.functional.cross_entropy(model(x), y).item())
        tried.append((step, losses))
        if losses[-1] < losses[1] < losses[0]:
            break
    assert losses[-1] < losses[1] < losses[0], tried


# ---------------------------------------------------------------------------- refusal classes of the zoo walk
def _permutation_keeps_function(model: nn.Module, x: torch.Tensor, graph) -> None:
    """Oracle 1 on one model: the random permutation of every group computes the same function."""
    state = full_state(model)
    new = graph.assemble([state], graph.random_permutation(torch.Generator().manual_seed(3)))
    assert any(not torch.equal(new[k], state[k]) for k in graph.tensor_dims)
    assert rel_err(model_out(build_model(model, new), x), model_out(model, x)) < 1e-5


def _tiny_caformer(seed: int) -> nn.Module:
    """timm's MetaFormer (CAFormer: SepConv and attention stages, an Mlp classifier head) at toy width."""
    from timm.models.metaformer import Attention as MFAttention
    from timm.models.metaformer import LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv

    torch.manual_seed(seed)
    model = MetaFormer(
        depths=(1, 1, 1, 1),
        dims=(16, 32, 32, 32),
        token_mixers=[SepConv, SepConv, MFAttention, MFAttention],
        norm_layers=[LayerNorm2dNoBias] * 2 + [LayerNormNoBias] * 2,
        num_classes=5,
    )
    from conftest import _randomize_fusion_member

    _randomize_fusion_member(model, torch.Generator().manual_seed(100 + seed))
    return model.eval()


def test_metaformer_mlp_head_its_last_layer_is_the_output_layer():
    """caformer/convformer: the classifier ``head.fc`` is an Mlp (fc1, norm, fc2); only fc2 makes outputs, fc1's
    channels are hidden channels (refused before as "output layer 'head.fc' produces traced channels")."""
    members = [_tiny_caformer(s) for s in range(2)]
    x = torch.randn(2, 3, 32, 32)
    graph = fusion.channel_groups(members[0], x)
    assert graph.output_layers == ["head.fc.fc2"]
    assert any("head.fc.fc1" in g.layers for g in graph.groups)
    _permutation_keeps_function(members[0], x, graph)
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = _tiny_caformer(9)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.isfinite(model_out(fresh, x)).all()


class _Eca(nn.Module):
    """ECA (as timm's EcaModule): a 1-D convolution over the channel axis of the pooled features gates the
    channels, so channel c's gate reads channels c - 1 and c + 1: no permutation of them is a symmetry."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv(x.mean((2, 3)).view(x.shape[0], 1, -1))
        return x * y.sigmoid().view(x.shape[0], -1, 1, 1)


class _EcaNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn1, self.eca = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), _Eca()
        self.c2, self.bn2, self.fc = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Linear(6, 5)

    def front(self, x):
        return torch.relu(self.eca(self.bn1(self.c1(x))))

    def head(self, h):
        return self.fc(torch.relu(self.bn2(self.c2(h))).mean((2, 3)))

    def forward(self, x):
        return self.head(self.front(x))


def _eca_member(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = _EcaNet().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
    return model


def test_channels_mixed_across_the_channel_axis_are_pinned_and_averaged():
    """Channels that an operation mixes with each other (ECA) cannot be permuted, so they are pinned: in no
    group, named on the graph, kept in place by every method. Oracles: permuting them does change the
    function; NT at sparsity 0 is the members' ensemble over the *averaged* pinned features (the layers
    reading a group into pinned channels are scaled by 1/N, as the classifier is); every method averages the
    tensors that only pinned channels hold."""
    x = torch.randn(4, 3, 12, 12)
    members = [_eca_member(s) for s in (0, 1)]
    graph = fusion.channel_groups(members[0], x)
    (pinned,) = graph.pinned
    assert "8 channels" in pinned and "'c1'" in pinned and "'eca.conv'" in pinned
    assert not any("c1" in g.layers or "bn1" in g.layers for g in graph.groups)
    assert any("c2" in g.layers and g.n_units == 6 for g in graph.groups)

    # why: a permutation of c1's channels (everything they touch moved with them) changes the function
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    state = {k: v.clone() for k, v in members[0].state_dict().items()}
    for k in ("c1.weight", "c1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
        state[k] = state[k][perm]
    state["c2.weight"] = state["c2.weight"][:, perm]
    moved = torch.func.functional_call(members[0], state, (x,))
    assert rel_err(moved, model_out(members[0], x)) > 1e-3

    # NT at sparsity 0: mean over members of their own head on the averaged front
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    front = _eca_member(0)
    front.load_state_dict(fusion.fuse(members, "avg", example_inputs=x).state_dict())
    with torch.no_grad():
        expected = torch.stack([m.head(front.front(x)) for m in members]).mean(0)
    assert rel_err(model_out(wide, x), expected) < 1e-5
    assert (
        rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) > 1e-3
    )  # the hybrid is not the ensemble
    # two copies of one member give that member
    twin = fusion.fuse([members[0], members[0]], "nt", example_inputs=x, sparsity=0.0)
    assert rel_err(model_out(twin, x), model_out(members[0], x)) < 1e-6

    for method in ("nt", "avg", "ot", "weight_matching"):
        model = fusion.fuse(members, method, example_inputs=x)
        prov = fusion.provenance_of(model)
        assert prov.pinned == (() if method == "avg" else (pinned,)), method  # what experiments log
        fused = model.state_dict()
        for k in ("c1.weight", "bn1.weight", "eca.conv.weight"):
            mean = (members[0].state_dict()[k] + members[1].state_dict()[k]) / 2
            assert torch.allclose(fused[k], mean, atol=1e-6), (method, k)
        fresh = _EcaNet().eval()
        fresh.load_state_dict(fused, strict=True)
        assert torch.isfinite(fresh(x)).all()


def test_eca_resnets_fuse_with_their_residual_streams_pinned():
    """timm's ECA-ResNet: every stage's residual stream is read by an ECA gate, so the four streams are pinned
    (by name) and the bottlenecks' inner channels still fuse; NT at sparsity 0 of two copies of a member is that
    member."""
    import timm

    model = timm.create_model("ecaresnet26t", num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    graph = fusion.channel_groups(model, x)
    assert len(graph.pinned) == 4
    assert all(re.search(r"mixed with each other at 'layer\d\.\d\.se\.conv'", p) for p in graph.pinned)
    assert len(graph.groups) >= 8
    twin = fusion.fuse([model, model], "nt", example_inputs=x, sparsity=0.0)
    assert rel_err(model_out(twin, x), model_out(model, x)) < 1e-5


class _CachedBias(nn.Module):
    """A layer that caches a tensor computed from its parameter (timm LeViT / EfficientFormer attention
    biases): after a forward with autograd the cache holds a non-leaf tensor, which deepcopy refuses."""

    def __init__(self, n: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(n))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        if "b" not in self.cache:
            self.cache["b"] = self.bias * 2
        return x + self.cache["b"]


def test_a_model_with_a_tensor_cache_fuses_and_the_fused_model_does_not_reuse_it():
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(4, 6), _CachedBias(6), nn.ReLU(), nn.Linear(6, 3)).eval()
        m(torch.randn(2, 4))  # with autograd: the cache holds a non-leaf tensor (deepcopy would raise)
        members.append(m)
    x = torch.randn(3, 4)
    fused = fusion.fuse(members, "avg", example_inputs=x)
    assert fused[1].cache == {} or not torch.equal(fused[1].cache["b"], members[0][1].cache["b"])
    expected = nn.Sequential(nn.Linear(4, 6), _CachedBias(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    expected.load_state_dict(fused.state_dict())
    assert rel_err(model_out(fused, x), model_out(expected, x)) < 1e-6


def test_a_group_that_explodes_through_reshapes_is_refused_by_name(monkeypatch):
    """botnet26t_256 / coatnet: torch-pruning maps the channels of an attention's qkv through reshapes of
    spatial positions as if they were channels, and the group reaches millions of indices (minutes, then
    the time limit). A budget on the indices one group may reach turns that into a named refusal; here
    the budget is lowered so that an ordinary model trips it."""
    import fusion.trace as trace

    monkeypatch.setattr(trace, "_MAX_INDICES", 10)
    model = make_fusion_member("mlp", 0)
    with pytest.raises(fusion.FusionError, match=r"reaches over 10 channel indices"):
        trace._trace(model, fusion_example_input("mlp"), None)
