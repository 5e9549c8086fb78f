"""Optimal-Transport fusion: oracles (undoing permutations), a real-data comparison and option checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import FUSION_BIG, FUSION_SMALL

import fusion
from fusion.build import build_model
from fusion.state import full_state

# every architecture of the fusion core; the big ones with two members only
ARCHS_3, ARCHS_2 = FUSION_SMALL, FUSION_BIG


def _permuted_copy(model, example, seed):
    graph = fusion.channel_groups(model, example)
    state = full_state(model)
    new = graph.assemble([state], graph.random_permutation(torch.Generator().manual_seed(seed)))
    moved = [n for n in state if not torch.equal(state[n], new[n])]
    assert moved, "the permutation must actually move some tensors"
    return build_model(model, new)


def _rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch,n", [(a, 2) for a in ARCHS_3 + ARCHS_2] + [(a, 3) for a in ARCHS_3])
def test_ot_undoes_random_permutations(fusion_zoo, arch, n):
    """B, C are A with every channel group permuted at random (the same function, other weights): exact OT
    must find the permutations back, so fusing gives A's function, while plain averaging does not."""
    x = fusion_zoo.example(arch)
    a = fusion_zoo.member(arch, 0)
    members = [a] + [_permuted_copy(a, x, seed) for seed in range(1, n)]
    with torch.no_grad():
        ref = a(x)
        fused = fusion.fuse(members, "ot", example_inputs=x, solver="emd")
        assert _rel_err(fused(x), ref) < 1e-4
        fused_state = fused.state_dict()
        for name, t in a.state_dict().items():
            if t.is_floating_point():
                torch.testing.assert_close(fused_state[name], t, rtol=1e-4, atol=1e-5)
        if arch in ("mlp", "resnet18"):
            avg = fusion.fuse(members, "avg")
            assert _rel_err(avg(x), ref) > 1e-2  # the oracle can fail: averaging unaligned weights is wrong


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:1400], perm[1400:]
    return x[tr], y[tr], x[te], y[te]


def _train_mlp(seed, x, y, width=64, steps=300):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def digits_members():
    xtr, ytr, xte, yte = _digits()
    members = [_train_mlp(seed, xtr, ytr) for seed in (1, 2)]
    return members, xtr, xte, yte


def test_ot_beats_vanilla_averaging_on_digits(digits_members):
    members, xtr, xte, yte = digits_members
    accs = [_acc(m, xte, yte) for m in members]
    assert min(accs) > 0.9, accs  # the members are real, trained models
    acc_avg = _acc(fusion.fuse(members, "avg"), xte, yte)
    acc_ot = _acc(fusion.fuse(members, "ot"), xte, yte)
    acc_acts = _acc(fusion.fuse(members, "ot", ground_metric="activations", data=xtr[:512]), xte, yte)
    assert acc_ot > acc_avg + 0.1, (acc_ot, acc_avg)
    assert acc_acts > acc_avg + 0.1, (acc_acts, acc_avg)


def test_sinkhorn_approaches_exact_solver(digits_members):
    """Smaller entropic regularisation: plans closer to the exact permutation, fused models closer to the
    exactly fused one."""
    from fusion.methods.ot import solve_plan

    gen = torch.Generator().manual_seed(0)
    cost = torch.rand(40, 40, generator=gen) * 0.5 + 1.0
    planted = torch.randperm(40, generator=gen)
    # a clear optimum: with near-ties any soft plan spreads its mass, whatever the regularisation
    cost[torch.arange(40), planted] = torch.rand(40, generator=gen) * 0.1
    exact = torch.eye(40)[solve_plan(cost, "emd", 0.0)]
    assert torch.equal(solve_plan(cost, "emd", 0.0), planted)
    plan_errs = [float((solve_plan(cost, "sinkhorn", reg) - exact).abs().max()) for reg in (0.1, 0.01, 0.001)]
    assert plan_errs[0] > plan_errs[1] > plan_errs[2] and plan_errs[2] < 0.05, plan_errs

    members, _, xte, _ = digits_members
    with torch.no_grad():
        exact_out = fusion.fuse(members, "ot", solver="emd")(xte)
        errs = [
            _rel_err(fusion.fuse(members, "ot", solver="sinkhorn", reg=reg)(xte), exact_out)
            for reg in (0.5, 0.05, 0.005, 0.001)
        ]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.1, errs


def test_sinkhorn_plan_is_normalised_by_marginal():
    from fusion.methods.ot import solve_plan

    cost = torch.rand(6, 6)
    plan = solve_plan(cost, "sinkhorn", 0.1)
    torch.testing.assert_close(plan.sum(1), torch.ones(6), atol=1e-4, rtol=0)
    perm = solve_plan(cost, "emd", 0.0)
    assert perm.dim() == 1 and sorted(perm.tolist()) == list(range(6))
    # the exact plan minimises the total cost over all permutations of a small problem
    import itertools

    best = min(sum(float(cost[i, p[i]]) for i in range(6)) for p in itertools.permutations(range(6)))
    assert abs(sum(float(cost[i, perm[i]]) for i in range(6)) - best) < 1e-5


def test_ot_anchor_option_and_members_untouched(digits_members):
    members, _, xte, _ = digits_members
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    f0 = fusion.fuse(members, "ot", anchor=0)
    f1 = fusion.fuse(members, "ot", anchor=1)
    # aligned to a different anchor: the same function up to a permutation of hidden units, so outputs agree
    with torch.no_grad():
        assert _rel_err(f0(xte), f1(xte)) < 1e-4
        assert not torch.equal(f0[0].weight, f1[0].weight) or torch.equal(
            members[0][0].weight, members[1][0].weight
        )
    for m, b in zip(members, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k])


@pytest.mark.parametrize(
    "options,match",
    [
        ({"solver": "sinkhorn", "reg": -1.0}, "reg"),
        ({"solver": "sinkhorn", "reg": 0}, "reg"),
        ({"solver": "hungarian"}, "unknown OT solver 'hungarian'"),
        ({"ground_metric": "activations"}, "needs a data batch"),
        ({"ground_metric": "gradients"}, "unknown ground_metric"),
        ({"anchor": 5}, "anchor"),
        ({"max_iter": 0}, "max_iter"),
        ({"temperature": 1}, "unknown option 'temperature'"),
    ],
)
def test_ot_bad_options_raise_clear_error(digits_members, options, match):
    members = digits_members[0]
    with pytest.raises(fusion.FusionError, match=match):
        fusion.fuse(members, "ot", **options)


def test_assignment_fast_path_is_the_exact_ot_optimum():
    """Between equal widths the exact plan is a linear assignment: same optimum as ot.emd, a permutation."""
    import numpy as np
    import ot

    from fusion.methods.ot import solve_plan

    gen = torch.Generator().manual_seed(0)
    for n in (1, 5, 37, 120):
        cost = torch.rand(n, n, generator=gen, dtype=torch.float64) * 10
        perm = solve_plan(cost, "emd", 0.01)
        assert perm.dtype == torch.long and torch.equal(perm.sort().values, torch.arange(n))
        fast = float(cost[torch.arange(n), perm].sum()) / n
        w = np.full(n, 1.0 / n)
        exact = float(ot.emd2(w, w, cost.numpy()))
        assert fast == pytest.approx(exact, rel=1e-9, abs=1e-12)
    # unequal widths still go through ot.emd: a soft plan whose rows are distributions
    plan = solve_plan(torch.rand(4, 6, generator=gen), "emd", 0.01)
    assert plan.shape == (4, 6) and torch.allclose(plan.sum(1), torch.ones(4), atol=1e-5)


def test_weight_cost_reuses_only_what_the_changed_plans_leave_intact(fusion_zoo):
    """The coordinate descent's cost keeps per-layer terms and the member's unit norms between visits; after
    any sequence of plan changes (permutations and a soft plan) it must equal a cost computed from scratch,
    and it may answer "unchanged" only when no plan it depends on has changed."""
    from fusion.methods.ot import WeightCost, dependencies

    arch = "grouped"  # a residual stream, grouped and depthwise convolutions
    x = fusion_zoo.example(arch)
    a, b = fusion_zoo.member(arch, 0), fusion_zoo.member(arch, 1)
    graph = fusion.channel_groups(a, x)
    sa, sb = full_state(a), full_state(b)
    n = len(graph.groups)
    cost = WeightCost(graph, sa, sb, incoming_only=False)
    assert any(keep for slots in cost._slots for *_, keep in slots), "the test must exercise kept terms"
    plans, versions = [None] * n, [0] * n
    gen = torch.Generator().manual_seed(0)
    last_seen: dict[int, tuple] = {}
    for step in range(8 * n):
        gi = step % n
        got = cost(gi, plans, versions)
        key = tuple(versions[h] for h in sorted(dependencies(graph, gi, False)))
        if got is None:
            assert last_seen.get(gi) == key, f"group {gi} reported unchanged after a dependency changed"
        else:
            fresh = WeightCost(graph, sa, sb, incoming_only=False)(gi, plans, versions)
            torch.testing.assert_close(got, fresh, rtol=1e-5, atol=1e-3)
        last_seen[gi] = key
        h = int(torch.randint(n, (1,), generator=gen))  # change one plan
        u = graph.groups[h].n_units
        if step == 4 * n and all(s.positions.min() >= 0 for s in graph.groups[h].slots):
            plans[h] = torch.softmax(torch.randn(u, u, generator=gen), 1)  # a soft plan (sinkhorn)
        else:
            plans[h] = torch.randperm(u, generator=gen)
        versions[h] += 1
