"""Alignment baselines (Git Re-Basin weight / activation matching), `fusion.align` and `fusion.interpolate`.

Oracles: a member fused with copies of itself whose channel groups were permuted at random must come back
exactly (same weights, same function) -- on an MLP, residual CNNs and a ViT (heads as units); weight
matching's objective never decreases over coordinate-descent sweeps; the aligned members compute the
members' functions; the interpolation path starts and ends at the members.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import fusion_example_input, make_fusion_member
from test_fusion_vit import make_vit

import fusion
from fusion import FusionError
from fusion.build import build_model
from fusion.methods.weight_matching import weight_matching_plans
from fusion.trace import full_state

METHODS = ["weight_matching", "activation_matching"]
ARCHS = ["mlp", "resnet18", "grouped", "mobilenetv3_small_100"]


def _permuted_copy(model, example, seed):
    graph = fusion.channel_groups(model, example)
    state = full_state(model)
    new = graph.assemble([state], graph.random_permutation(torch.Generator().manual_seed(seed)))
    assert any(not torch.equal(state[n], new[n]) for n in state), "the permutation must move something"
    return build_model(model, new)


def _options(method, x):
    return {"data": torch.cat([x, torch.randn_like(x.repeat(15, *([1] * (x.dim() - 1))))])} if (
        method == "activation_matching"
    ) else {}


def _assert_same_weights(fused, member):
    got = fused.state_dict()
    for name, t in member.state_dict().items():
        if t.is_floating_point():
            torch.testing.assert_close(got[name], t, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch,n", [(a, 2) for a in ARCHS] + [("mlp", 4), ("resnet18", 3)])
def test_permuted_copies_fuse_back_into_the_member(method, arch, n):
    x = fusion_example_input(arch)
    a = make_fusion_member(arch, 0).eval()
    members = [a] + [_permuted_copy(a, x, seed) for seed in range(1, n)]
    with torch.no_grad():
        fused = fusion.fuse(members, method, example_inputs=x, **_options(method, x))
        torch.testing.assert_close(fused(x), a(x), rtol=1e-4, atol=1e-4)
    _assert_same_weights(fused, a)
    if arch == "mlp":  # negative control: the oracle can fail
        avg = fusion.fuse(members, "avg")
        assert not torch.allclose(avg(x), a(x), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_permuted_vit_heads_fuse_back(method):
    x = torch.randn(2, 3, 32, 32)
    a = make_vit("vit_tiny_patch16_224", 0).eval()
    b = _permuted_copy(a, x, 3)
    with torch.no_grad():
        fused = fusion.fuse([a, b], method, example_inputs=x, **_options(method, x))
        torch.testing.assert_close(fused(x), a(x), rtol=1e-4, atol=1e-4)
    _assert_same_weights(fused, a)


@pytest.mark.parametrize("arch,n", [("mlp", 2), ("resnet18", 2), ("mlp", 3)])
def test_weight_matching_objective_never_decreases(arch, n):
    x = fusion_example_input(arch)
    members = [make_fusion_member(arch, seed).eval() for seed in range(n)]  # different members
    history: list = []
    weight_matching_plans(members, example_inputs=x, history=history, seed=1)
    assert history and sum(len(h) for h in history) > 2
    for h in history:
        assert all(b >= a - 1e-6 * abs(a) for a, b in zip(h, h[1:])), h
    assert max(h[-1] - h[0] for h in history) > 0, "matching different members must improve the objective"


@pytest.mark.parametrize("method", ["ot", *METHODS])
def test_align_returns_members_computing_the_same_functions(method):
    x = fusion_example_input("resnet18")
    members = [make_fusion_member("resnet18", s).eval() for s in range(2)]
    aligned = fusion.align(members, method, example_inputs=x, **_options(method, x))
    with torch.no_grad():
        for m, al in zip(members, aligned):
            torch.testing.assert_close(al(x), m(x), rtol=1e-4, atol=1e-4)
    if method == "weight_matching":  # and the alignment actually moved the second member
        assert not torch.equal(aligned[1].conv1.weight, members[1].conv1.weight)


def test_interpolation_endpoints_are_the_members_and_midpoint_is_the_average():
    a, b = (make_fusion_member("mlp", s) for s in range(2))
    x = fusion_example_input("mlp")
    with torch.no_grad():
        torch.testing.assert_close(fusion.interpolate(a, b, 0.0)(x), a(x))
        torch.testing.assert_close(fusion.interpolate(a, b, 1.0)(x), b(x))
        mid = fusion.interpolate(a, b, 0.5)
        torch.testing.assert_close(mid(x), fusion.fuse([a, b], "avg")(x))
    assert fusion.provenance_of(mid).member_weights == (0.5, 0.5)


def test_linear_path_and_barrier():
    from bench.lmc import linear_path

    a, b = (make_fusion_member("mlp", s) for s in range(2))
    seen = []

    def evaluate(model):
        seen.append(model)
        return (0.9, 0.3) if model is a or model is b else (0.5, 1.0)

    path = linear_path(a, b, evaluate)
    assert path.alphas == [0.0, 0.25, 0.5, 0.75, 1.0] and seen[0] is a and seen[-1] is b
    assert path.barrier_acc == pytest.approx(0.4) and path.barrier_loss == pytest.approx(0.7)
    with pytest.raises(ValueError):
        linear_path(a, b, evaluate, alphas=(0.5, 1.0))


def test_bad_options():
    members = [nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)) for _ in range(2)]
    with pytest.raises(FusionError, match="needs a batch of inputs"):
        fusion.fuse(members, "activation_matching")
    with pytest.raises(FusionError, match="max_iter"):
        fusion.fuse(members, "weight_matching", max_iter=0)
    with pytest.raises(FusionError, match="unknown option 'anchor'"):
        fusion.fuse(members, "weight_matching", anchor=1)
    with pytest.raises(FusionError, match="does not align"):
        fusion.align(members, "nt")
    with pytest.raises(FusionError, match="alpha"):
        fusion.interpolate(*members, 1.5)
