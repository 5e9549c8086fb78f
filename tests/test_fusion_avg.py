"""Oracle 5: weight averaging."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from conftest import fusion_example_input, make_fusion_member

import fusion


def test_avg_of_identical_copies_is_the_member():
    for arch in ("mlp", "grouped"):
        member = make_fusion_member(arch, 0)
        x = fusion_example_input(arch)
        for n in (2, 3):
            fused = fusion.fuse(
                [member] + [copy.deepcopy(member) for _ in range(n - 1)], "avg", example_inputs=x
            )
            assert not fused.training
            with torch.no_grad():
                torch.testing.assert_close(fused(x), member(x), rtol=1e-6, atol=1e-6)
            for name, t in member.state_dict().items():
                torch.testing.assert_close(fused.state_dict()[name], t, rtol=1e-6, atol=0)


def _two_layer(w1, b1, w2, b2) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        for layer, w, b in ((model[0], w1, b1), (model[2], w2, b2)):
            layer.weight.copy_(torch.tensor(w, dtype=torch.float32))
            layer.bias.copy_(torch.tensor(b, dtype=torch.float32))
    return model.eval()


def test_avg_is_exact_on_a_two_layer_example():
    m1 = _two_layer([[1, 2], [3, 4]], [0, 1], [[1, -1]], [0.5])
    m2 = _two_layer([[3, 0], [1, 2]], [2, 1], [[3, 1]], [1.5])
    fused = fusion.fuse([m1, m2], "avg")  # example inputs are inferred for a Sequential MLP
    # by hand: W1 = [[2, 1], [2, 3]], b1 = [1, 1], W2 = [[2, 0]], b2 = [1]
    assert fused[0].weight.tolist() == [[2, 1], [2, 3]]
    assert fused[0].bias.tolist() == [1, 1]
    assert fused[2].weight.tolist() == [[2, 0]]
    assert fused[2].bias.tolist() == [1]
    x = torch.tensor([[1.0, -1.0]])
    # h = relu([2 - 1 + 1, 2 - 3 + 1]) = [2, 0]; y = 2 * 2 + 0 * 0 + 1 = 5
    with torch.no_grad():
        assert fused(x).tolist() == [[5.0]]
        # ...which is not the ensemble (0.5 and 16.5 average to 8.5): averaging is not output averaging
        assert fusion.ensemble([m1, m2])(x).tolist() == [[8.5]]


def test_avg_averages_normalization_statistics():
    members = [make_fusion_member("grouped", seed) for seed in range(3)]
    fused = fusion.fuse(members, "avg", example_inputs=fusion_example_input("grouped"))
    states = [m.state_dict() for m in members]
    got = fused.state_dict()
    for name in ("1.weight", "1.running_mean", "1.running_var", "3.weight"):
        torch.testing.assert_close(got[name], sum(s[name] for s in states) / 3, rtol=1e-6, atol=1e-7)
        assert not torch.equal(got[name], states[0][name])
    assert got["1.num_batches_tracked"].dtype == torch.long
