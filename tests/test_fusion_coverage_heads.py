"""Coverage of the tracer: layers inside an attention read by what they do (talking heads, a spatial-reduction
convolution whose kernel is as large as the head count), and expands that are not grouped-query repeats.

Oracles as in ``test_fusion_coverage_mixed``: the float64 self-check passes, a random permutation of every group
keeps the outputs, NT at sparsity 0 is the ensemble where no norm mixes channels (else the concatenation of a
member with itself is the member), the default NT loads strictly into a fresh model, and a deliberately wrong
trace is refused by the self-check. Small hand-built models (timm's own attention classes where they exist).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from conftest import model_out, permuted_keeps_function, rel_err

import fusion
from fusion.groups import ChannelGraph, ChannelGroup, Slot
from fusion.verify import verify_permutation_invariance


def _members(cls, n: int = 2) -> list[nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = cls().eval()
        with torch.no_grad():  # no parameter left at a constant init (biases of 0 hide couplings)
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        out.append(m)
    return out


def _without_slot(graph, tensor: str, dim: int) -> ChannelGraph:
    """The graph with one slot dropped: a deliberately incomplete trace."""
    groups = [
        ChannelGroup(
            g.name, g.n_units, [s for s in g.slots if (s.tensor, s.dim) != (tensor, dim)], g.unit_kind
        )
        for g in graph.groups
    ]
    return ChannelGraph(groups=groups, output_layers=graph.output_layers, shapes=graph.shapes)


# ---------------------------------------------------------------------------- talking heads (CaiT)
class TalkingNet(nn.Module):
    """tokens -> embed -> timm's TalkingHeadAttn (Linears heads -> heads over the logits' head axis) + skip."""

    def __init__(self):
        super().__init__()
        from timm.models.cait import TalkingHeadAttn

        self.embed, self.attn, self.fc = (
            nn.Linear(8, 16),
            TalkingHeadAttn(16, 4, qkv_bias=True),
            nn.Linear(16, 5),
        )

    def forward(self, x):
        x = self.embed(x)
        return self.fc((x + self.attn(x)).mean(1))


def test_talking_heads_mix_heads_rows_and_columns():
    x = torch.randn(2, 6, 8)
    members = _members(TalkingNet)
    graph = fusion.channel_groups(members[0], x)  # the float64 self-check passes
    heads = next(g for g in graph.groups if g.unit_kind == "head")
    assert heads.n_units == 4
    per_head = {(s.tensor, s.dim) for s in heads.slots if s.kind == "param"}
    assert per_head == {
        (f"attn.{layer}.{t}", d)
        for layer in ("proj_l", "proj_w")
        for t, d in (("weight", 0), ("weight", 1), ("bias", 0))
    }
    permuted_keeps_function(TalkingNet, members[0], graph, x)
    # the heads of two members do not mix: the concatenation is the ensemble
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert wide.attn.num_heads == 8 and wide.attn.proj_l.weight.shape == (8, 8)
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-6
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = TalkingNet()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
    # permuting the heads on the rows of proj_l but not on its columns changes the function
    broken = _without_slot(graph, "attn.proj_l.weight", 1)
    try:
        verify_permutation_invariance(members[0], broken, x)
    except fusion.FusionError as exc:
        assert "not traced completely" in str(exc)
    else:
        raise AssertionError("a head permutation missing proj_l's columns was not caught")


# ---------------------------------------------------------------------------- spatial reduction (Twins)
class SubSampleNet(nn.Module):
    """tokens of a 4x4 map -> embed -> timm's GlobalSubSampleAttn with 4 heads and a 4x4 reduction convolution
    (its kernel dimensions are as large as the head count, and are not per head)."""

    def __init__(self):
        super().__init__()
        from timm.models.twins import GlobalSubSampleAttn

        self.embed, self.attn = nn.Linear(8, 16), GlobalSubSampleAttn(16, num_heads=4, sr_ratio=4)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        return self.fc((x + self.attn(x, (4, 4))).mean(1))


def test_reduction_convolution_in_attention_is_not_per_head():
    x = torch.randn(2, 16, 8)
    members = _members(SubSampleNet)
    graph = fusion.channel_groups(members[0], x)
    heads = next(g for g in graph.groups if g.unit_kind == "head")
    assert not any(s.tensor.startswith("attn.sr.") for s in heads.slots)
    stream = next(g for g in graph.groups if any(s.tensor == "embed.weight" for s in g.slots))
    assert ("attn.sr.weight", 1) in {(s.tensor, s.dim) for s in stream.slots}
    reduced = next(
        g for g in graph.groups if any((s.tensor, s.dim) == ("attn.sr.weight", 0) for s in g.slots)
    )
    assert reduced.unit_kind == "channel" and reduced.n_units == 16  # sr -> norm -> kv, its own channels
    permuted_keeps_function(SubSampleNet, members[0], graph, x)
    # a LayerNorm after the reduction normalizes across channels: the concatenation of a member with itself
    # is the member
    same = fusion.fuse([members[0], members[0]], "nt", example_inputs=x, sparsity=0.0)
    assert rel_err(model_out(same, x), model_out(members[0], x)) < 1e-5
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = SubSampleNet()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))


# ---------------------------------------------------------------------------- expands (GCViT's global query)
class RepeatNet(nn.Module):
    """A gate computed from the first example and ``repeat_interleave``d along the batch: an expand of a 5-D
    tensor that torch-pruning took for a grouped-query repeat of heads (a repeat of 0: a division by zero)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        g = self.c2(y[:1]).repeat_interleave(x.shape[0], dim=0)
        return self.fc((y * torch.sigmoid(g)).mean((2, 3)))


def test_expand_along_the_batch_keeps_channels():
    x = torch.randn(2, 3, 8, 8)
    members = _members(RepeatNet)
    graph = fusion.channel_groups(members[0], x)  # traced (no division by zero) and self-checked
    assert len(graph.groups) == 1 and set(graph.groups[0].layers) == {"c1", "c2", "fc"}
    permuted_keeps_function(RepeatNet, members[0], graph, x)
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-6
    try:  # c2's input columns left out of the group: caught
        verify_permutation_invariance(members[0], _without_slot(graph, "c2.weight", 1), x)
    except fusion.FusionError as exc:
        assert "not traced completely" in str(exc)
    else:
        raise AssertionError("an incomplete trace was not caught")


# ---------------------------------------------------------------------------- gated positional attention (ConViT)
class GpsaNet(nn.Module):
    """tokens of a 4x4 grid -> embed -> timm's GPSA (qk and v Linears, a positional Linear 3 -> heads and a gate
    per head) + skip -> classifier."""

    def __init__(self):
        super().__init__()
        from timm.models.convit import GPSA

        self.embed, self.attn = nn.Linear(8, 16), GPSA(16, num_heads=4, qkv_bias=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        return self.fc((x + self.attn(x)).mean(1))


def test_gated_positional_attention_moves_whole_heads():
    x = torch.randn(2, 16, 8)
    members = _members(GpsaNet)
    for m in members:
        model_out(m, x)  # GPSA sizes its relative indices at the first forward
    graph = fusion.channel_groups(members[0], x)
    heads = next(g for g in graph.groups if g.unit_kind == "head")
    assert heads.n_units == 4 and {"attn.qk", "attn.v", "attn.proj"} <= set(heads.layers)
    per_head = {(s.tensor, s.dim) for s in heads.slots if s.kind == "param"}
    assert per_head == {("attn.pos_proj.weight", 0), ("attn.pos_proj.bias", 0), ("attn.gating_param", 0)}
    permuted_keeps_function(GpsaNet, members[0], graph, x)
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert wide.attn.num_heads == 8
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-6
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = GpsaNet()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
    try:  # the gates left in place while the heads move
        verify_permutation_invariance(members[0], _without_slot(graph, "attn.gating_param", 0), x)
    except fusion.FusionError as exc:
        assert "not traced completely" in str(exc)
    else:
        raise AssertionError("a per-head gate left in place was not caught")


# ---------------------------------------------------------------------------- head-major qkv (TinyViT)
class HeadMajorNet(nn.Module):
    """tokens of a 4x4 window -> embed -> timm's TinyViT Attention (qkv rows head by head, each head's q, k and v
    together; a LayerNorm and an attention-bias table per head inside) + skip -> classifier."""

    def __init__(self, attn_ratio: int = 1):
        super().__init__()
        from timm.models.tiny_vit import Attention

        self.embed = nn.Linear(8, 16)
        self.attn = Attention(16, key_dim=4, num_heads=4, attn_ratio=attn_ratio, resolution=(4, 4))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        return self.fc((x + self.attn(x)).mean(1))


@pytest.mark.parametrize("ratio", [1, 2])  # ratio 1: qkv is 3 x dim rows, as in the q, k, v block layout
def test_head_major_attention_moves_whole_heads(ratio):
    x = torch.randn(2, 16, 8)
    members = _members(lambda: HeadMajorNet(ratio))
    graph = fusion.channel_groups(members[0], x)
    heads = next(g for g in graph.groups if g.unit_kind == "head")
    qkv = next(s for s in heads.slots if s.tensor == "attn.qkv.weight")
    width = 8 + 4 * ratio
    assert heads.n_units == 4 and qkv.positions[1, :, 0].tolist() == list(range(width, 2 * width))
    assert ("attn.attention_biases", 0) in {(s.tensor, s.dim) for s in heads.slots}
    permuted_keeps_function(lambda: HeadMajorNet(ratio), members[0], graph, x)
    same = fusion.fuse([members[0], members[0]], "nt", example_inputs=x, sparsity=0.0)
    assert same.attn.num_heads == 8 and same.attn.out_dim == 8 * 4 * ratio
    assert rel_err(model_out(same, x), model_out(members[0], x)) < 1e-5
    wider = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.25)
    assert wider.attn.num_heads == 6 and wider.attn.attention_biases.shape == (6, 16)
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = HeadMajorNet(ratio)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
    # the q, k, v block layout (rows r * dim + h * head_dim + j) on this module is refused by the self-check
    if ratio == 1:
        blocks = torch.stack([torch.arange(4)[:, None] * 4 + torch.arange(4) + r * 16 for r in range(3)], 2)
        groups = [
            ChannelGroup(
                g.name,
                g.n_units,
                [
                    Slot(s.tensor, s.dim, s.role, s.kind, s.is_weight, s.layer, blocks)
                    if (s.layer, s.dim) == ("attn.qkv", 0)
                    else s
                    for s in g.slots
                ],
                g.unit_kind,
            )
            for g in graph.groups
        ]
        broken = ChannelGraph(groups=groups, output_layers=graph.output_layers, shapes=graph.shapes)
        with pytest.raises(fusion.FusionError, match="not traced completely"):
            verify_permutation_invariance(members[0], broken, x)


# ---------------------------------------------------------------------------- layers shared by all heads (MViTv2)
class PoolingAttnNet(nn.Module):
    """tokens of a 4x4 map -> embed -> timm's MViTv2 MultiScaleAttention (q, k, v pooled by convolutions and
    LayerNorms over a head's channels, shared by every head; decomposed relative positions [positions,
    head_dim]) + skip -> classifier."""

    def __init__(self):
        super().__init__()
        from timm.models.mvitv2 import MultiScaleAttention

        self.embed = nn.Linear(8, 16)
        self.attn = MultiScaleAttention(
            16,
            16,
            (4, 4),
            num_heads=2,
            kernel_q=(3, 3),
            kernel_kv=(3, 3),
            stride_kv=(2, 2),
            has_cls_token=False,
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        y, _ = self.attn(x, [4, 4])
        return self.fc((x + y).mean(1))


def test_layers_shared_by_all_heads_stay_and_heads_move_whole():
    x = torch.randn(2, 16, 8)
    members = _members(PoolingAttnNet)
    graph = fusion.channel_groups(members[0], x)
    heads = next(g for g in graph.groups if g.unit_kind == "head")
    assert heads.n_units == 2
    claimed = {s.tensor for g in graph.groups for s in g.slots}
    assert not claimed & {"attn.pool_q.weight", "attn.norm_q.weight", "attn.rel_pos_h", "attn.pool_k.weight"}
    permuted_keeps_function(PoolingAttnNet, members[0], graph, x)
    # shared by the heads, these layers are averaged across members: a member with itself is the member
    same = fusion.fuse([members[0], members[0]], "nt", example_inputs=x, sparsity=0.0)
    assert same.attn.num_heads == 4 and same.attn.dim_out == 32
    assert rel_err(model_out(same, x), model_out(members[0], x)) < 1e-5
    assert fusion.fuse(members, "nt", example_inputs=x, sparsity=0.25).attn.num_heads == 3
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = PoolingAttnNet()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
    # channels moved within a head (each channel its own unit) break the shared layers: caught
    with pytest.raises(fusion.FusionError, match="not traced completely"):
        verify_permutation_invariance(members[0], _heads_as_channels(graph, heads), x)


# ---------------------------------------------------------------------------- F.linear with split biases, rotary
class RopeNet(nn.Module):
    """tokens of a 4x4 grid and a class token -> embed -> timm's EvaAttention: ``F.linear(x, qkv.weight, cat(q_bias,
    k_bias, v_bias))`` outside the bias-free ``qkv`` Linear, rotary position embedding rotating channel pairs
    within each head of the grid's tokens -> + skip -> classifier."""

    def __init__(self):
        super().__init__()
        from timm.layers import RotaryEmbeddingCat
        from timm.models.eva import EvaAttention

        self.embed = nn.Linear(8, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16))
        self.attn = EvaAttention(16, num_heads=4, qkv_bias=True, num_prefix_tokens=1, scale_norm=False)
        self.rope = RotaryEmbeddingCat(4, in_pixels=False, feat_shape=[4, 4])
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.fc((x + self.attn(x, rope=self.rope.get_embed())).mean(1))


def test_functional_qkv_with_split_biases_and_rotary_moves_whole_heads():
    x = torch.randn(2, 16, 8)
    members = _members(RopeNet)
    graph = fusion.channel_groups(members[0], x)
    heads = next(g for g in graph.groups if g.unit_kind == "head")
    assert heads.n_units == 4
    assert {"attn.q_bias", "attn.k_bias", "attn.v_bias", "attn.qkv.weight"} <= {s.tensor for s in heads.slots}
    stream = next(g for g in graph.groups if any(s.tensor == "embed.weight" for s in g.slots))
    assert ("attn.qkv.weight", 1) in {(s.tensor, s.dim) for s in stream.slots}
    permuted_keeps_function(RopeNet, members[0], graph, x)
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)  # no norm across channels here
    assert wide.attn.num_heads == 8 and wide.attn.k_bias.shape == (32,)
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-6
    fused = fusion.fuse(members, "nt", example_inputs=x)
    fresh = RopeNet()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
    # channels moved within a head break the rotary pairs: caught
    with pytest.raises(fusion.FusionError, match="not traced completely"):
        verify_permutation_invariance(members[0], _heads_as_channels(graph, heads), x)


# ---------------------------------------------------------------------------- a per-head table shared by blocks
class SharedRelPosNet(nn.Module):
    """tokens of a 4x4 grid -> embed -> two timm RelPosAttention blocks reading one shared relative-position MLP
    (its last layer makes one bias per head: head h of both blocks reads row h) -> classifier."""

    def __init__(self):
        super().__init__()
        from timm.layers import RelPosMlp
        from timm.models.vision_transformer_relpos import RelPosAttention

        self.embed = nn.Linear(8, 16)
        self.rel_pos = RelPosMlp(window_size=(4, 4), num_heads=4, hidden_dim=12)
        self.attn1, self.attn2 = RelPosAttention(16, 4, qkv_bias=True), RelPosAttention(16, 4, qkv_bias=True)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        bias = self.rel_pos.get_bias()
        x = x + self.attn1(x, shared_rel_pos=bias)
        x = x + self.attn2(x, shared_rel_pos=bias)
        return self.fc(x.mean(1))


def test_heads_sharing_a_table_move_together():
    x = torch.randn(2, 16, 8)
    members = _members(SharedRelPosNet)
    graph = fusion.channel_groups(members[0], x)
    heads = [g for g in graph.groups if g.unit_kind == "head"]
    assert len(heads) == 1 and heads[0].n_units == 4
    assert {"attn1.qkv", "attn2.qkv", "rel_pos.mlp.fc2"} <= set(heads[0].layers)
    permuted_keeps_function(SharedRelPosNet, members[0], graph, x)
    fused = fusion.fuse(members, "nt", example_inputs=x)  # the members' width (the MLP keeps num_heads)
    fresh = SharedRelPosNet()
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert torch.allclose(model_out(fresh, x), model_out(fused, x))
    with pytest.raises(fusion.FusionError, match="not traced completely"):  # the shared rows left in place
        verify_permutation_invariance(members[0], _without_slot(graph, "rel_pos.mlp.fc2.weight", 0), x)


def _heads_as_channels(graph: ChannelGraph, heads: ChannelGroup) -> ChannelGraph:
    """``graph`` with the head group split into single channels (each its own unit): a trace that lets channels
    move within and across heads."""
    gi = graph.groups.index(heads)
    chans = [
        dataclasses.replace(s, positions=s.positions.reshape(-1, 1, s.positions.shape[2]))
        for s in heads.slots
    ]
    n = chans[0].positions.shape[0]
    return ChannelGraph(
        groups=[*graph.groups[:gi], ChannelGroup(heads.name, n, chans), *graph.groups[gi + 1 :]],
        output_layers=graph.output_layers,
        shapes=graph.shapes,
    )


def test_functional_linear_is_patched_by_one_trace_at_a_time():
    """Tracing replaces ``F.linear`` for its duration; a second thread's trace waits for the first to end
    (two threads patching and restoring in turn would leave one tracing with the plain function), and the
    plain function is back afterwards."""
    import threading

    import torch.nn.functional as F

    from fusion.axes import functional_linears_as_modules

    plain = F.linear
    model = nn.Sequential(nn.Linear(4, 4))
    entered = threading.Event()

    def second():
        with functional_linears_as_modules(model):
            entered.set()

    with functional_linears_as_modules(model):
        assert F.linear is not plain
        worker = threading.Thread(target=second)
        worker.start()
        assert not entered.wait(0.3)  # blocked while this trace holds F.linear
    worker.join(10)
    assert entered.is_set() and F.linear is plain
