"""`fusebench zoo`: the per-model checks on tiny timm models, resumable results, the generated table."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fusion
from bench import cli, zoo
from bench.zoo import check_model, load_results, write_table


def test_a_cnn_fuses_and_nt_at_sparsity_zero_is_the_ensemble(one_thread):
    res = check_model("test_resnet")
    assert res["status"] == "fused", res
    assert res["ensemble_rel_err"] < 1e-3 and res["groups"] > 0


def test_a_layernorm_model_fuses_with_the_ensemble_check_explained(one_thread):
    res = check_model("test_vit")
    assert res["status"] == "fused", res
    assert "normalizes across channels" in res["ensemble_check"] and "ensemble_rel_err" not in res
    assert res["twin_rel_err"] < 1e-9  # NT at sparsity 0 of two copies of one member is that member


class _ScalarAffineNet(nn.Module):
    """Convolutions with a learnable scale shared by all channels (HGNetV2's LearnableAffineBlock)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 5)
        self.scale = nn.Parameter(torch.tensor([1.5]))

    def forward(self, x):
        return self.fc((self.scale * torch.relu(self.bn(self.conv(x)))).mean((2, 3)))


class _SingleHeadNet(nn.Module):
    """A single-head attention over positions whose q and k are 1x1 convolutions (iFormer's): q @ k sums over
    the channels, so a concatenation sums over both members' channels."""

    def __init__(self):
        super().__init__()
        self.stem, self.q, self.k = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        q, k, v = self.q(x).flatten(2), self.k(x).flatten(2), x.flatten(2)
        attn = (q.transpose(-2, -1) @ k).softmax(-1)  # (B, HW, HW)
        return self.fc((x + (v @ attn.transpose(-2, -1)).view_as(x)).mean((2, 3)))


class _WeightStandardizedNet(nn.Module):
    def __init__(self):
        super().__init__()
        from timm.layers import StdConv2d

        self.conv, self.conv2, self.fc = (
            StdConv2d(3, 8, 3, padding=1),
            StdConv2d(8, 8, 3, padding=1),
            nn.Linear(8, 5),
        )

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv(x)))).mean((2, 3)))


def test_weight_standardization_skips_the_oracle_by_name(monkeypatch, one_thread):
    """A standardized filter's statistics cover all members' input channels (their zeros too): not even two copies
    of one member concatenate to that member, so neither oracle applies (nf_resnet50 read 'wrong' by the twin
    oracle before)."""
    monkeypatch.setattr(zoo, "_create", lambda name, device="cpu", size=64: _WeightStandardizedNet())
    res = check_model("stdconv")
    assert res["status"] == "fused", res
    assert (
        res["ensemble_check"]
        == "skipped: StdConv2d standardizes each filter over the input channels of all members"
    )
    torch.manual_seed(0)
    member = _WeightStandardizedNet().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        twin = fusion.fuse([member, member], "nt", example_inputs=x, sparsity=0.0)
        assert zoo._rel_err(twin(x), member(x)) > 1e-3


def test_a_shared_scalar_is_checked_against_the_member_itself(monkeypatch, one_thread):
    monkeypatch.setattr(zoo, "_create", lambda name, device="cpu", size=64: _ScalarAffineNet())
    res = check_model("scalar")
    assert res["status"] == "fused", res
    assert (
        "1 tensors shared by all channels are averaged" in res["ensemble_check"]
        and "'scale'" in res["ensemble_check"]
    )
    assert res["twin_rel_err"] < 1e-9 and "ensemble_rel_err" not in res


def test_pinned_channels_are_checked_against_the_member_itself(monkeypatch, one_thread):
    from test_fusion_archs import _EcaNet

    monkeypatch.setattr(zoo, "_create", lambda name, device="cpu", size=64: _EcaNet())
    res = check_model("eca")
    assert res["status"] == "fused" and res["pinned"] == 1, res
    assert "1 channel sets are pinned" in res["ensemble_check"] and "'eca.conv'" in res["ensemble_check"]
    assert res["twin_rel_err"] < 1e-6 and "ensemble_rel_err" not in res


class _PinnedSingleHeadNet(_SingleHeadNet):
    """The single-head attention with ECA gates on q and k: their channels are pinned (averaged), so q @ k sums
    over one member's worth of channels and the product is no reason to skip the oracle."""

    def __init__(self):
        from test_fusion_archs import _Eca

        super().__init__()
        self.eq, self.ek = _Eca(), _Eca()

    def get_classifier(self):  # registered after fc, a gate would otherwise be taken for the output layer
        return self.fc

    def forward(self, x):
        x = torch.relu(self.stem(x))
        q, k, v = self.eq(self.q(x)).flatten(2), self.ek(self.k(x)).flatten(2), x.flatten(2)
        attn = (q.transpose(-2, -1) @ k).softmax(-1)
        return self.fc((x + (v @ attn.transpose(-2, -1)).view_as(x)).mean((2, 3)))


def test_a_product_of_pinned_channels_is_not_a_product_over_members(monkeypatch, one_thread):
    monkeypatch.setattr(zoo, "_create", lambda name, device="cpu", size=64: _PinnedSingleHeadNet())
    res = check_model("pinned_single_head")
    assert res["status"] == "fused" and res["pinned"] == 1, res  # q and k: one set (the product couples them)
    assert res["twin_rel_err"] < 1e-6, res


def test_a_product_over_channels_skips_the_ensemble_check_with_its_layers(monkeypatch, one_thread):
    monkeypatch.setattr(zoo, "_create", lambda name, device="cpu", size=64: _SingleHeadNet())
    res = check_model("single_head")
    assert res["status"] == "fused", res
    assert res["ensemble_check"] == "skipped: a product sums over the channels of all members ('q' x 'k')"
    # and that is true: NT at sparsity 0 is not the ensemble here
    torch.manual_seed(0)
    members = [_SingleHeadNet().eval() for _ in range(2)]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
        assert zoo._rel_err(wide(x), fusion.ensemble(members)(x)) > 1e-3


@pytest.mark.slow
def test_a_model_with_fixed_split_sizes_fuses_at_the_members_width_only(one_thread):
    """FasterNet's partial convolution splits channels at sizes stored on the module: the members' width
    fuses (self-check, NT and avg load strictly and run), a wider model cannot exist, and the walk says so."""
    res = check_model("fasternet_t0")
    assert res["status"] == "fused" and res["width"] == "members' only", res
    assert res["ensemble_check"].startswith("not possible, NT cannot widen it: the fused model does not run")


class _SizedNet(nn.Module):
    """A small CNN that only runs at ``size`` px (as inception_v3's stem needs more than 64), and whose
    pretrained config names ``native`` px."""

    def __init__(self, size: int, native: int):
        super().__init__()
        self.size, self.pretrained_cfg = size, {"input_size": (3, native, native)}
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x):
        if x.shape[-1] != self.size:
            raise RuntimeError(f"needs {self.size} px")
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_a_model_that_does_not_run_at_the_walks_input_size_is_walked_at_its_own(monkeypatch, one_thread):
    monkeypatch.setattr(zoo, "_create", lambda name, device="cpu", size=64: _SizedNet(32, 32))
    res = check_model("sized")
    assert res["status"] == "fused" and res["input"] == 32, res
    assert res["ensemble_rel_err"] < 1e-6
    table = zoo.write_table({"sized": {**res, "params": 1}}, Path(tempfile.mkdtemp()) / "t.md")
    assert "| sized | 0.0 | fused (at 32px) |" in table


def test_the_ensemble_oracle_is_not_fooled_by_float32_rounding():
    """A badly conditioned member (hidden units of 1e6 in pairs that the output layer nearly cancels) and the
    same function with its hidden units reversed: in float32 the two differ by rounding of the order of the
    output itself, in float64 they agree -- the walk must not call that a wrong fusion."""
    torch.manual_seed(0)
    member = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    with torch.no_grad():
        member[0].weight.mul_(1e6)
        member[0].weight[32:], member[0].bias[32:] = member[0].weight[:32], member[0].bias[:32]
        member[2].weight[:, 32:] = -member[2].weight[:, :32] * (1 + 1e-7 * torch.rand(3, 32))
    reversed_ = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    with torch.no_grad():
        reversed_[0].weight.copy_(member[0].weight.flip(0))
        reversed_[0].bias.copy_(member[0].bias.flip(0))
        reversed_[2].weight.copy_(member[2].weight.flip(1))
        reversed_[2].bias.copy_(member[2].bias)
    x = torch.randn(4, 8)
    with torch.no_grad():
        assert zoo._rel_err(reversed_(x), member(x)) > 1e-3  # float32: mostly rounding
        assert zoo._ensemble_err(reversed_, [member, member], x) < 1e-6


def test_a_model_that_runs_at_no_size_is_skipped_not_called_untraceable(monkeypatch, one_thread):
    monkeypatch.setattr(zoo, "_create", lambda name, device="cpu", size=64: _SizedNet(48, 32))
    res = check_model("sized")
    assert res["status"] == "skipped", res
    assert (
        res["reason"].startswith("the model does not run at 64px") and "nor at its own 32px" in res["reason"]
    )


def test_unknown_model_is_skipped_with_the_reason():
    res = check_model("no_such_model_xyz")
    assert res["status"] == "skipped" and "timm cannot build it" in res["reason"]


def test_walk_is_resumable_and_writes_the_table(tmp_path, capsys):
    results, table = tmp_path / "z.jsonl", tmp_path / "z.md"
    argv = [
        "zoo",
        "--models",
        "test_resnet",
        "--workers",
        "1",
        "--results",
        str(results),
        "--table",
        str(table),
    ]
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["model"] for r in rows] == ["test_resnet"] and rows[0]["status"] == "fused"
    assert cli.main(argv) == 0  # again: nothing left to walk, nothing appended
    assert "walking 0" in capsys.readouterr().err
    assert len(results.read_text().splitlines()) == 1
    assert "| test_resnet |" in table.read_text()


def test_table_counts_and_reason_classes(tmp_path):
    rows = {
        "a": {"model": "a", "status": "fused", "params": 1e6},
        "b": {"model": "b", "status": "refused", "reason": "channel tracing is inconsistent for 'x.weight' (dimension 1 of size 12)"},
        "c": {"model": "c", "status": "refused", "reason": "channel tracing is inconsistent for 'y.weight' (dimension 1 of size 40)"},
        "d": {"model": "d", "status": "not traceable", "reason": "RuntimeError: no"},
        "e": {"model": "e", "status": "fused", "width": "members' only", "ensemble_check": "not possible, NT cannot widen it: x"},
        "f": {"model": "f", "status": "fused", "pinned": 2},
    }  # fmt: skip
    text = write_table(rows, tmp_path / "t.md")
    assert "| fused | 3 |" in text and "| refused | 2 |" in text and "| not traceable | 1 |" in text
    assert (
        "Of the 5 models torch-pruning builds a dependency graph for, 3 fuse (60.0 %; 1 of them only at the members' width"
        in text
    )
    assert "NT cannot widen them; 1 with some channels pinned" in text
    assert "| f | — | fused, 2 channel sets pinned |" in text
    assert "| e | — | fused | not possible, NT cannot widen it: x |" in text
    # one refusal class for both models: names and sizes are not part of the class
    assert "| refused | channel tracing is inconsistent for '…' (dimension N of size N) | 2 |" in text
    (tmp_path / "r.jsonl").write_text('{"model": "a", "status": "fused"}\n{"model": "b", "sta')  # cut line
    assert list(load_results(tmp_path / "r.jsonl")) == ["a"]


@pytest.mark.parametrize("bad", [["--workers", "0"]])
def test_bad_arguments_exit_2(bad, capsys):
    assert cli.main(["zoo", "--models", "test_resnet", *bad]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
