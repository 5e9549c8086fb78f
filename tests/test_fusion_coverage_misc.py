"""Coverage of the tracer for layer types of several refused timm families, each with the oracles of the walk:

* split attention (timm's ``SplitAttn``, ResNeSt): a grouped convolution whose blocks are the radix parts, viewed
  as ``(B, radix, C)`` and softmaxed over the radix: the parts' i-th channels are coupled and the members'
  blocks interleave part by part in a fused model (NT at sparsity 0 is the ensemble);
* recurrent layers (``nn.LSTM`` in timm's ``LSTM2d``, Sequencer; ``nn.GRU``, ``nn.RNN``): a hidden unit is one row
  per gate of its direction's weights and biases and a column of its ``weight_hh``; each direction is a group;
* BAT's bilinear attention transform (``BilinearAttnTransform``): channel c of the feature map is multiplied by
  the matrices of its group, ``conv_p``'s and ``conv_q``'s rows viewed as ``(groups, block, block)``: a unit is a
  group (its feature channels and its rows of both), and a fused model has one group per kept unit;
* refused by their structural reason: a layer shared by several attentions and reading their heads (CoaT's
  convolutional relative position encoding), a layer's pooled channels viewed as matrices that multiply a feature
  map in a layer fusion does not know.

Models are small, hand-built from the timm modules (the timm families are walked by ``fusebench zoo``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import model_out, rel_err
from timm.layers import SplitAttn
from timm.layers.non_local_attn import BilinearAttnTransform
from timm.models.coat import ConvRelPosEnc, FactorAttnConvRelPosEnc
from timm.models.sequencer import LSTM2d

import fusion
from fusion.build import build_model
from fusion.errors import FusionError
from fusion.state import full_state


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
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-5
    for method in ("nt", "avg"):
        fused = fusion.fuse(members, method, example_inputs=x)
        fresh = make().eval()
        fresh.load_state_dict(fused.state_dict(), strict=True)
        assert torch.isfinite(model_out(fresh, x)).all()


def _permutation_keeps_the_function(model: nn.Module, x) -> None:
    graph = fusion.channel_groups(model, x)  # includes the float64 self-check
    state = full_state(model)
    new = graph.assemble([state], graph.random_permutation(torch.Generator().manual_seed(3)))
    assert any(not torch.equal(new[k], state[k]) for k in graph.tensor_dims)
    assert rel_err(model_out(build_model(model, new), x), model_out(model, x)) < 1e-5


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
    assert rel_err(model_out(build_model(model, new), _X), model_out(model, _X)) > 1e-3


def test_split_attention_with_cardinal_groups_is_refused():
    """With cardinality 2, fc2's blocks each hold both radix parts: no fused layout keeps the members apart."""
    with pytest.raises(FusionError, match="not one part each"):
        fusion.channel_groups(_members(lambda: SplitNet(2, 2), 1)[0], _X)


# ---------------------------------------------------------------------------- recurrent layers
class SequencerNet(nn.Module):
    """timm's LSTM2d (Sequencer): bidirectional, batch-first LSTMs along the rows and the columns of an NHWC map,
    concatenated and mixed by a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(3, 8)
        self.rnn = LSTM2d(8, 4)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.rnn(self.stem(x)).mean((1, 2)))


class RecurrentNet(nn.Module):
    def __init__(self, kind=nn.GRU, bidirectional: bool = False, batch_first: bool = False, **options):
        super().__init__()
        self.fc1, self.batch_first = nn.Linear(4, 6), batch_first
        self.rnn = kind(6, 5, batch_first=batch_first, bidirectional=bidirectional, **options)
        self.fc2 = nn.Linear(10 if bidirectional else 5, 2)

    def forward(self, x):  # x: (B, N, 4)
        h = self.fc1(x)
        h, _ = self.rnn(h if self.batch_first else h.transpose(0, 1))
        return self.fc2((h if self.batch_first else h.transpose(0, 1))[:, -1])


_SEQ = torch.randn(2, 3, 4, 3, generator=torch.Generator().manual_seed(101))
_TOKENS = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(102))


def test_sequencer_lstm_fuses_to_the_ensemble():
    _fuses_to_the_ensemble(SequencerNet, _SEQ)
    _permutation_keeps_the_function(_members(SequencerNet, 1)[0], _SEQ)


def test_lstm_directions_are_groups_of_gate_rows():
    """Each direction of each LSTM is a group of its 4 hidden units; unit i holds rows i, 4 + i, 8 + i, 12 + i of
    the direction's weight_ih, weight_hh and biases, column i of its weight_hh, and its place in the output
    (the reverse direction after the forward one), where the mixing Linear reads it."""
    graph = fusion.channel_groups(_members(SequencerNet, 1)[0], _SEQ)
    rnn = [g for g in graph.groups if g.name == "rnn.rnn_h"]
    assert [g.n_units for g in rnn] == [4, 4]
    forward, reverse = ({s.tensor: s for s in g.slots if s.dim == 0 or "weight_hh" in s.tensor} for g in rnn)
    assert forward["rnn.rnn_h.weight_ih_l0"].positions[1].tolist() == [[1, 5, 9, 13]]
    assert reverse["rnn.rnn_h.weight_ih_l0_reverse"].positions[1].tolist() == [[1, 5, 9, 13]]
    assert "rnn.rnn_h.weight_ih_l0_reverse" not in forward and "rnn.rnn_h.weight_ih_l0" not in reverse
    # the output is cat([rnn_v's forward, reverse, rnn_h's forward, reverse]) along the channels
    fc = [[s.positions[:, 0, 0].tolist() for s in g.slots if s.tensor == "rnn.fc.weight"] for g in rnn]
    assert fc == [[[8, 9, 10, 11]], [[12, 13, 14, 15]]]


def test_lstm_gates_of_a_unit_are_coupled():
    """Negative control: swapping hidden units 0 and 1 in the input gate's rows only (not in the other gates)
    changes the function."""
    model = _members(SequencerNet, 1)[0]
    state = full_state(model)
    perm = torch.arange(16)
    perm[0], perm[1] = 1, 0
    new = dict(state, **{k: state[k][perm] for k in ("rnn.rnn_h.weight_ih_l0", "rnn.rnn_h.bias_ih_l0")})
    assert rel_err(model_out(build_model(model, new), _SEQ), model_out(model, _SEQ)) > 1e-4


@pytest.mark.parametrize(
    "kind,bidirectional,batch_first",
    [(nn.GRU, False, False), (nn.RNN, True, True), (nn.LSTM, True, False)],
    ids=["gru", "rnn-bidirectional", "lstm-sequence-first"],
)
def test_recurrent_layers_fuse_to_the_ensemble(kind, bidirectional, batch_first):
    _fuses_to_the_ensemble(lambda: RecurrentNet(kind, bidirectional, batch_first), _TOKENS)


@pytest.mark.parametrize(
    "options,reason",
    [({"num_layers": 2}, "2 stacked layers"), ({"proj_size": 3}, "projection of its hidden state")],
    ids=["stacked", "projection"],
)
def test_unsupported_lstm_is_refused_by_reason(options, reason):
    with pytest.raises(FusionError, match=reason):
        fusion.channel_groups(RecurrentNet(nn.LSTM, **options).eval(), _TOKENS)


# ---------------------------------------------------------------------------- bilinear attention transform (BAT)
class BilinearNet(nn.Module):
    """BAT's bilinear attention transform: ``conv_p`` and ``conv_q`` make (2 groups, 4, 4) matrices from pooled
    features, which multiply the rows and the columns of the feature map (of each 4 x 4 block of it on an 8 x 8
    map)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.ba = BilinearAttnTransform(8, 4, 2)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.ba(torch.relu(self.bn(self.stem(x)))).mean((2, 3)))


@pytest.mark.parametrize("size", [4, 8])
def test_bilinear_transform_fuses_to_the_ensemble(size):
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(104))
    _fuses_to_the_ensemble(BilinearNet, x)
    _permutation_keeps_the_function(_members(BilinearNet, 1)[0], x)


def test_bilinear_transform_units_are_its_groups():
    """A unit is one of the 2 groups: 4 feature channels (stem rows) and 16 rows of conv_p and of conv_q."""
    graph = fusion.channel_groups(_members(BilinearNet, 1)[0], _IMG)
    group = next(g for g in graph.groups if "ba.conv_p" in g.layers and "stem" in g.layers)
    assert group.unit_kind == "conv-block" and group.n_units == 2
    slots = {(s.tensor, s.dim): s.positions for s in group.slots}
    assert slots[("stem.weight", 0)][1, :, 0].tolist() == [4, 5, 6, 7]
    assert slots[("ba.conv_p.weight", 0)][1, :, 0].tolist() == list(range(16, 32))
    assert slots[("ba.conv_q.weight", 0)].shape == (2, 16, 1)


def test_bilinear_transform_groups_are_coupled():
    """Negative control: swapping feature channel 0 (group 0) with channel 4 (group 1), in every layer that makes
    or reads them, changes the function: the channels are multiplied by their own group's matrices."""
    model = _members(BilinearNet, 1)[0]
    state = full_state(model)
    perm = torch.arange(8)
    perm[0], perm[4] = 4, 0
    new = dict(state)
    for k in ("stem.weight", "stem.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        new[k] = state[k][perm]
    for k in ("ba.conv1.conv.weight", "ba.conv2.conv.weight"):
        new[k] = state[k][:, perm]
    assert rel_err(model_out(build_model(model, new), _IMG), model_out(model, _IMG)) > 1e-4


# ---------------------------------------------------------------------------- refused by their structural reason
class CoatNet(nn.Module):
    """Two factorized attentions sharing one convolutional relative position encoding (CoaT's ``shared_crpe``:
    depthwise convolutions of two window sizes over v's two heads, reshaped into images)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        crpe = ConvRelPosEnc(4, 2, {3: 1, 5: 1})
        self.a1 = FactorAttnConvRelPosEnc(8, 2, shared_crpe=crpe)
        self.a2 = FactorAttnConvRelPosEnc(8, 2, shared_crpe=crpe)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        b, _, h, w = x.shape
        t = self.embed(x.flatten(2).transpose(1, 2))
        t = torch.cat([t.new_zeros(b, 1, 8), t], 1)  # a class token
        t = t + self.a1(t, (h, w))
        t = t + self.a2(t, (h, w))
        return self.head(t.mean(1))


class PooledMatrices(nn.Module):
    """A layer's pooled channels viewed as (2, 1, 4, 4) matrices multiplying the feature map's rows, written out
    (BAT's pattern outside its module)."""

    def __init__(self):
        super().__init__()
        self.stem, self.gen, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 32, 1), nn.Linear(8, 5)

    def forward(self, x):
        h = self.stem(x)
        b = h.shape[0]
        m = (
            self.gen(h.mean((2, 3), keepdim=True))
            .view(b, 2, 1, 4, 4)
            .expand(b, 2, 4, 4, 4)
            .reshape(b, 8, 4, 4)
        )
        return self.head((m @ h).mean((2, 3)))


_IMG = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(103))


def test_a_layer_shared_by_attentions_is_refused_by_name():
    with pytest.raises(
        FusionError, match=r"layer 'a1\.crpe\.conv_list\.0' .* shared by 2 attentions \('a1', 'a2'"
    ):
        fusion.channel_groups(CoatNet().eval(), _IMG)


def test_channels_viewed_as_matrices_are_refused_by_name():
    with pytest.raises(FusionError, match=r"'gen' are viewed as \(2, 1, 4, 4\) and multiplied as matrices"):
        fusion.channel_groups(PooledMatrices().eval(), _IMG)
