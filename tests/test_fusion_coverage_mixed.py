"""Coverage of the tracer, issue 13 (the "mixed with each other" half), and the self-check it relies on.

* the permutation self-check runs in float64 at a 1e-9 relative tolerance: a coupling the tracer misses is
  refused even when its effect on the outputs is far below float32's 1e-4 (and a model that cannot run in
  float64 is still checked, in its own precision, with the reason recorded);
* layer classes the tracer now supports are checked with the oracles of the walk: the self-check passes, a
  random permutation of every group keeps the outputs, NT at sparsity 0 is the ensemble where no norm mixes
  channels, and the default NT loads strictly into a fresh model and runs.

Models are small, hand-built ones (the timm families they stand for are walked by ``fusebench zoo``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import model_out, rel_err

import fusion
from fusion.state import full_state
from fusion.trace import _trace
from fusion.verify import verify_permutation_invariance


# ---------------------------------------------------------------------------- the float64 self-check
class RollGate(nn.Module):
    """A squeeze-excite-like gate that reads the *neighbouring* channel's mean (``roll`` over channels):
    a cross-channel coupling that torch-pruning maps as element-wise, so the tracer misses it. ``eps``
    scales its effect."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x * (1 + self.eps * torch.roll(x.mean((2, 3), keepdim=True), 1, dims=1))


class GatedNet(nn.Module):
    def __init__(self, eps: float, cast: bool = False):
        super().__init__()
        self.c1, self.bn, self.gate = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), RollGate(eps)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)
        self.cast = cast

    def forward(self, x):
        if self.cast:  # a model that computes in float32 whatever its input (it cannot be checked in float64)
            x = x.float()
        x = self.gate(torch.relu(self.bn(self.c1(x))))
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


def _gated(eps: float, cast: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = GatedNet(eps, cast).eval()
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
    return model


def test_self_check_refuses_a_small_missed_coupling():
    x = torch.randn(2, 3, 16, 16)
    model = _gated(1e-6)
    graph = _trace(model, x, None)
    # the missed coupling is real but tiny: the old float32 check at 1e-4 would have let it through
    permuted = torch.func.functional_call(
        model,
        graph.assemble([full_state(model)], graph.random_permutation(torch.Generator().manual_seed(0))),
        (x,),
    )
    err = rel_err(permuted.detach(), model_out(model, x))
    assert 1e-9 < err < 1e-4
    with pytest.raises(fusion.FusionError, match=r"rooted at 'c1'.*not traced completely"):
        verify_permutation_invariance(model, graph, x)


def test_self_check_passes_a_correct_trace_in_float64():
    x = torch.randn(2, 3, 16, 16)
    model = _gated(0.0)  # no coupling: every permutation is a symmetry
    graph = _trace(model, x, None)
    verify_permutation_invariance(model, graph, x)
    assert graph.check_precision == "float64"
    # the member is untouched (the check casts copies)
    assert all(t.dtype == torch.float32 for t in full_state(model).values() if t.is_floating_point())


def test_self_check_falls_back_to_model_precision_with_a_reason():
    x = torch.randn(2, 3, 16, 16)
    graph = _trace(_gated(0.0, cast=True), x, None)
    verify_permutation_invariance(_gated(0.0, cast=True), graph, x)
    assert graph.check_precision.startswith("model precision") and "float64" in graph.check_precision
    # in float32 a large missed coupling is still refused
    with pytest.raises(fusion.FusionError, match="not traced completely"):
        verify_permutation_invariance(_gated(1.0, cast=True), graph, x)


class TanhRollGate(nn.Module):
    """A gate on (B, C) features that reads the neighbouring channel (``roll``): a missed coupling."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x * (1 + self.eps * torch.tanh(torch.roll(x, 1, dims=1)))


class Cancelling(nn.Module):
    """A badly conditioned MLP, like a deep random net whose activations grow: hidden units of about 1e6
    come in equal pairs that the output layer subtracts, leaving about 1e-7 of them. Reassociating its
    sums moves the output by far more than 1e-9 of its scale, even in float64 (``delta``: how closely the
    pairs cancel)."""

    def __init__(self, eps: float, delta: float = 1e-7):
        super().__init__()
        self.fc1, self.gate, self.fc2 = (
            nn.Linear(8, 64, bias=False),
            TanhRollGate(eps),
            nn.Linear(64, 3, bias=False),
        )
        with torch.no_grad():
            self.fc1.weight.mul_(1e6)
            self.fc1.weight[32:] = self.fc1.weight[:32]
            self.fc2.weight[:, 32:] = -self.fc2.weight[:, :32] * (1 + delta * torch.rand(3, 32))

    def forward(self, x):
        return self.fc2(self.gate(torch.relu(self.fc1(x))))


def test_self_check_tolerance_follows_measured_rounding_noise():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = Cancelling(0.0).eval()
    graph = _trace(model, x, None)
    state64 = {k: v.double() for k, v in full_state(model).items()}
    ref = torch.func.functional_call(model, state64, (x.double(),))
    perm = graph.assemble(
        [full_state(model)], graph.random_permutation(torch.Generator().manual_seed(0)), dtype=torch.float64
    )
    err = rel_err(torch.func.functional_call(model, perm, (x.double(),)).detach(), ref.detach())
    assert err > 1e-9  # a fixed float64 tolerance of 1e-9 would refuse this correct trace
    verify_permutation_invariance(model, graph, x)
    assert graph.check_precision.startswith("float64, tolerance")
    # the noise-scaled tolerance still refuses a real missed coupling on the same badly conditioned model
    coupled = Cancelling(1e-6).eval()
    coupled.load_state_dict(model.state_dict())
    with pytest.raises(fusion.FusionError, match=r"rooted at 'fc1'.*not traced completely"):
        verify_permutation_invariance(coupled, _trace(coupled, x, None), x)
    # where the outputs are rounding noise even in float64's view, nothing can be verified: refused by name
    noise = Cancelling(0.0, delta=1e-9).eval()  # the pairs cancel exactly in float32
    with pytest.raises(fusion.FusionError, match="rounding noise"):
        verify_permutation_invariance(noise, _trace(noise, x, None), x)


class ZeroInitBranch(nn.Module):
    """A residual block whose last BatchNorm scale starts at zero (timm's zero_init_last): the branch adds
    nothing, so a coupling missed inside it (the roll gate) cannot show at these weights."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.gate = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Conv2d(8, 8, 3, padding=1),
            RollGate(1.0),
        )
        self.b, self.bn, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 5)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.bn(self.b(self.gate(torch.relu(self.a(x)))))
        return self.fc(x.mean((2, 3)))


def test_self_check_runs_zero_initialised_branches_at_live_weights(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = ZeroInitBranch().eval()
    graph = _trace(model, x, None)
    with pytest.raises(fusion.FusionError, match=r"rooted at 'a'.*not traced completely"):
        verify_permutation_invariance(model, graph, x)
    assert not model.bn.weight.any()  # the member itself is untouched
    # at the model's own weights the missed coupling is invisible: the old check passed it
    monkeypatch.setattr(fusion.verify, "live_parameters", lambda model, state, generator: state)
    verify_permutation_invariance(model, graph, x)


# ---------------------------------------------------------------------------- GroupNorm
class GNNet(nn.Module):
    """conv -> GroupNorm(g1) -> conv -> GroupNorm(g2) -> 1x1 conv + skip -> classifier."""

    def __init__(self, g1: int, g2: int, affine: bool = True):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(g1, 16)
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(g2, 16, affine=affine)
        self.c3, self.fc = nn.Conv2d(16, 16, 1), nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.n1(self.c1(x)))
        x = torch.relu(self.c3(self.n2(self.c2(x))) + x)
        return self.fc(x.mean((2, 3)))


def _gn_member(seed: int, g1: int, g2: int) -> nn.Module:
    torch.manual_seed(seed)
    model = GNNet(g1, g2).eval()
    with torch.no_grad():  # per-channel affine parameters that differ between channels and members
        for name, p in model.named_parameters():
            if name.startswith("n"):
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("g1, g2", [(1, 1), (4, 2), (1, 4)])
def test_group_norm_is_traced_and_fused(g1, g2):
    x = torch.randn(2, 3, 16, 16)
    members = [_gn_member(seed, g1, g2) for seed in range(2)]
    graph = fusion.channel_groups(members[0], x)  # the float64 self-check passes
    assert graph.check_precision == "float64"
    # a random permutation of every group keeps the function (checked here directly too)
    state = graph.assemble(
        [full_state(members[0])], graph.random_permutation(torch.Generator().manual_seed(1))
    )
    permuted = GNNet(g1, g2)
    permuted.load_state_dict(state, strict=True)
    assert rel_err(model_out(permuted, x), model_out(members[0], x)) < 1e-5
    # G > 1: groups move as whole blocks (units of 16 / G channels)
    n2 = next(g for g in graph.groups if "n2" in g.layers)
    assert n2.n_units == (16 if g2 == 1 else g2)
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = GNNet(g1, g2)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert fresh.eval()(x).shape == (2, 5) and fused.n2.num_groups == g2
    if g1 > 1 and g2 > 1:
        # with every GroupNorm over blocks, the concatenation keeps each member's blocks and their statistics:
        # NT at sparsity 0 is exactly the ensemble (with one group the statistics mix the members, by design)
        wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
        assert wide.n1.num_groups == 2 * g1 and wide.n2.num_groups == 2 * g2
        assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-5


def test_group_norm_over_blocks_without_affine_is_refused():
    x = torch.randn(2, 3, 16, 16)
    model = GNNet(1, 4, affine=False).eval()
    with pytest.raises(fusion.FusionError, match=r"GroupNorm 'n2' has 4 groups and no affine"):
        fusion.channel_groups(model, x)


# ---------------------------------------------------------------------------- attention layouts
def _attention(kind: str, dim: int, heads: int) -> nn.Module:
    from timm.models import pvt_v2, swin_transformer, xcit

    if kind == "swin":  # fused qkv, no head_dim attribute, a relative position bias table [positions, heads]
        return swin_transformer.WindowAttention(dim, heads, window_size=4)
    if kind == "xca":  # attention across the channels of a head, a temperature per head
        return xcit.XCA(dim, heads, qkv_bias=True)
    if kind == "pvt":  # q and kv Linears
        return pvt_v2.Attention(dim, heads)
    if (
        kind == "swinv2"
    ):  # a per-head logit scale and a position-bias MLP whose last layer makes one row per head
        from timm.models import swin_transformer_v2_cr

        return swin_transformer_v2_cr.WindowMultiHeadAttention(dim, heads, (4, 4), meta_hidden_dim=12)
    if kind == "conv":  # qkv and proj as 1x1 convolutions (Visformer)
        from timm.models import visformer

        return visformer.Attention(dim, heads)
    if kind == "cross":  # wq, wk and wv Linears, q from the class token only (CrossViT)
        from timm.models import crossvit

        return crossvit.CrossAttention(dim, heads, qkv_bias=True)
    if kind == "qk_v":  # qk and v Linears (TNT)
        from timm.models import tnt

        return tnt.Attention(dim, dim, heads, qkv_bias=True)
    return xcit.ClassAttn(dim, heads, qkv_bias=True)  # q, k and v Linears


class AttnNet(nn.Module):
    """tokens -> embed -> attention (+ skip) -> mean over tokens -> classifier (no norm across channels)."""

    def __init__(self, kind: str, dim: int = 16, heads: int = 4):
        super().__init__()
        self.kind = kind
        self.embed, self.attn, self.fc = nn.Linear(8, dim), _attention(kind, dim, heads), nn.Linear(dim, 5)

    def forward(self, x):
        x = self.embed(x)
        if self.kind == "pvt":
            y = self.attn(x, (4, 4))
        elif self.kind in ("cls", "cross"):
            y = torch.cat([self.attn(x), x[:, 1:]], dim=1)
        elif self.kind == "conv":  # tokens as a 4x4 map
            y = self.attn(x.transpose(1, 2).reshape(x.shape[0], -1, 4, 4)).flatten(2).transpose(1, 2)
        else:
            y = self.attn(x)
        return self.fc((x + y).mean(1))


def _attn_member(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = AttnNet(kind).eval()
    with torch.no_grad():  # per-head parameters that differ between heads (fresh ones are constant or tiny)
        for name, p in model.named_parameters():
            if name.endswith(
                ("relative_position_bias_table", "temperature", "logit_scale", "meta_mlp.fc2.bias")
            ):
                p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", ["swin", "xca", "pvt", "cls", "conv", "swinv2", "cross", "qk_v"])
def test_attention_layouts_move_whole_heads(kind):
    x = torch.randn(2, 16, 8)
    members = [_attn_member(kind, seed) for seed in range(2)]
    graph = fusion.channel_groups(members[0], x)  # the float64 self-check passes
    heads = [g for g in graph.groups if g.unit_kind == "head"]
    assert len(heads) == 1 and heads[0].n_units == 4
    per_head = {s.tensor for s in heads[0].slots if s.kind == "param"}
    assert per_head == {
        "swin": {"attn.relative_position_bias_table"},
        "xca": {"attn.temperature"},
        "swinv2": {"attn.logit_scale", "attn.meta_mlp.fc2.weight", "attn.meta_mlp.fc2.bias"},
    }.get(kind, set())
    # NT at sparsity 0 is the ensemble: 8 heads, each as wide as before
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert wide.attn.num_heads == 8
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-5
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = AttnNet(kind)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert fused.attn.num_heads == 4 and fresh.eval()(x).shape == (2, 5)


def test_attention_heads_are_units_not_channels():
    """Moving single q/k/v channels across heads changes the function: the self-check must see it."""
    x = torch.randn(2, 16, 8)
    model = _attn_member("swin", 0)
    graph = fusion.channel_groups(model, x)
    gi = next(i for i, g in enumerate(graph.groups) if g.unit_kind == "head")
    g = graph.groups[gi]
    # split heads into channels: each channel its own unit (what torch-pruning's grouping would allow)
    from fusion.groups import ChannelGraph, ChannelGroup, Slot

    chans = []
    for s in g.slots:
        if s.kind == "param":
            continue
        pos = s.positions.reshape(-1, 1, s.positions.shape[2])
        chans.append(Slot(s.tensor, s.dim, s.role, s.kind, s.is_weight, s.layer, pos))
    broken = ChannelGraph(
        groups=[*graph.groups[:gi], ChannelGroup(g.name, 16, chans), *graph.groups[gi + 1 :]],
        output_layers=graph.output_layers,
        shapes=graph.shapes,
    )
    with pytest.raises(fusion.FusionError, match="not traced completely"):
        verify_permutation_invariance(model, broken, x)


# ---------------------------------------------------------------------------- element-wise pairs (gated MLPs)
class GluNet(nn.Module):
    """embed -> timm GluMlp (fc1 -> chunk(2) -> a * sigmoid(b) -> fc2) + skip -> classifier."""

    def __init__(self):
        super().__init__()
        from timm.layers import GluMlp

        self.embed, self.mlp, self.fc = nn.Linear(8, 12), GluMlp(12, 32), nn.Linear(12, 5)

    def forward(self, x):
        x = self.embed(x)
        return self.fc(x + self.mlp(x))


def test_gated_mlp_halves_move_as_pairs():
    x = torch.randn(2, 6, 8)
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(GluNet().eval())
    graph = fusion.channel_groups(members[0], x)  # the float64 self-check passes
    pairs = [g for g in graph.groups if g.unit_kind == "coupled channels"]
    assert len(pairs) == 1 and pairs[0].n_units == 16
    fc1 = next(s for s in pairs[0].slots if s.tensor == "mlp.fc1.weight")
    assert fc1.positions[3].tolist() == [[3, 19]]  # channel 3 of the first half with channel 3 of the second
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-5
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = GluNet()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert fresh.eval()(x).shape == (2, 6, 5)


def test_coupled_units_only_over_equal_parts():
    """fc1 (4 rows) -> split into fixed parts g = rows 0-1, i = row 2, c = row 3 -> g * cat(i, c * scale): the
    pairs (0, 2) and (1, 3) meet, but only the second reaches ``scale``. Selecting pairs would change the parts'
    sizes, so the group is refused. (torch-pruning 1.6.1 maps such a split -> concat wrongly, which is refused
    earlier; the pairing is checked here on the slots it would get.) Meetings that are not k equal parts
    (neighbours, as ECA's convolution across channels makes) are no units at all: those channels are pinned."""
    from fusion.layers import OUT, SlotSpec
    from fusion.trace import _coupled_units, _equal_parts

    fc1 = SlotSpec("fc1.weight", 0, OUT, "linear", True)
    scale = SlotSpec("scale", 0, OUT, "param", True)
    slots = [
        (fc1, "fc1", torch.tensor([[0], [1], [2], [3]])),
        (scale, "scale", torch.tensor([[-1], [-1], [-1], [0]])),
    ]
    roots = _equal_parts(4, [(0, 2), (1, 3)])
    assert roots.tolist() == [[0, 2], [1, 3]]
    with pytest.raises(fusion.FusionError, match=r"'scale' is reached by some of the coupled units only"):
        _coupled_units("fc1", roots, slots)
    # uniform pairs are units of two channels along the repeat axis
    group = _coupled_units("fc1", roots, slots[:1])
    assert group.n_units == 2 and group.slots[0].positions.tolist() == [[[0, 2]], [[1, 3]]]
    assert _equal_parts(6, [(0, 2), (2, 4), (1, 3), (3, 5)]).tolist() == [[0, 2, 4], [1, 3, 5]]
    # neighbours, a chain, a lone pair, components of unequal sizes ({0, 1, 2} and {3}: edgenext crashed here),
    # everything in one unit
    for pairs in (
        [(0, 1), (2, 3)],
        [(0, 1), (1, 2), (2, 3)],
        [(0, 2)],
        [(0, 1), (1, 2)],
        [(0, 2), (1, 3), (0, 1)],
    ):
        assert _equal_parts(4, pairs) is None, pairs


def test_a_group_sharing_a_pinned_dimension_is_pinned_too():
    """Pinned channels stay in place in every dimension they occupy, so a group on one of those dimensions is
    pinned as well, and so on transitively; a group on other dimensions of the same tensors stays free."""
    from fusion.groups import ChannelGroup, slot_of
    from fusion.layers import IN, OUT, SlotSpec
    from fusion.trace import _pin_joined

    def raw(root, *dims):
        return (
            root,
            2,
            [(SlotSpec(t, d, OUT, "linear", True), t, torch.tensor([[0], [1]])) for t, d in dims],
            [],
            None,
        )

    pinned = [("mixed at 'eca'", {("c1.weight", 0), ("c2.weight", 1)})]
    a = raw("a", ("c1.weight", 0), ("x.weight", 0))  # shares c1 rows
    b = raw("b", ("x.weight", 1))  # x's columns: another dimension of a pinned tensor, free
    c = raw("c", ("x.weight", 0), ("y.weight", 0))  # shares x rows, joined through a
    free = raw("free", ("c2.weight", 0), ("fc.weight", 1))  # c2's rows, not its pinned columns
    paired = [
        ChannelGroup(
            "glu", 2, [slot_of(SlotSpec("y.weight", 1, IN, "linear", True), "y", torch.zeros(2, 1, 1))]
        )
    ]
    kept_raw, kept_paired, notes, dims = _pin_joined([a, b, c, free], paired, pinned)
    assert [g[0] for g in kept_raw] == ["b", "free"] and kept_paired == paired
    assert notes[0] == "mixed at 'eca'"
    assert {n.split("'")[1] for n in notes[1:]} == {"a", "c"}
    assert "('c1.weight', dimension 0)" in notes[1]
    assert ("y.weight", 0) in dims and ("x.weight", 1) not in dims


# ---------------------------------------------------------------------------- per-channel buffers and params
class BlurNet(nn.Module):
    """conv -> timm BlurPool2d (a fixed [C, 1, 3, 3] filter applied with groups=C, densenetblur / tresnet)
    -> conv -> classifier."""

    def __init__(self):
        super().__init__()
        from timm.layers import BlurPool2d

        self.c1, self.aa = nn.Conv2d(3, 8, 3, padding=1), BlurPool2d(8, filt_size=3, stride=2)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(self.aa(torch.relu(self.c1(x))))).mean((2, 3)))


def test_blur_pool_filter_follows_its_channels():
    x = torch.randn(2, 3, 16, 16)
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(BlurNet().eval())
    graph = fusion.channel_groups(members[0], x)
    c1 = next(g for g in graph.groups if "c1" in g.layers)
    assert "aa.filt" in {s.tensor for s in c1.slots}
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert wide.aa.channels == 16 and wide.aa.filt.shape == (16, 1, 3, 3)
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-5
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = BlurNet()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))


class StdConvNet(nn.Module):
    """timm ScaledStdConv2d (NFNet): a per-output-channel ``gain`` of shape [out, 1, 1, 1]."""

    def __init__(self):
        super().__init__()
        from timm.layers import ScaledStdConv2d

        self.c1, self.c2, self.fc = (
            ScaledStdConv2d(3, 8, 3, padding=1),
            ScaledStdConv2d(8, 8, 3, padding=1),
            nn.Linear(8, 5),
        )

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def test_scaled_std_conv_gain_is_per_output_channel():
    x = torch.randn(2, 3, 16, 16)
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        m = StdConvNet().eval()
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("gain"):
                    p.copy_(torch.rand_like(p) + 0.5)
        members.append(m)
    graph = fusion.channel_groups(members[0], x)  # a gain left in place would fail the float64 self-check
    c1 = next(g for g in graph.groups if "c1" in g.layers and "c2" in g.layers)
    assert "c1.gain" in {s.tensor for s in c1.slots}
    # weight standardization is over each output channel's inputs: a concatenation changes those statistics
    # (as LayerNorm does), so NT at sparsity 0 is not the ensemble; the fused models load and run
    assert fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0).c1.gain.shape == (16, 1, 1, 1)
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = StdConvNet()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
