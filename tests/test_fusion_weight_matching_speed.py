"""Weight matching's fast paths give the alignment the direct computation gives.

Oracles: a permuted copy's permutations are recovered exactly (two members and MergeMany); MergeMany with
``tol=0`` returns the plans of a plain reference implementation (the mean of the others summed afresh for
every match, no match skipped); the target every match receives is the mean of the other members in their
alignment at that moment; MergeMany's objective never decreases over rounds and is the aligned members'
pairwise inner products; ``tol > 0`` stops on a prefix of the ``tol=0`` trajectory, at the first round that
gains at most ``tol`` (relative); the cross term alone picks the permutation the squared distances pick.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import fusion_example_input, make_fusion_member

import fusion
from fusion import FusionError
from fusion.align import apply_plans
from fusion.build import build_model
from fusion.layers import is_float
from fusion.methods import weight_matching as wm
from fusion.methods.ot import WeightCost, _same, assignment
from fusion.state import full_state


def _wide_mlp(seed, width=96):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    ).eval()


def _members(n, width=96):
    return [_wide_mlp(s, width) for s in range(n)], torch.randn(
        2, 64, generator=torch.Generator().manual_seed(0)
    )


def _permuted(model, x, seed):
    """A copy of ``model`` with every group permuted, and per group the permutation (copy unit i is the
    model's unit ``perm[i]``)."""
    graph = fusion.channel_groups(model, x)
    selection = graph.random_permutation(torch.Generator().manual_seed(seed))
    copy = build_model(model, graph.assemble([full_state(model)], selection))
    return copy, [units for _, units in selection]


def _pairwise(graph, states, member_plans):
    """``sum_{i<j} <A_i, A_j>`` over the tensors the groups touch, computed directly (float64)."""
    aligned = [apply_plans(graph, s, p) for s, p in zip(states, member_plans)]
    total = 0.0
    for name in graph.tensor_dims:
        if not is_float(states[0][name]):
            continue
        for i in range(len(aligned)):
            for j in range(i + 1, len(aligned)):
                total += float((aligned[i][name].double() * aligned[j][name].double()).sum())
    return total


def _reference_merge_many(graph, states, max_iter=100, seed=0):
    """MergeMany as first written: the mean of the others summed for every match, every member matched in
    every round, rounds until none changes a permutation."""
    gen = torch.Generator().manual_seed(seed)
    member_plans = [None] * len(states)
    aligned = [dict(s) for s in states]
    for _ in range(max_iter):
        changed = False
        for i in torch.randperm(len(states), generator=gen).tolist():
            others = [aligned[j] for j in range(len(states)) if j != i]
            target = {
                n: sum(o[n] for o in others) / len(others) if is_float(t) else t for n, t in states[i].items()
            }
            plans, _ = wm.match(
                graph, target, states[i], max_iter=max_iter, generator=gen, plans=member_plans[i]
            )
            if not all(_same(p, q) for p, q in zip(plans, member_plans[i] or [None] * len(plans))):
                member_plans[i], changed = plans, True
                aligned[i] = apply_plans(graph, states[i], plans)
        if not changed:
            break
    return member_plans


@pytest.mark.parametrize("arch", ["mlp", "resnet18"])
def test_two_members_recover_the_permutation_of_a_copy(arch):
    x = fusion_example_input(arch)
    a = make_fusion_member(arch, 0).eval()
    b, perms = _permuted(a, x, 7)
    graph, (first, plans) = wm.weight_matching_plans([a, b], example_inputs=x)
    assert first is None
    for gi, (plan, perm) in enumerate(zip(plans, perms)):
        # aligned unit i must be the model's unit i, i.e. the copy's unit argsort(perm)[i]
        assert torch.equal(plan, torch.argsort(perm)), graph.groups[gi].name


def test_merge_many_recovers_the_permutations_of_copies():
    a, x = _members(1)
    a = a[0]
    copies = [_permuted(a, x, seed) for seed in (3, 4)]
    graph, member_plans = wm.weight_matching_plans([a] + [c for c, _ in copies], example_inputs=x)
    assert member_plans[0] is None  # member 0's frame
    for plans, (_, perms) in zip(member_plans[1:], copies):
        assert all(torch.equal(p, torch.argsort(q)) for p, q in zip(plans, perms))
    fused = fusion.fuse([a] + [c for c, _ in copies], "weight_matching", example_inputs=x)
    for name, t in a.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], t, rtol=1e-5, atol=1e-6, msg=name)


def test_merge_many_with_tol_0_returns_the_reference_plans():
    """The running sum, the skipped matches and the per-round objective change nothing: the plans are the
    ones of the plain implementation (same random stream: a skipped match still draws its group order)."""
    members, x = _members(5)
    graph = fusion.channel_groups(members[0], x)
    states = [full_state(m) for m in members]
    ref = _reference_merge_many(graph, states)
    rounds: list = []
    got = wm.merge_many(
        graph, states, max_iter=100, generator=torch.Generator().manual_seed(0), rounds=rounds
    )
    assert len(rounds) > 3, "the case must take several rounds"
    for mine, theirs in zip(got, ref):
        assert all(_same(p, q) for p, q in zip(mine or [], theirs or [])) and (mine is None) == (
            theirs is None
        )


def test_each_match_receives_the_mean_of_the_others(monkeypatch):
    members, x = _members(4)
    graph = fusion.channel_groups(members[0], x)
    states = [full_state(m) for m in members]
    current = [None] * len(states)
    checked = []
    real = wm.match

    def spy(graph, target, member, **kw):
        i = next(k for k, s in enumerate(states) if s is member)
        others = [apply_plans(graph, states[j], current[j]) for j in range(len(states)) if j != i]
        for name in graph.tensor_dims:
            if is_float(states[0][name]):
                mean = torch.stack([o[name].double() for o in others]).mean(0)
                torch.testing.assert_close(target[name].double(), mean, rtol=0, atol=1e-6)
        out = real(graph, target, member, **kw)
        current[i] = out[0] if any(p is not None for p in out[0]) else current[i]
        checked.append(i)
        return out

    monkeypatch.setattr(wm, "match", spy)
    wm.merge_many(graph, states, max_iter=100, generator=torch.Generator().manual_seed(1))
    assert len(checked) > len(states), "several rounds of matches must have been checked"


def test_merge_many_objective_never_decreases_and_is_the_pairwise_inner_product():
    members, x = _members(4)
    graph = fusion.channel_groups(members[0], x)
    states = [full_state(m) for m in members]
    rounds: list = []
    plans = wm.merge_many(
        graph, states, max_iter=100, generator=torch.Generator().manual_seed(2), rounds=rounds
    )
    assert len(rounds) > 2 and rounds[-1] > rounds[0]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(rounds, rounds[1:])), rounds
    assert rounds[0] == pytest.approx(_pairwise(graph, states, [None] * len(states)), rel=1e-9)
    assert rounds[-1] == pytest.approx(_pairwise(graph, states, plans), rel=1e-9)


@pytest.mark.parametrize("tol", [1e-2, 1e-3])
def test_tolerance_stops_on_a_prefix_of_the_exact_rule(tol):
    members, x = _members(5)
    graph = fusion.channel_groups(members[0], x)
    states = [full_state(m) for m in members]
    exact: list = []
    wm.merge_many(
        graph, states, max_iter=100, generator=torch.Generator().manual_seed(0), tol=0.0, rounds=exact
    )
    early: list = []
    wm.merge_many(
        graph, states, max_iter=100, generator=torch.Generator().manual_seed(0), tol=tol, rounds=early
    )
    assert len(early) < len(exact), "the case must stop early"
    assert early == exact[: len(early)], "the rule only truncates the same trajectory"
    gains = [b - a for a, b in zip(early, early[1:])]
    assert all(g > tol * abs(b) for g, b in zip(gains[:-1], early[1:])), "no earlier round met the rule"
    assert gains[-1] <= tol * abs(early[-1])


def test_the_cross_term_picks_the_permutation_the_squared_distances_pick():
    x = fusion_example_input("resnet18")
    a, b = (full_state(make_fusion_member("resnet18", s).eval()) for s in range(2))
    graph = fusion.channel_groups(make_fusion_member("resnet18", 0), x)
    n = len(graph.groups)
    full, cross = WeightCost(graph, a, b, incoming_only=False), WeightCost(graph, a, b, incoming_only=False)
    for gi in range(n):
        assert torch.equal(
            assignment(full(gi, [None] * n, [0] * n)),
            assignment(cross.cross(gi, [None] * n, [0] * n), maximize=True),
        )


def test_assignment_matches_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    import itertools

    for _ in range(20):
        c = torch.randn(6, 6, generator=g, dtype=torch.float64)
        best = max(
            itertools.permutations(range(6)), key=lambda p: float(c[torch.arange(6), torch.tensor(p)].sum())
        )
        assert assignment(c, maximize=True).tolist() == list(best)
        kept = c.clone()
        assignment(c)
        assert torch.equal(c, kept), "the caller's matrix is left alone"


def test_bad_tolerance():
    members, x = _members(3, width=8)
    for tol in (-0.1, 1.0, True, "1e-6"):
        with pytest.raises(FusionError, match="tol"):
            fusion.fuse(members, "weight_matching", example_inputs=x, tol=tol)


def test_incremental_cross_terms_equal_the_recomputed_ones():
    """A kept term updated from the positions a few swaps moved equals the term computed afresh at the
    same plans, through more swaps than the refresh interval (so both the updates and the refresh run)."""
    members, x = _members(2)
    graph = fusion.channel_groups(members[0], x)
    a, b = (full_state(m) for m in members)
    n = len(graph.groups)
    gen = torch.Generator().manual_seed(0)
    plans, versions = [None] * n, [0] * n
    cost = WeightCost(graph, a, b, incoming_only=False, incremental=True)
    updated = 0
    for step in range(2 * WeightCost.REFRESH + 3):
        h = step % n
        perm = plans[h].clone() if plans[h] is not None else torch.arange(graph.groups[h].n_units)
        i, j = torch.randperm(perm.numel(), generator=gen)[:2].tolist()
        perm[[i, j]] = perm[[j, i]]
        plans[h], versions[h] = perm, versions[h] + 1
        for gi in range(n):
            got = cost.cross(gi, plans, versions)
            if got is None:
                continue
            fresh = WeightCost(graph, a, b, incoming_only=False).cross(gi, plans, versions)
            torch.testing.assert_close(got, fresh, rtol=1e-5, atol=1e-5)
        updated = max([updated, *(entry[3] for entry in cost._terms.values())])
    assert updated > 0, "the terms must have been updated, not only recomputed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_many_leaves_the_members_alone(dtype):
    """The running sum starts from a copy of member 0's tensors, also when they are already float64."""
    members, x = _members(3, width=16)
    members = [m.to(dtype) for m in members]
    before = [{n: t.clone() for n, t in m.state_dict().items()} for m in members]
    fusion.fuse(members, "weight_matching", example_inputs=x.to(dtype))
    for m, kept in zip(members, before):
        assert all(torch.equal(t, kept[n]) for n, t in m.state_dict().items())
