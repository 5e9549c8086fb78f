"""Oracle 4: NT keeps exactly the units its definition says ("concatenate, then prune per layer").

Two independent references:

* a hand-built MLP 4-3-3-2 with hand-chosen integer weights, whose per-neuron importances are written out
  below and whose kept neurons are listed by hand, for joint, iterative and hierarchical NT;
* torch-pruning itself, pruning the explicitly concatenated model (MLP and resnet18).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import fusion_example_input, make_fusion_member

import fusion


def T(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# Three members of Linear(4,3)-ReLU-Linear(3,3)-ReLU-Linear(3,2). Squared norms written next to the rows
# and under the columns, because the importance of a hidden neuron is the mean, over the weights of its
# group, of the squared L2 norm of its slice: (|row in the producing layer|^2 + |column in the consumer|^2)/2,
# where the classifier's column in the concatenated model is scaled by 1/N (so its norm^2 by 1/N^2).
HAND = {
    "A": {
        "w1": T([[1, 0, 0, 0], [0, 3, 0, 0], [0, 0, 2, 0]]),  # rows: 1, 9, 4
        "b1": T([0.1, 0.2, 0.3]),
        "w2": T([[2, 0, 0], [0, 1, 0], [1, 0, 2]]),  # rows: 4, 1, 5; columns: 5, 1, 4
        "b2": T([0.4, 0.5, 0.6]),
        "w3": T([[2, 0, 4], [0, 2, 0]]),  # columns: 4, 4, 16
        "b3": T([1.0, -1.0]),
    },
    "B": {
        "w1": T([[0, 0, 0, 2], [1, 1, 0, 0], [0, 0, 0, 3]]),  # rows: 4, 2, 9
        "b1": T([1.1, 1.2, 1.3]),
        "w2": T([[1, 1, 0], [0, 0, 3], [0, 2, 0]]),  # rows: 2, 9, 4; columns: 1, 5, 9
        "b2": T([1.4, 1.5, 1.6]),
        "w3": T([[0, 2, 0], [2, 0, 6]]),  # columns: 4, 4, 36
        "b3": T([2.0, 0.0]),
    },
    "C": {
        "w1": T([[2, 2, 0, 0], [0, 0, 1, 0], [0, 1, 0, 3]]),  # rows: 8, 1, 10
        "b1": T([2.1, 2.2, 2.3]),
        "w2": T([[0, 0, 1], [3, 0, 0], [0, 2, 2]]),  # rows: 1, 9, 8; columns: 9, 4, 5
        "b2": T([2.4, 2.5, 2.6]),
        "w3": T([[2, 1, 0], [2, 0, 3]]),  # columns: 8, 1, 9
        "b3": T([3.0, 1.0]),
    },
}


def hand_mlp(key: str) -> nn.Sequential:
    w = HAND[key]
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        for i, layer in zip((1, 2, 3), (model[0], model[2], model[4])):
            layer.weight.copy_(w[f"w{i}"])
            layer.bias.copy_(w[f"b{i}"])
    return model.eval()


def concatenate(weights: list[dict]) -> dict:
    """The wide model of the definition, built by hand: stacked first layer, block-diagonal hidden layer,
    classifier columns stacked and scaled by 1/N, classifier bias averaged."""
    n = len(weights)
    return {
        "w1": torch.cat([w["w1"] for w in weights]),
        "b1": torch.cat([w["b1"] for w in weights]),
        "w2": torch.block_diag(*[w["w2"] for w in weights]),
        "b2": torch.cat([w["b2"] for w in weights]),
        "w3": torch.cat([w["w3"] for w in weights], dim=1) / n,
        "b3": sum(w["b3"] for w in weights) / n,
    }


def keep(wide: dict, k1: list[int], k2: list[int]) -> dict:
    """The wide model with only hidden neurons ``k1`` (layer 1) and ``k2`` (layer 2)."""
    return {
        "w1": wide["w1"][k1],
        "b1": wide["b1"][k1],
        "w2": wide["w2"][k2][:, k1],
        "b2": wide["b2"][k2],
        "w3": wide["w3"][:, k2],
        "b3": wide["b3"],
    }


def weights_of(model: nn.Sequential) -> dict:
    return {
        f"{kind}{i}": getattr(layer, "weight" if kind == "w" else "bias").detach()
        for i, layer in zip((1, 2, 3), (model[0], model[2], model[4]))
        for kind in ("w", "b")
    }


def assert_weights(fused: nn.Module, expected: dict) -> None:
    got = weights_of(fused)
    for name in ("w1", "b1", "w2", "b2"):
        assert torch.equal(got[name], expected[name]), (name, got[name], expected[name])
    # the classifier is scaled by 1/N: equal up to the rounding of that product
    for name in ("w3", "b3"):
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=0), name


X4 = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))


def test_hand_mlp_importances_are_the_definition():
    """The importances written by hand (A and B fused, N=2) are what the library scores."""
    models = [hand_mlp("A"), hand_mlp("B")]
    g = fusion.channel_groups(models[0], X4)
    assert len(g.groups) == 2
    states = [fusion.state.full_state(m) for m in models]
    by_root = {grp.name: gi for gi, grp in enumerate(g.groups)}
    # layer 1, neuron j: (|w1 row j|^2 + |w2 column j|^2) / 2
    hand_h1 = {"A": [(1 + 5) / 2, (9 + 1) / 2, (4 + 4) / 2], "B": [(4 + 1) / 2, (2 + 5) / 2, (9 + 9) / 2]}
    # layer 2, neuron k: (|w2 row k|^2 + |w3 column k|^2 / N^2) / 2
    hand_h2 = {
        "A": [(4 + 4 / 4) / 2, (1 + 4 / 4) / 2, (5 + 16 / 4) / 2],
        "B": [(2 + 4 / 4) / 2, (9 + 4 / 4) / 2, (4 + 36 / 4) / 2],
    }
    for key, state in zip("AB", states):
        scores = g.unit_importance(state, 2)
        assert scores[by_root["0"]].tolist() == pytest.approx(hand_h1[key])
        assert scores[by_root["2"]].tolist() == pytest.approx(hand_h2[key])


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize(
    "shape, dims",
    [((300, 200), [0, 1]), ((64, 40, 3, 3), [0, 1]), ((10, 50000), [1]), ((7,), [0]), ((30, 5, 8), [1, 2])],
)
def test_power_sums_read_once_equal_the_definition(shape, dims, p):
    """One read of a weight gives every slotted dimension's ``sum |w|^p`` (chunked; rows wider than a chunk)."""
    from fusion.groups import power_sums

    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    got = power_sums(t, dims, p)
    assert sorted(got) == sorted(dims)
    for d in dims:
        other = [o for o in range(t.dim()) if o != d]
        want = t.abs().pow(p).sum(dim=other) if other else t.abs().pow(p)
        torch.testing.assert_close(got[d], want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("threads", [2, 3])
def test_chunk_loops_in_row_parts_on_threads_equal_the_definition(monkeypatch, threads):
    """With several threads (forced: the tests run on one, and the loops only go parallel above 4 M
    elements) importance sums and block gathers split into row parts, one thread each: same values as the
    definition, the same bits on every call, and the caller's thread setting untouched."""
    from fusion import groups

    monkeypatch.setattr(groups, "_PARALLEL_ELEMENTS", 1)
    monkeypatch.setattr(groups, "_SERIAL_ELEMENTS", 256)  # many chunks per part
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        t = torch.randn(97, 13, 3, 3, generator=gen)
        got = groups.power_sums(t, [0, 1], 2.0)
        again = groups.power_sums(t, [0, 1], 2.0)
        for d in (0, 1):
            other = [o for o in range(4) if o != d]
            torch.testing.assert_close(got[d], t.square().sum(dim=other), rtol=1e-5, atol=1e-5)
            assert torch.equal(got[d], again[d])
        w = torch.randn(120, 50, generator=gen)
        rows, cols = torch.randperm(120, generator=gen)[:77], torch.randperm(50, generator=gen)[:31]
        dst = torch.full((77, 31), float("nan"), dtype=torch.float64)
        groups._gather_block(dst, w, rows, cols, 0.5)
        assert torch.equal(dst, (w[rows][:, cols] * 0.5).double())
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_hand_mlp_joint_two_members():
    # concatenated layer 1 (A0 A1 A2 B0 B1 B2): 3, 5, 4, 2.5, 3.5, 9   -> keep B2, A1, A2: [1, 2, 5]
    # concatenated layer 2:                    2.5, 1, 4.5, 1.5, 5, 6.5 -> keep B2, B1, A2: [2, 4, 5]
    models = [hand_mlp("A"), hand_mlp("B")]
    fused = fusion.fuse(models, "nt", example_inputs=X4)
    expected = keep(concatenate([HAND["A"], HAND["B"]]), [1, 2, 5], [2, 4, 5])
    assert_weights(fused, expected)
    # zeros between members: kept layer-2 neuron B1 reads nothing from kept layer-1 neurons A1, A2
    assert torch.equal(fused[2].weight[1, :2], torch.zeros(2))
    assert torch.equal(fused[4].bias, (HAND["A"]["b3"] + HAND["B"]["b3"]) / 2)


def test_assemble_writes_every_entry_even_when_a_member_loses_a_whole_group(monkeypatch):
    """Layer 1 keeps only A's neurons, layer 2 keeps one of A's and two of B's: B's rows of w2 connect to no
    kept column and must be the zeros of the block-diagonal concatenation. Uninitialised memory is poisoned
    with NaN, so an entry the assembly forgets to write cannot pass as a zero by chance."""
    real_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *a, **k: real_new_empty(self, *a, **k).fill_(float("nan"))
    )
    models = [hand_mlp("A"), hand_mlp("B")]
    g = fusion.channel_groups(models[0], X4)
    states = [fusion.state.full_state(m) for m in models]
    by_root = {grp.name: gi for gi, grp in enumerate(g.groups)}
    selection = [None, None]
    selection[by_root["0"]] = (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]))
    selection[by_root["2"]] = (torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    model.load_state_dict(g.assemble(states, selection))
    assert_weights(model, keep(concatenate([HAND["A"], HAND["B"]]), [0, 1, 2], [0, 4, 5]))


def test_assemble_into_given_tensors_overwrites_every_entry():
    """``assemble(..., into=)`` (the self-check's reuse of its float64 copy) writes the given tensors, and every
    entry of them: filled with NaN first, the result equals a fresh assembly."""
    models = [hand_mlp("A"), hand_mlp("B")]
    g = fusion.channel_groups(models[0], X4)
    states = [fusion.state.full_state(m) for m in models]
    by_root = {grp.name: gi for gi, grp in enumerate(g.groups)}
    selection = [None, None]
    selection[by_root["0"]] = (torch.tensor([0, 0, 0]), torch.tensor([0, 1, 2]))
    selection[by_root["2"]] = (torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    fresh = g.assemble(states, selection, dtype=torch.float64)
    into = {k: torch.full_like(v, float("nan")) for k, v in fresh.items()}
    out = g.assemble(states, selection, dtype=torch.float64, into=into)
    for name, t in out.items():
        assert t.data_ptr() == into[name].data_ptr() and torch.equal(t, fresh[name]), name
    with pytest.raises(ValueError, match="wrong shape or type"):
        g.assemble(states, selection, dtype=torch.float64, into={k: v.float() for k, v in into.items()})


def test_hand_mlp_joint_three_members():
    # layer 1 (A0..A2 B0..B2 C0..C2): 3, 5, 4, 2.5, 3.5, 9, 8.5, 2.5, 7.5 -> keep [5, 6, 8]
    # layer 2 (classifier columns / 3): A: (4+4/9)/2, (1+4/9)/2, (5+16/9)/2 = 2.22, 0.72, 3.39;
    #   B: (2+4/9)/2, (9+4/9)/2, (4+36/9)/2 = 1.22, 4.72, 4; C: (1+8/9)/2, (9+1/9)/2, (8+9/9)/2 = 0.94, 4.56, 4.5
    #   -> keep B1, C1, C2: [4, 7, 8]
    models = [hand_mlp(k) for k in "ABC"]
    fused = fusion.fuse(models, "nt", example_inputs=X4)
    assert_weights(fused, keep(concatenate([HAND[k] for k in "ABC"]), [5, 6, 8], [4, 7, 8]))


def test_hand_mlp_iterative():
    # step 1 is the joint A+B fusion above: F = keep(concat(A, B), [1, 2, 5], [2, 4, 5]), i.e.
    #   F.w1 rows 9, 4, 9; F.w2 = [[0,2,0],[0,0,3],[0,0,0]] (rows 4, 9, 0; columns 0, 4, 9);
    #   F.w3 = [[2,1,0],[0,0,3]] (columns 4, 1, 9)
    # step 2, F with C (N=2): layer 1: F: 4.5, 4, 9; C: 8.5, 2.5, 7.5 -> keep [2, 3, 5]
    #   layer 2: F: (4+4/4)/2, (9+1/4)/2, (0+9/4)/2 = 2.5, 4.625, 1.125; C: (1+8/4)/2, (9+1/4)/2, (8+9/4)/2
    #   = 1.5, 4.625, 5.125 -> keep [1, 4, 5]
    models = [hand_mlp(k) for k in "ABC"]
    fused = fusion.fuse(models, "nt_iterative", example_inputs=X4)
    f = keep(concatenate([HAND["A"], HAND["B"]]), [1, 2, 5], [2, 4, 5])
    assert f["w2"].tolist() == [[0, 2, 0], [0, 0, 3], [0, 0, 0]]  # the hand notes above
    assert_weights(fused, keep(concatenate([f, HAND["C"]]), [2, 3, 5], [1, 4, 5]))


def test_hand_mlp_hierarchical():
    # merge-sort order for [A, B, C]: fuse(A, fuse(B, C))
    # G = B with C (N=2): layer 1: B: 2.5, 3.5, 9; C: 8.5, 2.5, 7.5 -> keep [2, 3, 5]
    #   layer 2: B: 1.5, 5, 6.5; C: (1+8/4)/2, (9+1/4)/2, (8+9/4)/2 = 1.5, 4.625, 5.125 -> keep [1, 2, 5]
    # so G.w1 rows: B2, C0, C2 (9, 8, 10);
    #   G.w2 = rows (B1, B2, C2) x columns (B2, C0, C2) = [[3,0,0],[0,0,0],[0,0,2]] (rows 9, 0, 4; columns 9, 0, 4);
    #   G.w3 = [[2,0,0],[0,6,3]] / 2 = [[1,0,0],[0,3,1.5]] (columns 1, 9, 2.25)
    # A with G (N=2): layer 1: A: 3, 5, 4; G: (9+9)/2, (8+0)/2, (10+4)/2 = 9, 4, 7 -> keep [1, 3, 5]
    #   layer 2: A: 2.5, 1, 4.5; G: (9+1/4)/2, (0+9/4)/2, (4+2.25/4)/2 = 4.625, 1.125, 2.28 -> keep [0, 2, 3]
    models = [hand_mlp(k) for k in "ABC"]
    fused = fusion.fuse(models, "nt_hierarchical", example_inputs=X4)
    g = keep(concatenate([HAND["B"], HAND["C"]]), [2, 3, 5], [1, 2, 5])
    assert g["w2"].tolist() == [[3, 0, 0], [0, 0, 0], [0, 0, 2]]  # the hand notes above
    assert g["w3"].tolist() == [[1, 0, 0], [0, 3, 1.5]]
    assert_weights(fused, keep(concatenate([HAND["A"], g]), [1, 3, 5], [0, 2, 3]))


def test_hand_mlp_variants_differ():
    """With three members the three NT variants choose differently (else the tests above prove little)."""
    models = [hand_mlp(k) for k in "ABC"]
    outs = [
        torch.cat([t.reshape(-1) for t in fusion.fuse(models, m, example_inputs=X4).state_dict().values()])
        for m in ("nt", "nt_iterative", "nt_hierarchical")
    ]
    assert (
        not torch.equal(outs[0], outs[1])
        and not torch.equal(outs[1], outs[2])
        and not torch.equal(outs[0], outs[2])
    )


# ---------------------------------------------------------------------------- torch-pruning as reference
def _tp_prune(wide: nn.Module, x: torch.Tensor, classifier: nn.Module, ratio: float) -> nn.Module:
    """Prune ``wide`` per layer with torch-pruning's own pruner and magnitude importance (p=2)."""
    import torch_pruning as tp

    pruner = tp.pruner.BasePruner(
        wide,
        x,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        global_pruning=False,
        ignored_layers=[classifier],
    )
    with torch.enable_grad():
        pruner.step()
    return wide.eval()


def _assert_same_state(fused: nn.Module, reference: nn.Module) -> None:
    ref = reference.state_dict()
    got = fused.state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    for name, t in ref.items():
        torch.testing.assert_close(
            got[name], t, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}"
        )


def _concatenated_mlp(members: list[nn.Sequential]) -> nn.Sequential:
    """The wide MLP of the definition, built by hand from the members of ``make_fusion_member("mlp")``."""
    n = len(members)
    lin = [[m[i] for m in members] for i in (1, 3, 5)]
    wide = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32 * n),
        nn.ReLU(),
        nn.Linear(32 * n, 24 * n),
        nn.ReLU(),
        nn.Linear(24 * n, 10),
    )
    with torch.no_grad():
        wide[1].weight.copy_(torch.cat([layer.weight for layer in lin[0]]))
        wide[1].bias.copy_(torch.cat([layer.bias for layer in lin[0]]))
        wide[3].weight.copy_(torch.block_diag(*[layer.weight for layer in lin[1]]))
        wide[3].bias.copy_(torch.cat([layer.bias for layer in lin[1]]))
        wide[5].weight.copy_(torch.cat([layer.weight for layer in lin[2]], dim=1) / n)
        wide[5].bias.copy_(sum(layer.bias for layer in lin[2]) / n)
    return wide.eval()


@pytest.mark.parametrize("n", [2, 3])
def test_nt_matches_torch_pruning_on_mlp(n):
    members = [make_fusion_member("mlp", seed) for seed in range(n)]
    x = fusion_example_input("mlp")
    wide = _concatenated_mlp(members)
    with torch.no_grad():  # the hand-built wide model is the ensemble, and NT at sparsity 0 is that model
        torch.testing.assert_close(wide(x), fusion.ensemble(members)(x), rtol=1e-5, atol=1e-6)
        _assert_same_state(fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0), wide)
    fused = fusion.fuse(members, "nt", example_inputs=x)
    # torch-pruning keeps int(width * (1 - ratio)) channels; in floats 1 - (1 - 1/3) is a hair below 1/3,
    # which would drop one channel too many, so the ratio is nudged down by far less than one channel
    _assert_same_state(fused, _tp_prune(wide, x, wide[5], 1 - 1 / n - 1e-9))


def test_nt_intermediate_sparsity_matches_torch_pruning_on_mlp():
    """Sparsity 0.25 of two members: a 1.5x wide model, the one torch-pruning's ratio 0.25 gives."""
    members = [make_fusion_member("mlp", seed) for seed in range(2)]
    x = fusion_example_input("mlp")
    fused = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.25)
    assert (fused[1].out_features, fused[3].out_features) == (48, 36)
    wide = _concatenated_mlp(members)
    _assert_same_state(fused, _tp_prune(wide, x, wide[5], 0.25))


def test_nt_matches_torch_pruning_on_resnet18():
    """The concatenated resnet18 is NT at sparsity 0 (equal to the ensemble: test_fusion_archs oracle 2)."""
    members = [make_fusion_member("resnet18", seed) for seed in range(2)]
    x = fusion_example_input("resnet18")
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), fusion.ensemble(members)(x), rtol=1e-4, atol=1e-5)
    fused = fusion.fuse(members, "nt", example_inputs=x)
    _assert_same_state(fused, _tp_prune(wide, x, wide.fc, 0.5))
