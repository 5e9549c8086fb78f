"""Statistics repair oracles: reset is the cumulative recalibration computed by hand; REPAIR gives every
repaired channel exactly the statistics of its sources in the members; the input is never touched."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fusion
from fusion import FusionError


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )  # fmt: skip
    # members with distinct, non-trivial statistics, as trained ones have
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _batches(shape, sizes=(16, 9, 20), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, *shape, generator=gen) * 1.5 + 0.3 for n in sizes]


def _stats(model, batches, names, where="out"):
    """Per-channel mean and std (population) at the output (or input) of the named modules, eval mode."""
    mods = dict(model.named_modules())
    acc = {n: [] for n in names}
    hooks = []
    for n in names:
        if where == "out":
            hooks.append(mods[n].register_forward_hook(lambda m, a, o, n=n: acc[n].append(o.detach())))
        else:
            hooks.append(mods[n].register_forward_pre_hook(lambda m, a, n=n: acc[n].append(a[0].detach())))
    model.eval()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    out = {}
    for n, ts in acc.items():
        t = torch.cat([x.movedim(1, -1).reshape(-1, x.shape[1]) for x in ts]).double()
        out[n] = (t.mean(0), t.std(0, unbiased=False))
    return out


def test_reset_is_the_hand_computed_cumulative_recalibration():
    members = [_cnn(0), _cnn(1)]
    fused = fusion.fuse(members, "avg")
    batches = _batches((3, 6, 6))
    repaired = fusion.repair(fused, batches, mode="reset")

    # by hand: the BatchNorm inputs of each batch in train mode (batch statistics), averaged over batches
    ref = copy.deepcopy(fused).train()
    seen = {"1": [], "4": []}
    hooks = [ref[int(n)].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0])) for n in seen]
    with torch.no_grad():
        for x in batches:
            ref(x)
    for h in hooks:
        h.remove()
    for n, xs in seen.items():
        means = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs])
        variances = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in xs])
        bn = repaired[int(n)]
        assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-5)
        assert torch.allclose(bn.running_var, variances.mean(0), atol=1e-5)
        assert int(bn.num_batches_tracked) == len(batches)
        assert bn.momentum == fused[int(n)].momentum  # restored
    assert not repaired.training


def test_reset_accepts_pairs_and_generators_and_leaves_the_input_alone():
    members = [_cnn(0), _cnn(1)]
    fused = fusion.fuse(members, "avg").train()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    batches = _batches((3, 6, 6))
    a = fusion.repair(fused, ((x, torch.zeros(len(x), dtype=torch.long)) for x in batches))
    b = fusion.repair(fused, batches)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert fused.training, "the input's mode is untouched"
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} of the input changed"
    fresh = _cnn(7)
    fresh.load_state_dict(a.state_dict(), strict=True)


def test_reset_without_batchnorm_is_an_unchanged_copy():
    fused = fusion.fuse([_mlp(0), _mlp(1)], "avg")
    with pytest.warns(UserWarning, match="nothing to reset"):
        out = fusion.repair(fused, _batches((6,)))
    assert out is not fused
    for k, v in fused.state_dict().items():
        assert torch.equal(v, out.state_dict()[k])


def _targets_from_sources(fused, members, batches, layer_of_group, where):
    """Expected per fused channel: weighted mean of its sources' statistics (from the provenance)."""
    prov = fusion.provenance_of(fused)
    graph = fusion.channel_groups(members[0], batches[0][:2])
    expected = {}
    for gi, g in enumerate(graph.groups):
        name = layer_of_group.get(g.name)
        if name is None:
            continue
        stats = [_stats(m, batches, [name], where)[name] for m in members]
        k, m, u, w = prov.group_sources(gi, g.n_units)
        n_fused = int(k.max()) + 1
        mean = torch.zeros(n_fused, dtype=torch.float64)
        std = torch.zeros(n_fused, dtype=torch.float64)
        total = torch.zeros(n_fused, dtype=torch.float64)
        for ki, mi, ui, wi in zip(k.tolist(), m.tolist(), u.tolist(), w.tolist()):
            mean[ki] += wi * stats[mi][0][ui]
            std[ki] += wi * stats[mi][1][ui]
            total[ki] += wi
        expected[name] = (mean / total, std / total)
    return expected


@pytest.mark.parametrize("method", ["avg", "ot", "nt"])
def test_repair_meets_the_targets_mlp(method):
    members = [_mlp(0), _mlp(1), _mlp(2)]
    fused = fusion.fuse(members, method)
    batches = _batches((6,))
    repaired = fusion.repair(fused, batches, members=members, mode="repair")
    expected = _targets_from_sources(fused, members, batches, {"0": "0", "2": "2"}, "out")
    got = _stats(repaired, batches, list(expected))
    raw = _stats(fused, batches, list(expected))
    for name, (t_mean, t_std) in expected.items():
        assert torch.allclose(got[name][0], t_mean, atol=1e-4), name
        assert torch.allclose(got[name][1], t_std, rtol=1e-4, atol=1e-5), name
    if method == "avg":  # averaging collapses variance: the repair must have had something to do
        assert not torch.allclose(raw["2"][1], expected["2"][1], rtol=1e-2)


@pytest.mark.parametrize("method", ["avg", "ot", "nt"])
def test_repair_meets_the_targets_after_batchnorm(method):
    members = [_cnn(0), _cnn(1)]
    fused = fusion.fuse(members, method, example_inputs=torch.randn(1, 3, 6, 6))
    batches = _batches((3, 6, 6))
    repaired = fusion.repair(fused, batches, members=members, mode="repair")
    # statistics after each BatchNorm (outputs of modules 1 and 4, before the ReLU), members in eval mode
    expected = _targets_from_sources(fused, members, batches, {"0": "1", "3": "4"}, "out")
    got = _stats(repaired, batches, list(expected))
    for name, (t_mean, t_std) in expected.items():
        assert torch.allclose(got[name][0], t_mean, atol=1e-4), name
        assert torch.allclose(got[name][1], t_std, rtol=1e-4, atol=1e-5), name
    fresh = _cnn(5)
    fresh.load_state_dict(repaired.state_dict(), strict=True)


def test_repair_on_an_interpolation_uses_its_weights():
    a, b = _mlp(0), _mlp(1)
    mid = fusion.interpolate(a, b, 0.25) if hasattr(fusion, "interpolate") else None
    if mid is None:
        pytest.skip("fusion.interpolate not available")
    batches = _batches((6,))
    repaired = fusion.repair(mid, batches, members=[a, b], mode="repair")
    sa, sb = _stats(a, batches, ["2"])["2"], _stats(b, batches, ["2"])["2"]
    got = _stats(repaired, batches, ["2"])["2"]
    assert torch.allclose(got[1], 0.75 * sa[1] + 0.25 * sb[1], rtol=1e-4, atol=1e-5)


def test_repair_errors():
    members = [_mlp(0), _mlp(1)]
    fused = fusion.fuse(members, "avg")
    batches = _batches((6,))
    with pytest.raises(FusionError, match="at least one batch"):
        fusion.repair(fused, [])
    with pytest.raises(FusionError, match="unknown repair mode 'fix'"):
        fusion.repair(fused, batches, mode="fix")
    with pytest.raises(FusionError, match="needs the members"):
        fusion.repair(fused, batches, mode="repair")
    with pytest.raises(FusionError, match="batch 1 is a str"):
        fusion.repair(fused, [batches[0], "x"])
    with pytest.raises(FusionError, match="iterable"):
        fusion.repair(fused, batches[0])
    other = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(FusionError, match="members differ"):
        fusion.repair(fused, batches, members=[members[0], other], mode="repair")
    with pytest.raises(FusionError, match="fused from 2 members but 3"):
        fusion.repair(fused, batches, members=[*members, _mlp(3)], mode="repair")
    with pytest.raises(FusionError, match="no fusion provenance"):
        fusion.repair(_mlp(4), batches, members=members, mode="repair")


def test_repair_helps_averaged_digits_cnn():
    """The point of REPAIR: averaged BatchNorm members recover accuracy without any training."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    xtr, ytr, xte, yte = x[:1400], y[:1400], x[1400:], y[1400:]

    def member(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for _ in range(4):
            for i in torch.randperm(1400).split(64):
                opt.zero_grad()
                nn.functional.cross_entropy(m(xtr[i]), ytr[i]).backward()
                opt.step()
        return m.eval()

    def acc(m):
        with torch.no_grad():
            return float((m.eval()(xte).argmax(1) == yte).float().mean())

    members = [member(0), member(1)]
    fused = fusion.fuse(members, "ot", example_inputs=xtr[:2])
    batches = list(xtr.split(200))
    reset = fusion.repair(fused, batches, mode="reset")
    repaired = fusion.repair(fused, batches, members=members, mode="repair")
    assert acc(reset) > acc(fused) + 0.05 or acc(fused) > 0.9
    assert acc(repaired) > acc(fused) + 0.05 or acc(fused) > 0.9
