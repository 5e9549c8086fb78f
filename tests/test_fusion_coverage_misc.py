"""Coverage of the tracer for layer types of several refused timm families, each with the oracles of the walk:

* split attention (timm's ``SplitAttn``, ResNeSt): a grouped convolution whose blocks are the radix parts, viewed
  as ``(B, radix, C)`` and softmaxed over the radix: the parts' i-th channels are coupled and the members'
  blocks interleave part by part in a fused model (NT at sparsity 0 is the ensemble);

Models are small, hand-built from the timm modules (the timm families are walked by ``fusebench zoo``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import SplitAttn

import fusion
from fusion.build import build_model
from fusion.errors import FusionError
from fusion.trace import full_state


def _out(model: nn.Module, x) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _members(make, n: int = 2) -> list[nn.Module]:
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        model = make()
        for m in model.modules():  # running statistics that are not the identity
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
        out.append(model.eval())
    return out


def _fuses_to_the_ensemble(make, x) -> None:
    """NT at sparsity 0 is the output ensemble; default NT and averaging load strictly into a fresh model."""
    members = _members(make)
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert _rel(_out(wide, x), _out(fusion.ensemble(members), x)) < 1e-5
    for method in ("nt", "avg"):
        fused = fusion.fuse(members, method, example_inputs=x)
        fresh = make().eval()
        fresh.load_state_dict(fused.state_dict(), strict=True)
        assert torch.isfinite(_out(fresh, x)).all()


def _permutation_keeps_the_function(model: nn.Module, x) -> None:
    graph = fusion.channel_groups(model, x)  # includes the float64 self-check
    state = full_state(model)
    new = graph.assemble([state], graph.random_permutation(torch.Generator().manual_seed(3)))
    assert any(not torch.equal(new[k], state[k]) for k in graph.tensor_dims)
    assert _rel(_out(build_model(model, new), x), _out(model, x)) < 1e-5


# ---------------------------------------------------------------------------- split attention
class SplitNet(nn.Module):
    def __init__(self, radix: int = 2, groups: int = 1):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.sa = SplitAttn(8, 8, groups=groups, radix=radix, norm_layer=nn.BatchNorm2d, rd_channels=4)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.sa(self.stem(x)).mean((2, 3)))


_X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(100))


@pytest.mark.parametrize("radix", [2, 4])
def test_split_attention_fuses_to_the_ensemble(radix):
    _fuses_to_the_ensemble(lambda: SplitNet(radix), _X)
    _permutation_keeps_the_function(_members(lambda: SplitNet(radix), 1)[0], _X)


def test_split_attention_units_hold_the_radix_blocks_part_by_part():
    """The conv's output channels i and C + i (its two blocks) are one unit with the fc2 rows that weigh them and
    the stem channels the blocks read, each laid out part by part (the radix view of a fused model)."""
    graph = fusion.channel_groups(_members(SplitNet, 1)[0], _X)
    group = next(g for g in graph.groups if "sa.conv" in g.layers)
    assert group.unit_kind == "conv-block" and group.n_units == 1
    stem = next(s for s in group.slots if s.tensor == "stem.weight")
    assert stem.positions.tolist() == [[[0, 4], [1, 5], [2, 6], [3, 7]]]  # block 0 is part 0, block 1 part 1
    fc2 = next(s for s in group.slots if s.tensor == "sa.fc2.weight")
    assert fc2.positions[0, :, 0].tolist() == list(range(8)) and fc2.positions[0, :, -1].tolist() == list(
        range(8, 16)
    )


def test_split_attention_parts_are_coupled():
    """Negative control: moving conv channel 0 to 1 in the first radix block only (not in the second) changes
    the function, so the coupling of the parts is real."""
    model = _members(SplitNet, 1)[0]
    state = full_state(model)
    perm = torch.arange(16)
    perm[0], perm[1] = 1, 0
    new = dict(state)
    for k in ("sa.conv.weight", "sa.bn0.weight", "sa.bn0.bias", "sa.bn0.running_mean", "sa.bn0.running_var"):
        new[k] = state[k][perm]
    assert _rel(_out(build_model(model, new), _X), _out(model, _X)) > 1e-3


def test_split_attention_with_cardinal_groups_is_refused():
    """With cardinality 2, fc2's blocks each hold both radix parts: no fused layout keeps the members apart."""
    with pytest.raises(FusionError, match="not one part each"):
        fusion.channel_groups(_members(lambda: SplitNet(2, 2), 1)[0], _X)
