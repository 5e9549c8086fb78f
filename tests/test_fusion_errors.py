"""Oracle 7: bad input raises ``fusion.FusionError`` naming the problem; members are never modified;
the fused model comes back in eval mode on the members' dtype, with or without autograd, from members
in train or eval mode. Also oracle 6's other half: a grouped-convolution layout fusion does not handle
is refused, never fused wrongly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from conftest import fusion_example_input, make_fusion_member

import fusion

METHODS = ["avg", "nt", "nt_iterative", "nt_hierarchical"]


@pytest.fixture(scope="module")
def mlps():
    return [make_fusion_member("mlp", seed) for seed in range(3)]


def test_fusion_error_is_a_value_error():
    assert issubclass(fusion.FusionError, ValueError)


@pytest.mark.parametrize("method", METHODS)
def test_fewer_than_two_members(mlps, method):
    with pytest.raises(fusion.FusionError, match="at least two"):
        fusion.fuse(mlps[:1], method)
    with pytest.raises(fusion.FusionError, match="at least two"):
        fusion.fuse([], method)
    with pytest.raises(fusion.FusionError, match="list of models"):
        fusion.fuse(mlps[0], method)


def _mlp(hidden: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


@pytest.mark.parametrize("method", METHODS)
def test_members_with_different_architectures(mlps, method):
    with pytest.raises(fusion.FusionError, match=r"'3\.weight'"):  # the first parameter whose shape differs
        fusion.fuse([mlps[0], _mlp(16)], method)
    with pytest.raises(fusion.FusionError, match="members differ"):
        fusion.fuse([mlps[0], nn.Sequential(nn.Flatten(), nn.Linear(64, 32))], method)
    with pytest.raises(fusion.FusionError, match="members differ"):
        fusion.fuse([mlps[0], make_fusion_member("grouped", 0)], method)


def test_members_with_different_dtypes(mlps):
    with pytest.raises(fusion.FusionError, match="dtype"):
        fusion.fuse([mlps[0], copy.deepcopy(mlps[1]).double()], "nt")


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5", True, [0.5]])
def test_sparsity_outside_range(mlps, bad):
    with pytest.raises(fusion.FusionError, match="sparsity"):
        fusion.fuse(mlps[:2], "nt", sparsity=bad)


def test_sparsity_only_for_joint_nt(mlps):
    for method in ("nt_iterative", "nt_hierarchical"):
        with pytest.raises(fusion.FusionError, match="sparsity"):
            fusion.fuse(mlps[:2], method, sparsity=0.5)


@pytest.mark.parametrize("bad", [0, -1, "2", None])
def test_bad_importance_norm(mlps, bad):
    with pytest.raises(fusion.FusionError, match="p must be"):
        fusion.fuse(mlps[:2], "nt", p=bad)


def test_unknown_method_lists_the_available_ones(mlps):
    for bad in ("nt-joint", "", None):
        with pytest.raises(fusion.FusionError, match="unknown fusion method") as info:
            fusion.fuse(mlps[:2], bad)
        for name in METHODS:
            assert name in str(info.value)
    assert set(METHODS) <= set(fusion.available_methods())


def test_unknown_option(mlps):
    with pytest.raises(fusion.FusionError, match="'sparsty'.*sparsity"):
        fusion.fuse(mlps[:2], "nt", sparsty=0.5)
    with pytest.raises(fusion.FusionError, match="'sparsity'.*'avg'"):
        fusion.fuse(mlps[:2], "avg", sparsity=0.5)


def test_example_inputs_required_and_checked():
    members = [make_fusion_member("grouped", seed) for seed in range(2)]
    with pytest.raises(fusion.FusionError, match="example_inputs"):
        fusion.fuse(members, "nt")
    with pytest.raises(fusion.FusionError, match="example_inputs"):
        fusion.fuse(members, "nt", example_inputs="images")
    with pytest.raises(fusion.FusionError, match="example inputs|cannot trace"):
        fusion.fuse(members, "nt", example_inputs=torch.randn(2, 5, 16, 16))


# ---------------------------------------------------------------------------- modules that cannot be traced
class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.lstm = nn.LSTM(6, 6, num_layers=2, batch_first=True)
        self.fc2 = nn.Linear(6, 2)

    def forward(self, x):
        h, _ = self.lstm(self.fc1(x))
        return self.fc2(h[:, -1])


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        h = self.fc1(x)
        h, _ = self.attn(h, h, h)
        return self.fc2(h.mean(1))


class HiddenMix(nn.Module):
    """Mixes channels with a matrix that is neither a parameter nor a buffer: invisible to the tracer."""

    def __init__(self, n: int):
        super().__init__()
        self.mix = torch.randn(n, n)

    def forward(self, x):
        return x @ self.mix


class ParamMix(HiddenMix):
    """Mixes channels with a raw parameter (x @ W): torch-pruning does not know how it couples channels."""

    def __init__(self, n: int):
        super().__init__(n)
        self.mix = nn.Parameter(torch.randn(n, n))


class Flip(nn.Module):
    """A parameter-free channel mixer that the tracer takes for an elementwise operation."""

    def forward(self, x):
        return x.flip(-1)


def _with_mixer(mixer: nn.Module, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), mixer, nn.ReLU(), nn.Linear(5, 2)).eval()


def test_stacked_lstm_is_refused_by_name():
    members = [LSTMNet().eval() for _ in range(2)]
    with pytest.raises(fusion.FusionError, match="'lstm' \\(LSTM\\): 2 stacked layers"):
        fusion.fuse(members, "nt", example_inputs=torch.randn(2, 3, 4))


def test_multihead_attention_is_refused_by_name():
    members = [AttentionNet().eval() for _ in range(2)]
    with pytest.raises(fusion.FusionError, match="'attn'"):
        fusion.fuse(members, "nt", example_inputs=torch.randn(2, 3, 4))


@pytest.mark.parametrize("mixer", [HiddenMix, ParamMix, lambda n: Flip()], ids=["hidden", "param", "flip"])
@pytest.mark.parametrize("sparsity", [0.0, None])
def test_hidden_channel_mixing_is_refused_by_the_self_check(mixer, sparsity):
    """The group whose permutation changes the output is named; nothing is silently fused."""
    members = [_with_mixer(mixer(5), seed) for seed in range(2)]
    opts = {} if sparsity is None else {"sparsity": sparsity}
    with pytest.raises(fusion.FusionError, match=r"group rooted at '0'.*permuting it changes"):
        fusion.fuse(members, "nt", example_inputs=torch.randn(3, 4), **opts)


def test_self_check_is_not_skipped_for_a_same_shaped_architecture():
    """The trace cache must not let a different architecture with the same tensors skip the self-check:
    a Flip model fused right after a ReLU model of identical parameter shapes must still be refused."""
    x = torch.randn(3, 4)
    plain = [_with_mixer(nn.Identity(), seed) for seed in range(2)]
    fusion.fuse(plain, "nt", example_inputs=x)  # traced, verified and cached
    flipped = [_with_mixer(Flip(), seed) for seed in range(2)]
    try:
        fused = fusion.fuse(flipped, "nt", example_inputs=x, sparsity=0.0)
    except fusion.FusionError:
        return
    with torch.no_grad():
        err = (fused(x) - fusion.ensemble(flipped)(x)).abs().max().item()
    pytest.fail(f"a model the self-check refuses was fused silently (error vs. ensemble {err:.3g})")


class BlockMismatch(nn.Sequential):
    """Two grouped convolutions that split one channel group into 4 and into 8 blocks."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1, groups=4),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, groups=8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        )


def test_unsupported_grouped_layout_is_refused_or_exact():
    """Oracle 6: a grouped-convolution layout is either fused exactly or refused, never fused wrongly."""
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(BlockMismatch().eval())
    x = torch.randn(2, 3, 8, 8)
    try:
        fused = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    except fusion.FusionError as exc:
        assert "'2'" in str(exc) or "'4'" in str(exc)  # names a convolution involved
        return
    with torch.no_grad():
        torch.testing.assert_close(fused(x), fusion.ensemble(members)(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- the members' side
def _snapshot(models):
    return [
        ({k: v.clone() for k, v in m.state_dict().items()}, [s.training for s in m.modules()], m.state_dict())
        for m in models
    ]


def _assert_unchanged(models, snapshot):
    for m, (state, flags, _) in zip(models, snapshot):
        assert [s.training for s in m.modules()] == flags
        now = m.state_dict()
        assert now.keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(now[k], v), k


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_members_untouched_and_result_eval_on_their_dtype(method, dtype):
    """Members in train mode (BatchNorm would update its statistics on any forward), fused inside no_grad."""
    members = [make_fusion_member("grouped", seed).to(dtype).train() for seed in range(3)]
    x = fusion_example_input("grouped").to(dtype)
    before = _snapshot(members)
    with torch.no_grad():
        fused = fusion.fuse(members, method, example_inputs=x)
    _assert_unchanged(members, before)
    assert not fused.training and not any(s.training for s in fused.modules())
    assert {p.dtype for p in fused.parameters()} == {dtype}
    assert all(p.requires_grad for p in fused.parameters())  # trainable although fused without autograd
    # the fused tensors are new: training the fused model leaves the members alone
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(1.0)
        for b in fused.buffers():
            b.add_(1)
    _assert_unchanged(members, before)


def test_float64_sparsity0_is_the_ensemble_to_double_precision():
    members = [make_fusion_member("grouped", seed).double() for seed in range(2)]
    x = fusion_example_input("grouped").double()
    fused = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    with torch.no_grad():
        out, ens = fused(x), fusion.ensemble(members)(x)
    assert out.dtype == torch.float64
    assert float((out - ens).abs().max() / ens.abs().max()) < 1e-12


def test_fuse_with_autograd_enabled_and_members_in_eval(mlps):
    before = _snapshot(mlps)
    fused = fusion.fuse(mlps, "nt", example_inputs=fusion_example_input("mlp"))
    _assert_unchanged(mlps, before)
    assert not fused.training
    assert fused[1].weight.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_members_are_fused_on_the_gpu():
    members = [make_fusion_member("grouped", seed).cuda() for seed in range(2)]
    x = fusion_example_input("grouped").cuda()
    for method in METHODS:
        fused = fusion.fuse(members, method, example_inputs=x)
        assert {t.device.type for t in fused.state_dict().values()} == {"cuda"}, method
    fused = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), fusion.ensemble(members)(x), rtol=1e-4, atol=1e-5)


class _Counted(nn.Module):
    calls = 0  # forwards on real tensors (tracing runs the model on the meta device)

    def forward(self, x):
        if x.device.type != "meta":
            type(self).calls += 1
        return x


def test_check_runs_refuses_a_model_that_does_not_run_every_time_and_runs_each_structure_once():
    """``check_runs`` refuses a fused model that fails (on every call: a failure is never remembered), and
    runs a structure it has seen run only once: whether a model runs depends on its structure, shapes and
    integer buffers, not on its float weights."""
    from fusion.build import check_runs

    broken = nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2))
    for _ in range(2):
        with pytest.raises(fusion.FusionError, match="the fused model does not run"):
            check_runs(broken, torch.randn(2, 4))

    def model(hidden, seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, hidden), _Counted(), nn.Linear(hidden, 2))

    x = torch.randn(2, 4)
    _Counted.calls = 0
    check_runs(model(3, 0), x)
    check_runs(model(3, 1), x)  # other weights, same structure: not run again
    assert _Counted.calls == 1
    check_runs(model(6, 0), x)  # another width
    check_runs(model(3, 0), torch.randn(5, 4))  # another input shape
    assert _Counted.calls == 3


def test_check_runs_does_not_rerun_a_model_shaped_like_its_member_but_runs_one_nt_widened():
    """A fused model with its member's structure, shapes and types runs through the member's code path: not
    run again (a first fusion pays one forward less). A model that NT widened has shapes of its own: run."""
    from fusion.build import _RAN

    def member(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 7), _Counted(), nn.ReLU(), nn.Linear(7, 2))

    members, x = [member(0), member(1)], torch.randn(3, 4)
    _RAN.clear()
    _Counted.calls = 0
    fusion.fuse(members, "nt", example_inputs=x, verify=False)
    assert _Counted.calls == 0
    fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0, verify=False)
    assert _Counted.calls == 1
    from fusion.build import check_runs

    broken = nn.Sequential(nn.Linear(4, 3), nn.Linear(5, 2))  # another structure than like's: run, and fails
    with pytest.raises(fusion.FusionError, match="the fused model does not run"):
        check_runs(broken, x, like=member(0))
