"""Attention layouts the tracer reads from the layers and the reshapes after them, on timm's own modules with tiny
dimensions: LeViT's attentions (head-major q/k/v behind Linear + BatchNorm wrappers, also a q plus a head-major
kv), VOLO's outlook attention (attention weights made per head by a Linear) and attentions with no ``proj``
whose output is their heads' values (BoTNet's BottleneckAttn, HaloNet's HaloAttn).

Oracles: a random permutation of every group keeps the function; NT at sparsity 0 of two members is their
ensemble (where the members share a table read by every head, only once it is equal in both; otherwise two
copies of one member give that member); the fused model follows its head count and loads strictly into a fresh
one; and a deliberately wrong trace is refused by the float64 self-check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import model_out, permuted_keeps_function, rel_err

import fusion
from fusion.groups import ChannelGraph, ChannelGroup, Slot
from fusion.verify import verify_permutation_invariance


def _members(make, n: int = 2) -> list[nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = make().eval()
        with torch.no_grad():  # no parameter or norm statistic left at a constant init
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
            for b in m.modules():
                if isinstance(b, nn.modules.batchnorm._BatchNorm):
                    b.running_mean.normal_(0, 0.1)
                    b.running_var.uniform_(0.5, 1.5)
        out.append(m)
    return out


def _head_group(graph) -> ChannelGroup:
    (heads,) = [g for g in graph.groups if g.unit_kind == "head"]
    return heads


def _ensemble_err(fused, members, x) -> float:
    return rel_err(model_out(fused, x), sum(model_out(m, x) for m in members) / len(members))


def _replace_slots(graph, change) -> ChannelGraph:
    """``graph`` with every slot passed through ``change`` (a slot, or None to drop it): a deliberately wrong trace."""
    groups = [
        ChannelGroup(g.name, g.n_units, [c for s in g.slots if (c := change(s)) is not None], g.unit_kind)
        for g in graph.groups
    ]
    return ChannelGraph(groups=groups, output_layers=graph.output_layers, shapes=graph.shapes)


def _refused(model, broken, x) -> None:
    with pytest.raises(fusion.FusionError, match="not traced completely"):
        verify_permutation_invariance(model, broken, x)


# ---------------------------------------------------------------------------- LeViT
class LeViTNet(nn.Module):
    """tokens of a 4x4 map -> embed -> timm's LeViT ``Attention`` (qkv and proj are ``LinearNorm``: a Linear and
    a BatchNorm; heads of q, k and v together) + skip, or ``AttentionDownsample`` (a subsampled ``q`` and a
    head-major ``kv``) -> classifier."""

    def __init__(self, downsample: bool = False):
        super().__init__()
        from timm.models.levit import Attention, AttentionDownsample

        self.downsample = downsample
        self.embed = nn.Linear(8, 16)
        if downsample:
            self.attn = AttentionDownsample(
                16, 12, key_dim=4, num_heads=2, attn_ratio=2, stride=2, resolution=4
            )
        else:
            self.attn = Attention(16, key_dim=4, num_heads=2, attn_ratio=2, resolution=4)
        self.fc = nn.Linear(12 if downsample else 16, 5)

    def forward(self, x):
        x = self.embed(x)
        x = self.attn(x) if self.downsample else x + self.attn(x)
        return self.fc(x.mean(1))


@pytest.mark.parametrize("downsample", [False, True])
def test_levit_attention_behind_linear_norms_moves_whole_heads(downsample):
    x = torch.randn(2, 16, 8)
    members = _members(lambda: LeViTNet(downsample))
    graph = fusion.channel_groups(members[0], x)
    heads = _head_group(graph)
    rows = "attn.kv" if downsample else "attn.qkv"
    width = 4 + 8 if downsample else 4 + 4 + 8  # each head's rows together (k and v, or q, k and v)
    tensors = {(s.tensor, s.dim): s for s in heads.slots}
    assert heads.n_units == 2
    assert tensors[(f"{rows}.linear.weight", 0)].positions[1, :, 0].tolist() == list(range(width, 2 * width))
    assert {
        (f"{rows}.bn.running_var", 0),
        ("attn.proj.ln.linear.weight", 1),
        ("attn.attention_biases", 0),
    } <= set(tensors)
    if downsample:
        assert tensors[("attn.q.ln.linear.weight", 0)].positions.shape == (2, 4, 1)
    permuted_keeps_function(lambda: LeViTNet(downsample), members[0], graph, x)
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)  # BatchNorms keep channels apart
    assert wide.attn.num_heads == 4 and wide.attn.val_attn_dim == 4 * 8
    assert _ensemble_err(wide, members, x) < 1e-5
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = LeViTNet(downsample)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
    # the norm over the rows left in place: its channels do not follow the heads
    _refused(members[0], _replace_slots(graph, lambda s: None if s.tensor == f"{rows}.bn.weight" else s), x)


# ---------------------------------------------------------------------------- EfficientFormerV2
class ConvNormAttnNet(nn.Module):
    """stem -> timm's EfficientFormerV2 ``Attention2d`` (q, k, v and proj are ``ConvNorm``: a 1x1 conv and a
    BatchNorm; v also read by a depthwise ``v_local`` added to the heads' output; talking heads) or
    ``Attention2dDownsample`` (its q a ``LocalGlobalQuery``: a depthwise conv and a pooling, then ``proj``) ->
    classifier."""

    def __init__(self, downsample: bool = False):
        super().__init__()
        from timm.models.efficientformer_v2 import Attention2d, Attention2dDownsample

        self.stem = nn.Conv2d(3, 8, 1)
        if downsample:
            self.attn = Attention2dDownsample(
                8, key_dim=4, num_heads=2, attn_ratio=2, resolution=4, out_dim=12
            )
        else:
            self.attn = Attention2d(8, key_dim=4, num_heads=2, attn_ratio=2, resolution=4)
        self.fc = nn.Linear(12 if downsample else 8, 5)

    def forward(self, x):
        return self.fc(self.attn(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("downsample", [False, True])
def test_conv_norm_attention_with_local_values_moves_whole_heads(downsample):
    x = torch.randn(2, 3, 4, 4)
    members = _members(lambda: ConvNormAttnNet(downsample))
    graph = fusion.channel_groups(members[0], x)
    heads = _head_group(graph)
    tensors = {(s.tensor, s.dim): s for s in heads.slots}
    q = "attn.q.proj.conv" if downsample else "attn.q.conv"
    assert heads.n_units == 2
    assert tensors[(f"{q}.weight", 0)].positions[1, :, 0].tolist() == [4, 5, 6, 7]
    # v_local's channels are v's rows
    assert (
        tensors[("attn.v_local.conv.weight", 0)].positions.tolist()
        == tensors[("attn.v.conv.weight", 0)].positions.tolist()
    )
    assert {
        ("attn.v_local.bn.running_var", 0),
        ("attn.proj.conv.weight", 1),
        ("attn.attention_biases", 0),
    } <= set(tensors)
    permuted_keeps_function(lambda: ConvNormAttnNet(downsample), members[0], graph, x)
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert wide.attn.num_heads == 4 and wide.attn.dh == 4 * 8
    assert _ensemble_err(wide, members, x) < 1e-5
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = ConvNormAttnNet(downsample)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
    # the depthwise convolution over v left in place: its channels would not follow v's
    _refused(
        members[0],
        _replace_slots(graph, lambda s: None if s.tensor.startswith("attn.v_local.conv") else s),
        x,
    )


# ---------------------------------------------------------------------------- VOLO's outlook attention
class OutlookNet(nn.Module):
    """a 4x4 channels-last map -> embed -> timm's VOLO ``OutlookAttention`` (v and proj Linears, the attention
    weights of every position made by a Linear ``attn`` of ``heads * k^4`` rows, head first) + skip ->
    classifier."""

    def __init__(self):
        super().__init__()
        from timm.models.volo import OutlookAttention

        self.embed = nn.Linear(3, 8)
        self.attn = OutlookAttention(8, num_heads=2, kernel_size=3, padding=1, stride=2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.embed(x)
        return self.fc((x + self.attn(x)).mean((1, 2)))


def test_outlook_attention_weights_move_with_the_heads():
    x = torch.randn(2, 4, 4, 3)
    members = _members(OutlookNet)
    graph = fusion.channel_groups(members[0], x)
    heads = _head_group(graph)
    tensors = {(s.tensor, s.dim): s for s in heads.slots}
    assert heads.n_units == 2
    assert tensors[("attn.attn.weight", 0)].positions[1, :, 0].tolist() == list(range(81, 162))
    assert {("attn.attn.bias", 0), ("attn.v.weight", 0), ("attn.proj.weight", 1)} <= set(tensors)
    permuted_keeps_function(OutlookNet, members[0], graph, x)
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert wide.attn.num_heads == 4 and wide.attn.attn.out_features == 4 * 81
    assert _ensemble_err(wide, members, x) < 1e-5
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = OutlookNet()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
    # the attention weights left in place: a head would read another head's weights
    _refused(members[0], _replace_slots(graph, lambda s: None if s.tensor.startswith("attn.attn.") else s), x)


# ---------------------------------------------------------------------------- output = the heads' values
class OutputHeadsNet(nn.Module):
    """stem -> 1x1 conv + BatchNorm -> timm's ``BottleneckAttn`` (one ``qkv`` conv: q, k and v blocks) or
    ``HaloAttn`` (``q`` and ``kv`` convs, each head's k and v together), 2 heads of 3 q/k and 4 v channels, no
    ``proj``: its output channel h * 4 + j is head h's -> BatchNorm -> 1x1 conv -> classifier (BoTNet's and
    HaloNet's bottleneck blocks)."""

    def __init__(self, kind: str = "bottleneck"):
        super().__init__()
        from timm.layers.bottleneck_attn import BottleneckAttn
        from timm.layers.halo_attn import HaloAttn

        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv1 = nn.Conv2d(6, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        if kind == "bottleneck":
            self.attn = BottleneckAttn(8, 8, feat_size=(4, 4), num_heads=2, dim_head=3, qkv_bias=True)
        else:
            self.attn = HaloAttn(8, 8, feat_size=(8, 8), num_heads=2, dim_head=3, block_size=4, halo_size=1)
        self.post_attn = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 10, 1)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        x = self.attn(self.bn1(self.conv1(self.stem(x))))
        return self.fc(self.conv3(torch.relu(self.post_attn(x))).mean((2, 3)))


@pytest.mark.parametrize("kind,size", [("bottleneck", 4), ("halo", 8)])
def test_attention_whose_output_is_its_heads_values(kind, size):
    x = torch.randn(2, 3, size, size)
    members = _members(lambda: OutputHeadsNet(kind))
    graph = fusion.channel_groups(members[0], x)
    heads = _head_group(graph)
    tensors = {(s.tensor, s.dim): s for s in heads.slots}
    assert heads.n_units == 2
    # the output's channels, read after the attention, are the heads' values
    assert tensors[("conv3.weight", 1)].positions[1, :, 0].tolist() == [4, 5, 6, 7]
    assert ("post_attn.running_mean", 0) in tensors
    if kind == "bottleneck":  # q, k and v blocks of 6, 6 and 8 rows: head 1's rows in each
        assert tensors[("attn.qkv.weight", 0)].positions[1].T.tolist() == [
            [3, 4, 5, -1],
            [9, 10, 11, -1],
            [16, 17, 18, 19],
        ]
    else:  # k and v of a head together
        assert tensors[("attn.kv.weight", 0)].positions[1, :, 0].tolist() == list(range(7, 14))
    # the relative-position tables [positions, dim_head_qk] are read by every head: in no group
    assert not any(s.tensor.startswith("attn.pos_embed") for g in graph.groups for s in g.slots)
    permuted_keeps_function(lambda: OutputHeadsNet(kind), members[0], graph, x)
    twin = fusion.fuse([members[0], members[0]], "nt", example_inputs=x, sparsity=0.0)
    assert twin.attn.num_heads == 4 and twin.attn.dim_out_qk == 12 and twin.attn.dim_out_v == 16
    assert rel_err(model_out(twin, x), model_out(members[0], x)) < 1e-5
    members[1].attn.pos_embed.load_state_dict(members[0].attn.pos_embed.state_dict())  # one shared table
    assert _ensemble_err(fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0), members, x) < 1e-5
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = OutputHeadsNet(kind)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
    # the readers of the output left in place: they would read other heads' values
    _refused(members[0], _replace_slots(graph, lambda s: None if s.tensor == "conv3.weight" else s), x)
    if kind == "bottleneck":  # the head-major layout of the qkv rows on this role-first module
        major = torch.arange(2 * 10).reshape(2, 10, 1)
        _refused(
            members[0],
            _replace_slots(
                graph,
                lambda s: (
                    Slot(s.tensor, s.dim, s.role, s.kind, s.is_weight, s.layer, major)
                    if (s.layer, s.dim) == ("attn.qkv", 0)
                    else s
                ),
            ),
            x,
        )


# ---------------------------------------------------------------------------- queries from outside (GCViT)
class GlobalQueryNet(nn.Module):
    """stem -> timm's GCViT stage (its second block's ``WindowAttentionGlobal`` makes only k and v: its queries
    are the stage's global query, made from the stage's input by a convolution block with a shortcut, then a
    LayerNorm) -> classifier. Blocks normalize channels last, as in ``GlobalContextVit``."""

    def __init__(self):
        super().__init__()
        from timm.models.gcvit import GlobalContextVitStage

        self.stem = nn.Conv2d(3, 16, 1)
        self.stage = GlobalContextVitStage(
            16, 2, 2, feat_size=(8, 8), window_size=(4, 4), downsample=False, global_norm=True,
            norm_layer_cl=nn.LayerNorm,
        )  # fmt: skip
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.stage(self.stem(x)).mean((2, 3)))


def test_queries_from_outside_make_their_stream_move_by_heads():
    x = torch.randn(2, 3, 8, 8)
    members = _members(GlobalQueryNet)
    graph = fusion.channel_groups(members[0], x)
    (stream,) = [g for g in graph.groups if g.unit_kind == "head" and "stage.blocks.1.attn.qkv" in g.layers]
    tensors = {(s.tensor, s.dim): s for s in stream.slots}
    assert stream.n_units == 2  # the residual stream of the stage, head by head: its channel h * 8 + j
    assert tensors[("stem.weight", 0)].positions[1, :, 0].tolist() == list(range(8, 16))
    assert tensors[("stage.blocks.1.attn.qkv.weight", 0)].positions[1].T.tolist() == [
        list(range(8, 16)),
        list(range(24, 32)),
    ]  # its k and v rows of head 1
    assert {
        ("stage.global_norm.weight", 0),
        ("stage.blocks.1.attn.rel_pos.relative_position_bias_table", 1),
    } <= set(tensors)
    permuted_keeps_function(GlobalQueryNet, members[0], graph, x)
    twin = fusion.fuse([members[0], members[0]], "nt", example_inputs=x, sparsity=0.0)  # LayerNorms: the twin
    assert twin.stage.blocks[1].attn.num_heads == 4
    assert rel_err(model_out(twin, x), model_out(members[0], x)) < 1e-5
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = GlobalQueryNet()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
    # the layer making the global query, or the global attention's per-head table, left in place
    query = ("stage.global_block.blocks.conv1.conv_pw.weight", 0)
    _refused(members[0], _replace_slots(graph, lambda s: None if (s.tensor, s.dim) == query else s), x)
    table = "stage.blocks.1.attn.rel_pos.relative_position_bias_table"
    _refused(members[0], _replace_slots(graph, lambda s: None if s.tensor == table else s), x)


def test_a_tensor_between_two_members_only_is_zero():
    """Rows from one group, columns from another: where NT keeps only member 0's units of the first and only
    member 1's of the second (few units per group: a stream moving by heads), every entry lies between the two
    members and is zero in their concatenation."""
    graph = ChannelGraph(
        groups=[
            ChannelGroup(
                "a", 2, [Slot("w", 0, "out", "linear", True, "w", torch.arange(2).reshape(2, 1, 1))]
            ),
            ChannelGroup("b", 3, [Slot("w", 1, "in", "linear", True, "w", torch.arange(3).reshape(3, 1, 1))]),
        ],
        output_layers=[],
        shapes={"w": (2, 3)},
    )
    states = [{"w": torch.randn(2, 3)}, {"w": torch.randn(2, 3)}]
    selection = [(torch.tensor([0]), torch.tensor([1])), (torch.tensor([1, 1]), torch.tensor([0, 2]))]
    assert torch.equal(graph.assemble(states, selection)["w"], torch.zeros(1, 2))
