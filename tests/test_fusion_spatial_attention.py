"""Attention over flattened spatial positions (MaxViT / CoAtNet's ``Attention2d``, NesT, Hiera): q, k and v
come from a 1x1 convolution (or a Linear over a token tensor with extra axes) and are reshaped into heads next
to the positions. torch-pruning maps every channel there to thousands of (channel, position) indices; fusion
cuts its graph inside a recognised attention and builds the head group from the layout (heads first or roles
first, read from the reshape autograd recorded). Oracles on small hand-written modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fusion
import fusion.attention as attention
import fusion.trace as trace
import fusion.verify as verify
from fusion.build import build_model
from fusion.state import full_state


class ConvAttention(nn.Module):
    """A 1x1-conv qkv read as ``view(B, heads, 3 * dim_head, H * W)`` (``head_first``, MaxViT's default) or as
    ``reshape(B, 3, heads, dim_head, H * W)``, with a per-head bias over position pairs."""

    def __init__(self, dim: int, heads: int, dim_head: int, positions: int, head_first: bool):
        super().__init__()
        self.num_heads, self.dim_head, self.head_first = heads, dim_head, head_first
        self.qkv = nn.Conv2d(dim, 3 * heads * dim_head, 1)
        self.bias = nn.Parameter(torch.randn(heads, positions, positions))
        self.proj = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        if self.head_first:
            q, k, v = self.qkv(x).view(B, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
        else:
            q, k, v = self.qkv(x).reshape(B, 3, self.num_heads, self.dim_head, -1).unbind(1)
        attn = (q.transpose(-2, -1) @ k) * self.dim_head**-0.5 + self.bias
        out = (v @ attn.softmax(-1).transpose(-2, -1)).reshape(B, -1, H, W)
        return self.proj(out)


class ConvNet(nn.Module):
    def __init__(self, head_first: bool, dim: int = 8, heads: int = 2, dim_head: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.BatchNorm2d(dim), nn.ReLU())
        self.attn = ConvAttention(dim, heads, dim_head, 16, head_first)
        self.norm = nn.BatchNorm2d(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.norm(x + self.attn(x))
        return self.head(x.mean((2, 3)))


class BlockAttention(nn.Module):
    """NesT's attention: a Linear qkv over tokens ``(B, T, N, C)`` grouped in image blocks; with ``head_last``
    the heads' outputs are NesT's ``(B, T, N, head_dim, heads)`` (proj column ``j * heads + head``), else
    ``(B, T, N, heads, head_dim)``."""

    def __init__(self, dim: int, heads: int, head_last: bool):
        super().__init__()
        self.num_heads, self.head_last = heads, head_last
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, N, C = x.shape
        qkv = self.qkv(x).reshape(B, T, N, 3, self.num_heads, C // self.num_heads).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)
        out = (q @ k.transpose(-2, -1)).softmax(-1) @ v  # (B, heads, T, N, head_dim)
        out = out.permute(0, 2, 3, 4, 1) if self.head_last else out.permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(B, T, N, C))


class BlockNet(nn.Module):
    """Tokens in 4 image blocks of 16 positions with NesT's position embedding ``(1, blocks, positions, C)``."""

    def __init__(self, head_last: bool, dim: int = 8, heads: int = 2):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 16, dim))
        self.attn = BlockAttention(dim, heads, head_last)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):  # x: (B, 3, 8, 8) -> 4 blocks of 4x4 positions
        B = x.shape[0]
        t = x.reshape(B, 3, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(B, 4, 16, 3)
        t = self.embed(t) + self.pos_embed
        t = t + self.attn(t)
        return self.head(t.mean((1, 2)))


class TokenHeadFirstNet(nn.Module):
    """TinyViT's attention: a Linear qkv over tokens read head by head, ``view(B, N, heads, -1).split(...)``,
    with a per-head bias."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 1)
        self.attn = nn.Module()
        self.attn.num_heads, self.attn.head_dim = heads, dim // heads
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.bias = nn.Parameter(torch.randn(heads, 1, 1))
        self.attn.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        B, N, C = t.shape
        a = self.attn
        q, k, v = a.qkv(t).view(B, N, a.num_heads, -1).split([a.head_dim] * 3, dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = ((q @ k.transpose(-2, -1)) + a.bias).softmax(-1) @ v
        t = t + a.proj(out.transpose(1, 2).reshape(B, N, C))
        return self.head(t.mean(1))


def _members(make, n: int = 2):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = make().eval()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.1)
                    mod.running_var.uniform_(0.5, 1.5)
        out.append(m)
    return out


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


CASES = {
    "conv head-first": (lambda: ConvNet(True), (2, 3, 4, 4)),
    "conv role-first": (lambda: ConvNet(False), (2, 3, 4, 4)),
    "tokens head-first": (lambda: TokenHeadFirstNet(), (2, 3, 4, 4)),
    "token blocks": (lambda: BlockNet(False), (2, 3, 8, 8)),
    "token blocks, heads last": (lambda: BlockNet(True), (2, 3, 8, 8)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_heads_are_units_and_a_permutation_keeps_the_function(case):
    make, shape = CASES[case]
    a, b = _members(make)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    graph = fusion.channel_groups(a, x)  # the float64 self-check passes
    heads = [g for g in graph.groups if g.unit_kind == "head"]
    assert [g.name for g in heads] == ["attn.qkv"] and heads[0].n_units == a.attn.num_heads
    slots = {(s.tensor, s.dim) for s in heads[0].slots}
    assert {("attn.qkv.weight", 0), ("attn.proj.weight", 1)} <= slots
    if not case.startswith("token blocks"):
        assert ("attn.bias", 0) in slots  # the per-head bias moves with its head
    else:  # the position embedding's channels are its last axis
        assert any(s.tensor == "pos_embed" and s.dim == 3 for g in graph.groups for s in g.slots)
    (proj,) = [s for s in heads[0].slots if s.tensor == "attn.proj.weight"]
    if case.endswith("heads last"):  # head 0 reads columns 0, 2, 4, 6: one repeat per position in the head
        assert proj.positions[0].reshape(-1).tolist() == [0, 2, 4, 6]
        assert proj.positions.shape == (2, 1, 4)
    state = full_state(a)
    # heads swapped: [1, 0] is a real permutation of 2 heads, every other group as it is
    sel = graph.identity_selection()
    hi = graph.groups.index(heads[0])
    sel[hi] = (sel[hi][0], torch.tensor([1, 0]))
    new = graph.assemble([state], sel)
    assert not torch.equal(new["attn.qkv.weight"], state["attn.qkv.weight"])
    with torch.no_grad():
        assert _rel(build_model(a, new)(x), a(x)) < 1e-5
        permuted = graph.assemble([state], graph.random_permutation(torch.Generator().manual_seed(1)))
        assert _rel(build_model(a, permuted)(x), a(x)) < 1e-5
        # NT at sparsity 0 is the ensemble (no normalization across channels), with twice the heads
        wide = fusion.fuse([a, b], "nt", example_inputs=x, sparsity=0.0)
        assert wide.attn.num_heads == 2 * a.attn.num_heads
        assert _rel(wide(x), fusion.ensemble([a, b])(x)) < 1e-5
        for method in ("nt", "avg"):
            fused = fusion.fuse([a, b], method, example_inputs=x)
            fresh = make().eval()
            fresh.load_state_dict(fused.state_dict(), strict=True)
            assert torch.isfinite(fresh(x)).all()


def test_the_head_order_is_read_from_the_reshape_and_a_wrong_one_is_refused(monkeypatch):
    """The same module with its qkv rows read head by head or role by role: the tracer tells them apart by the
    reshape, and a trace with the other order (forced here) is caught by the self-check, never fused."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for head_first in (True, False):
        (a,) = _members(lambda head_first=head_first: ConvNet(head_first), 1)
        graph = fusion.channel_groups(a, x)
        (heads,) = [g for g in graph.groups if g.unit_kind == "head"]
        (qkv,) = [s for s in heads.slots if s.tensor == "attn.qkv.weight"]
        if head_first:  # head 0's 3 * dim_head rows, one run
            assert qkv.positions[0, :, 0].tolist() == list(range(9))
        else:  # head 0's rows in q, k and v
            assert qkv.positions[0].T.tolist() == [[0, 1, 2], [6, 7, 8], [12, 13, 14]]
        wrong = "role-first" if head_first else "head-first"
        monkeypatch.setattr(attention, "_producer_row_order", lambda *args, wrong=wrong: wrong)
        trace._CACHE.clear()
        with pytest.raises(fusion.FusionError, match=r"rooted at 'attn.qkv'.*not traced completely"):
            fusion.channel_groups(a, x)
        monkeypatch.undo()
        trace._CACHE.clear()


def test_a_head_output_read_outside_the_attention_is_refused():
    """The cut inside the attention hides what reads the q/k/v outputs; a model that also reads them elsewhere
    is caught by the self-check (the other reader does not follow the heads)."""

    class Leaky(ConvNet):
        def forward(self, x):
            x = self.stem(x)
            y = self.attn.qkv(x)
            x = self.norm(x + self.attn(x) + y[:, : x.shape[1]])
            return self.head(x.mean((2, 3)))

    (a,) = _members(lambda: Leaky(True), 1)
    with pytest.raises(fusion.FusionError):
        fusion.channel_groups(a, torch.randn(2, 3, 4, 4))


def test_models_alike_in_shapes_but_not_in_head_order_do_not_share_a_cached_trace():
    """``head_first`` is a plain attribute, not a shape: the trace cache's key holds such settings, so the
    second model is traced (and checked) itself instead of reusing the first one's head layout."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    orders = []
    for head_first in (True, False):
        (a,) = _members(lambda head_first=head_first: ConvNet(head_first), 1)
        graph = fusion.channel_groups(a, x)
        (qkv,) = [s for g in graph.groups for s in g.slots if s.tensor == "attn.qkv.weight" and s.dim == 0]
        orders.append(tuple(qkv.positions.shape))
    assert orders == [(2, 9, 1), (2, 3, 3)]


def test_a_proj_read_in_the_wrong_head_order_is_refused(monkeypatch):
    """NesT's heads reach ``proj`` as ``(head_dim, heads)``: read as ``(heads, head_dim)`` (forced here), a
    permutation of heads moves the wrong columns, which the self-check catches."""
    (a,) = _members(lambda: BlockNet(True), 1)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(attention, "_proj_column_order", lambda *args: "head-first")
    trace._CACHE.clear()
    with pytest.raises(fusion.FusionError, match=r"rooted at 'attn.qkv'.*not traced completely"):
        fusion.channel_groups(a, x)
    trace._CACHE.clear()


class SharedTableAttention(nn.Module):
    """BoTNet's BottleneckAttn: q, k, v split from a 1x1 conv, heads merged into the batch, no proj, and a
    relative position table ``(2 * size - 1, head_dim)`` that every head reads."""

    def __init__(self, dim: int, heads: int, size: int):
        super().__init__()
        self.num_heads, self.dim_head = heads, dim // heads
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.rel = nn.Parameter(torch.randn(2 * size - 1, self.dim_head))

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = torch.split(self.qkv(x), [C, C, C], dim=1)
        q = q.reshape(B * self.num_heads, self.dim_head, -1).transpose(-1, -2)
        k = k.reshape(B * self.num_heads, self.dim_head, -1)
        v = v.reshape(B * self.num_heads, self.dim_head, -1).transpose(-1, -2)
        rel = (q @ self.rel.transpose(0, 1)).mean(-1, keepdim=True)  # every head reads the same table
        out = ((q @ k) + rel).softmax(-1) @ v
        return out.transpose(-1, -2).reshape(B, C, H, W)


def test_an_attention_in_an_unknown_layout_is_refused_by_name(monkeypatch):
    """torch-pruning's walk through such an attention explodes (budget lowered here); the refusal names the
    attention and the parameter every head reads, instead of only the exploding walk."""
    monkeypatch.setattr(trace, "_MAX_INDICES", 300)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), SharedTableAttention(8, 2, 4), nn.BatchNorm2d(8)
    )
    with pytest.raises(fusion.FusionError) as info:
        trace._trace(model.eval(), torch.randn(2, 3, 4, 4), ["3"])
    message = str(info.value)
    assert message.startswith(
        "attention '2' (SharedTableAttention): its q/k/v channels are reshaped into heads"
    )
    assert message.endswith("; 'rel' (7, 4) is shared by all heads; fusion refused")
    # a group rooted outside that reached the attention (EfficientViT's residual stream into its cascaded group
    # attention) is refused naming the attention too; a group that reached none keeps the generic refusal
    reason = attention._unknown_attention_reason(model, "0", ["1", "2.qkv"])
    assert reason.startswith("attention '2' (SharedTableAttention): the channels of '0' reach it")
    assert attention._unknown_attention_reason(model, "0", ["1", "3"]) is None


def test_the_self_check_moves_every_group_so_a_wrong_two_head_layout_is_caught_for_every_seed(monkeypatch):
    """A random permutation of two heads is the identity half the time, which would check nothing; the
    self-check rolls such a group instead, so a wrong layout is refused whatever the seed."""
    (a,) = _members(lambda: ConvNet(True), 1)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(attention, "_producer_row_order", lambda *args: "role-first")
    wrong = trace._trace(a, x, None)
    for seed in range(6):
        with pytest.raises(fusion.FusionError, match=r"rooted at 'attn.qkv'"):
            verify.verify_permutation_invariance(a, wrong, x, seed=seed)
    moved = verify._moving_every_group(wrong.identity_selection())
    assert all(
        not torch.equal(u, torch.arange(g.n_units)) for (_, u), g in zip(moved, wrong.groups) if g.n_units > 1
    )


@pytest.mark.parametrize("head_first", [True, False])
def test_a_single_head_is_widened_in_the_order_the_forward_reads_it(head_first):
    """One head cannot be permuted, so the self-check says nothing about its row order; a model with more heads
    (NT at sparsity 0) reads its rows head by head or role by role all the same. The order comes from the
    head's axis of size 1 in the reshape (``view(B, 1, 3 * dim_head, H * W)``)."""
    a, b = _members(lambda: ConvNet(head_first, heads=1, dim_head=4), 2)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wide = fusion.fuse([a, b], "nt", example_inputs=x, sparsity=0.0)
        assert wide.attn.num_heads == 2
        assert _rel(wide(x), fusion.ensemble([a, b])(x)) < 1e-5


class RelPosAttention(nn.Module):
    """MaxViT's ``Attention2d`` with timm's ``RelPosBias`` (its table is per head, its ``bias_shape`` ends in the
    head count) and Hiera's ``dim_out``, the heads' width its forward reshapes to."""

    def __init__(self, dim: int = 8, heads: int = 2, dim_head: int = 3):
        super().__init__()
        from timm.layers import RelPosBias

        self.num_heads, self.dim_head, self.dim_out = heads, dim_head, heads * dim_head
        self.qkv = nn.Conv2d(dim, 3 * heads * dim_head, 1)
        self.rel_pos = RelPosBias((4, 4), heads)
        self.proj = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, self.dim_head * 3, -1).chunk(3, dim=2)
        attn = self.rel_pos((q.transpose(-2, -1) @ k) * self.dim_head**-0.5)
        out = v @ attn.softmax(-1).transpose(-2, -1)
        return self.proj(out.reshape(B, self.dim_out, H, W))


def test_a_wider_model_follows_the_head_count_in_relative_position_biases_and_widths():
    def make():
        net = ConvNet(True)
        net.attn = RelPosAttention()
        with torch.no_grad():
            net.attn.rel_pos.relative_position_bias_table.normal_()
        return net

    a, b = _members(make)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fusion.channel_groups(a, x)  # self-check: the bias table moves with its heads
        wide = fusion.fuse([a, b], "nt", example_inputs=x, sparsity=0.0)
        attn = wide.attn
        assert (attn.num_heads, attn.dim_out) == (4, 12)
        assert attn.rel_pos.bias_shape == (16, 16, 4)
        assert _rel(wide(x), fusion.ensemble([a, b])(x)) < 1e-5


class SubsampledAttention(nn.Module):
    """PVT / Twins' global sub-sampled attention: q from every token, k and v from the tokens reduced by a
    strided convolution ``sr`` whose kernel size (2) equals the head count: its kernel axes are not per head."""

    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.num_heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.sr = nn.Conv2d(dim, dim, 2, stride=2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, size):
        B, N, C = x.shape
        hd = C // self.num_heads
        q = self.q(x).reshape(B, N, self.num_heads, hd).permute(0, 2, 1, 3)
        r = self.sr(x.transpose(1, 2).reshape(B, C, *size)).flatten(2).transpose(1, 2)
        k, v = self.kv(r).reshape(B, -1, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
        out = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class SubsampledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 1)
        self.attn = SubsampledAttention()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, x.shape[2:])
        return self.head(t.mean(1))


def test_a_spatial_reduction_convolution_with_a_kernel_as_large_as_the_head_count_is_not_per_head():
    a, b = _members(SubsampledNet)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    graph = fusion.channel_groups(a, x)
    (heads,) = [g for g in graph.groups if g.unit_kind == "head"]
    assert not any(s.tensor.startswith("attn.sr") for s in heads.slots)
    with torch.no_grad():
        wide = fusion.fuse([a, b], "nt", example_inputs=x, sparsity=0.0)
        assert _rel(wide(x), fusion.ensemble([a, b])(x)) < 1e-5
