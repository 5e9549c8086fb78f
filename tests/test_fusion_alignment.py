"""Alignment baselines (Git Re-Basin weight / activation matching, ZipIt!), `fusion.align`, `fusion.interpolate`.

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
from fusion.state import full_state

METHODS = ["weight_matching", "activation_matching"]
ARCHS = ["mlp", "resnet18", "grouped", "mobilenetv3_small_100"]


def _permuted_copy(model, example, seed):
    graph = fusion.channel_groups(model, example)
    state = full_state(model)
    new = graph.assemble([state], graph.random_permutation(torch.Generator().manual_seed(seed)))
    assert any(not torch.equal(state[n], new[n]) for n in state), "the permutation must move something"
    return build_model(model, new)


def _options(method, x):
    return (
        {"data": torch.cat([x, torch.randn_like(x.repeat(15, *([1] * (x.dim() - 1))))])}
        if (method in ("activation_matching", "zipit"))
        else {}
    )


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


@pytest.mark.parametrize("arch,n", [("mlp", 2), ("grouped", 2), ("resnet18", 2), ("mlp", 4), ("grouped", 3)])
def test_zipit_fuses_permuted_copies_back_into_the_member(arch, n):
    test_permuted_copies_fuse_back_into_the_member("zipit", arch, n)


@pytest.mark.parametrize(
    "method",
    [*METHODS, pytest.param("zipit", marks=pytest.mark.slow)],  # zipit: ~9 s on one core
)
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


def _mlp_and_permutation(seed=0):
    """An MLP member and a copy whose every group was permuted, with those permutations."""
    a = make_fusion_member("mlp", 0).eval()
    x = fusion_example_input("mlp")
    graph = fusion.channel_groups(a, x)
    selection = graph.random_permutation(torch.Generator().manual_seed(seed + 1))
    b = build_model(a, graph.assemble([full_state(a)], selection))
    return a, b, x, graph, [units for _, units in selection]


@pytest.mark.parametrize("method", [*METHODS, "zipit"])
def test_provenance_of_a_permuted_copy_pairs_each_unit_with_its_twin(method):
    """Fused unit k is the mean of unit k of member 0 and the unit of member 1 that holds the same neuron:
    the copy's unit i is the member's unit perm[i], so the member's unit k sits at argsort(perm)[k]."""
    a, b, x, graph, perms = _mlp_and_permutation()
    fused = fusion.fuse([a, b], method, example_inputs=x, **_options(method, x))
    prov = fusion.provenance_of(fused)
    assert prov.method == method and prov.n_members == 2
    for gi, g in enumerate(graph.groups):
        k, m, u, w = prov.group_sources(gi, g.n_units)
        assert torch.allclose(w, torch.full_like(w, 0.5))
        mine = m == 0
        assert torch.equal(u[mine], k[mine]), "member 0 is the frame: fused unit k is its unit k"
        twin = torch.argsort(perms[gi])
        assert torch.equal(u[~mine], twin[k[~mine]]), f"group {g.name}: wrong twin"
        assert torch.equal(
            torch.bincount(k[~mine], minlength=g.n_units), torch.ones(g.n_units, dtype=torch.long)
        )


def _redundant_pair():
    """Member A's first hidden layer holds one neuron twice (units 0 and 1); member B computes the same
    function with that neuron once (its unit 0, reading both of A's outgoing weights) and a different neuron
    (unit 1) that nothing downstream reads. The groups after it see the same features in A and B."""
    a = make_fusion_member("mlp", 0).eval()
    b = make_fusion_member("mlp", 0).eval()
    with torch.no_grad():
        a[1].weight[1], a[1].bias[1] = a[1].weight[0], a[1].bias[0]
        b[1].weight[1] = torch.randn(64, generator=torch.Generator().manual_seed(5))
        b[3].weight[:, 0] = a[3].weight[:, 0] + a[3].weight[:, 1]
        b[3].weight[:, 1] = 0.0
    return a, b


def test_zipit_merges_redundant_units_of_one_member():
    """ZipIt! keeps both of B's distinct neurons by merging A's duplicate pair into one unit (a same-member
    merge), so the fused model computes the members' function exactly; a one-to-one matching (beta = 0:
    no same-member merge) has to average the duplicate with B's other neuron and cannot."""
    a, b = _redundant_pair()
    x = fusion_example_input("mlp", batch=32, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=1e-5, atol=1e-5)
        fused = fusion.fuse([a, b], "zipit", example_inputs=x, data=x, alpha=1.0, beta=0.5)
        torch.testing.assert_close(fused(x), a(x), rtol=1e-4, atol=1e-4)
        first = [g.name for g in fusion.channel_groups(a, x).groups].index("1")
        k, m, u, w = fusion.provenance_of(fused).group_sources(first, 32)
        dup = k[(m == 0) & (u == 0)]
        assert torch.equal(k[(m == 0) & (u == 1)], dup), "A's duplicate units are one fused unit"
        assert torch.allclose(w[k == dup], torch.full((3,), 1 / 3)), "with B's unit 0: three sources"
        one_to_one = fusion.fuse([a, b], "zipit", example_inputs=x, data=x, alpha=0.0, beta=0.0)
        assert not torch.allclose(one_to_one(x), a(x), rtol=1e-2, atol=1e-2)
        k, m, _, _ = fusion.provenance_of(one_to_one).group_sources(first, 32)
        assert torch.equal(torch.bincount(k[m == 0], minlength=32), torch.ones(32, dtype=torch.long))


def test_zipit_bad_options():
    members = [nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)) for _ in range(2)]
    data = torch.randn(8, 4)
    with pytest.raises(FusionError, match="needs a batch of inputs"):
        fusion.fuse(members, "zipit")
    with pytest.raises(FusionError, match="alpha must be"):
        fusion.fuse(members, "zipit", data=data, alpha=1.5)
    with pytest.raises(FusionError, match="beta must be"):
        fusion.fuse(members, "zipit", data=data, beta=-0.1)
    with pytest.raises(FusionError, match="does not align"):
        fusion.align(members, "zipit", data=data)


def test_repair_reads_zipit_provenance():
    """REPAIR gives every fused unit its sources' statistics: where zipit is exact (a duplicate merged within
    a member, three sources of weight 1/3), those already are the fused unit's, so repair changes nothing."""
    a, b = _redundant_pair()
    x = fusion_example_input("mlp", batch=64, seed=2)
    fused = fusion.fuse([a, b], "zipit", example_inputs=x, data=x, alpha=1.0, beta=0.5)
    repaired = fusion.repair(fused, [x], members=[a, b], mode="repair")
    with torch.no_grad():
        torch.testing.assert_close(repaired(x), a(x), rtol=1e-4, atol=1e-4)


def test_zipit_statistics_over_chunks_equal_the_features_similarity():
    """ZipIt! reads wide feature maps through a centred Gram matrix of all members' units accumulated over
    chunks of the batch (no member's features for the whole batch are held), narrow ones through their
    features: either way each group's similarity matrix equals the one computed from every member's
    features at once, and so does the merge."""
    from fusion.methods.ot import _activation_features
    from fusion.methods.zipit import _Gram, similarity, zip_sources, zip_statistics

    kinds = set()
    for arch in ("grouped", "mlp"):  # conv maps (multi-channel units): Gram; an MLP on 8 samples: features
        x = fusion_example_input(arch)
        members = [make_fusion_member(arch, seed) for seed in range(3)]
        data = torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(0))
        graph = fusion.channel_groups(members[0], x)
        stats = zip_statistics(members, graph, data, budget=1 << 12)  # a tiny budget: one sample per chunk
        kinds |= {type(s) for s in stats}
        feats = [_activation_features(m, graph, data) for m in members]
        per_group = [[f[gi] for f in feats] for gi in range(len(graph.groups))]
        for gi, st in enumerate(stats):
            ref = similarity(torch.cat(per_group[gi]))
            got = st.similarity() if isinstance(st, _Gram) else similarity(torch.cat(st))
            torch.testing.assert_close(got, ref, rtol=0, atol=2e-5, msg=f"{arch} {graph.groups[gi].name}")
        stats = zip_statistics(members, graph, data, budget=1 << 12)
        for got, ref in zip(
            zip_sources(graph, stats, 3, 0.3, 0.125), zip_sources(graph, per_group, 3, 0.3, 0.125)
        ):
            assert all(torch.equal(p, q) for p, q in zip(got, ref))
    assert kinds == {_Gram, list}, "both ways of describing a group must be exercised"


def test_zipit_gram_similarity_in_row_blocks_equals_the_features_one():
    """Wide groups (16 members x 512 units) are turned into similarities block by block: the same matrix as
    from all the features, here with 2,048 units, i.e. four row blocks, and offset means (the tie-breaking
    distance must see them)."""
    from fusion.methods.zipit import _Gram, similarity

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2048, 40, generator=g) + torch.randn(2048, 1, generator=g) * 3
    gram = _Gram()
    for chunk in feats.split(7, dim=1):
        gram.add(chunk)
    torch.testing.assert_close(gram.similarity(), similarity(feats), rtol=0, atol=2e-5)
