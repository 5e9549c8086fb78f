"""Vision transformers: heads move whole; NT, OT and averaging on timm ViTs built for 32x32 images."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from conftest import _randomize_fusion_member

import fusion
from fusion.build import build_model
from fusion.state import full_state

TINY = ["vit_tiny_patch16_224", "deit_tiny_patch16_224"]


def make_vit(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, img_size=32, patch_size=4)
    _randomize_fusion_member(model, torch.Generator().manual_seed(100 + seed))
    return model.eval()


@pytest.fixture(scope="module", params=TINY)
def vits(request):
    name = request.param
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return name, [make_vit(name, s) for s in range(3)], x


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_heads_are_units_and_permuting_groups_keeps_the_function(vits):
    name, (a, *_), x = vits
    graph = fusion.channel_groups(a, x)
    heads = [g for g in graph.groups if g.unit_kind == "head"]
    assert len(heads) == len(a.blocks)
    assert all(g.n_units == a.blocks[0].attn.num_heads for g in heads)
    residual = [g for g in graph.groups if any(s.tensor == "cls_token" for s in g.slots)]
    assert len(residual) == 1
    stream = {s.tensor for s in residual[0].slots}
    assert {"pos_embed", "patch_embed.proj.weight", "norm.weight", "blocks.0.norm1.weight"} <= stream
    state = full_state(a)
    new = graph.assemble([state], graph.random_permutation(torch.Generator().manual_seed(3)))
    assert not torch.equal(new["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert not torch.equal(new["cls_token"], state["cls_token"])
    with torch.no_grad():
        assert _rel(build_model(a, new)(x), a(x)) < 1e-5


def test_moving_channels_across_heads_changes_the_function(vits):
    """Negative control: q/k/v channels permuted as single channels (not whole heads) break attention,
    which is why torch-pruning's per-channel qkv group is replaced by head units."""
    name, (a, *_), x = vits
    state = {k: v.clone() for k, v in a.state_dict().items()}
    dim = a.blocks[0].attn.num_heads * a.blocks[0].attn.head_dim
    perm = torch.randperm(dim, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([perm, perm + dim, perm + 2 * dim])
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][rows]
    state["blocks.0.attn.qkv.bias"] = state["blocks.0.attn.qkv.bias"][rows]
    state["blocks.0.attn.proj.weight"] = state["blocks.0.attn.proj.weight"][:, perm]
    b = make_vit(name, 9)
    b.load_state_dict(state)
    with torch.no_grad():
        assert _rel(b(x), a(x)) > 1e-3


def test_ot_undoes_a_random_permutation(vits):
    name, (a, *_), x = vits
    graph = fusion.channel_groups(a, x)
    perms = [
        build_model(
            a, graph.assemble([full_state(a)], graph.random_permutation(torch.Generator().manual_seed(s)))
        )
        for s in (1, 2)
    ]
    with torch.no_grad():
        fused = fusion.fuse([a, *perms], "ot", example_inputs=x)
        assert _rel(fused(x), a(x)) < 1e-4
        assert _rel(fusion.fuse([a, *perms], "avg")(x), a(x)) > 1e-2


def test_nt_default_is_the_member_architecture_and_trains(vits):
    name, members, x = vits
    fused = fusion.fuse(members[:2], "nt", example_inputs=x)
    fresh = timm.create_model(name, num_classes=10, img_size=32, patch_size=4)
    fresh.load_state_dict(fused.state_dict())  # strict: same names and shapes
    attn = fused.blocks[0].attn
    assert (attn.num_heads, attn.head_dim) == (
        members[0].blocks[0].attn.num_heads,
        members[0].blocks[0].attn.head_dim,
    )
    fused.train()
    opt = torch.optim.SGD(fused.parameters(), lr=0.01)
    y = torch.tensor([1, 7])
    xs = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(fused(xs), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_nt_wider_model_has_more_heads_and_runs(vits):
    name, members, x = vits
    fused = fusion.fuse(members[:2], "nt", example_inputs=x, sparsity=0.25)
    heads = members[0].blocks[0].attn.num_heads
    for block in fused.blocks:
        attn = block.attn
        assert attn.num_heads * attn.head_dim == attn.qkv.out_features // 3 == attn.proj.in_features
        assert attn.attn_dim == attn.num_heads * attn.head_dim
    assert fused.blocks[0].attn.num_heads == round(2 * heads * 0.75)
    assert fused.cls_token.shape[-1] == round(2 * members[0].embed_dim * 0.75)
    with torch.no_grad():
        assert fused(x).shape == (2, 10)


def test_nt_sparsity_zero_on_vits(vits):
    """What holds at sparsity 0: LayerNorm normalizes the concatenated residual stream (all members' channels
    together), so the concatenation is NOT the ensemble of different ViTs; for identical members the stream's
    statistics are the member's, and the concatenation computes exactly the member's function."""
    name, members, x = vits
    a, b = members[:2]
    with torch.no_grad():
        same = fusion.fuse([a, a], "nt", example_inputs=x, sparsity=0.0)
        assert same.blocks[0].attn.num_heads == 2 * a.blocks[0].attn.num_heads
        assert _rel(same(x), a(x)) < 1e-4
        mixed = fusion.fuse([a, b], "nt", example_inputs=x, sparsity=0.0)
        assert _rel(mixed(x), fusion.ensemble([a, b])(x)) > 1e-3


def test_vit_small_fuses_with_every_method():
    x = torch.randn(2, 3, 32, 32)
    a, b = make_vit("vit_small_patch16_224", 0), make_vit("vit_small_patch16_224", 1)
    with torch.no_grad():
        for method in ("nt", "avg", "ot"):
            fused = fusion.fuse([a, b], method, example_inputs=x)
            assert fused(x).shape == (2, 10)
            assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in a.parameters())
