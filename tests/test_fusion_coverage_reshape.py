"""Reshapes, views and matrix products that move the channel axis (coverage).

torch-pruning 1.6 maps a reshape by a channel ratio it guesses from the graph (a flatten: channel i ->
``i * k ... i * k + k - 1``), only for 1-D and 4-D inputs, splits along dim 1 only, and takes a matrix
product for an element-wise operation. The tracer now follows the channel axis autograd recorded instead:
where the axis keeps its place in memory the mapping is the identity, where it becomes the fastest-varying
part of a merged axis it is k segments of the same channels, where it is split into (paths, channels) the
paths' channels meet. Each model here is a small version of a timm pattern (Swin's patch merging, the
global-context block of gcresnet, selective kernel's paths, MambaOut's gated convolution on NHWC tensors);
the oracles are the usual ones: the trace's self-check, every channel claimed once, a random permutation
keeps the function, NT at sparsity 0 is the ensemble where nothing fixes a width and no norm mixes channels,
default NT and averaging load strictly into a fresh model; and a wrong mapping fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import claims, model_out, rel_err

import fusion
from fusion import trace
from fusion.build import build_model
from fusion.state import full_state


class PatchMerging(nn.Module):
    """Swin's patch merging on an NHWC map: ``(B, H, W, C) -> (B, H/2, 2, W/2, 2, C) -> permute -> flatten``,
    so the 4C inputs of ``reduction`` are four segments holding the same C channels in the same order;
    with ``norm`` a LayerNorm over the 4C (a symmetry only when every segment is permuted alike)."""

    def __init__(self, c: int = 6, norm: bool = False):
        super().__init__()
        self.embed = nn.Conv2d(3, c, 2, stride=2)
        self.fc = nn.Linear(c, c)
        self.norm = nn.LayerNorm(4 * c) if norm else nn.Identity()
        self.reduction = nn.Linear(4 * c, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.gelu(self.fc(x))
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        x = F.gelu(self.reduction(self.norm(x)))
        return self.head(x.mean((1, 2)))


class GlobalContext(nn.Module):
    """timm's GlobalContext: attention over positions from a one-channel convolution, the context
    ``x.reshape(B, C, HW).unsqueeze(1) @ attn`` viewed back to ``(B, C, 1, 1)`` and added through a small MLP."""

    def __init__(self, c: int = 6, hidden: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv_attn = nn.Conv2d(c, 1, 1)
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)
        self.mix = nn.Conv2d(c, 5, 3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        b, c, h, w = x.shape
        attn = F.softmax(self.conv_attn(x).reshape(b, 1, h * w), dim=-1).unsqueeze(3)
        context = (x.reshape(b, c, h * w).unsqueeze(1) @ attn).view(b, c, 1, 1)
        x = x + self.fc2(F.relu(self.fc1(context)))
        return self.head(F.relu(self.mix(x)).mean((2, 3)))


class SelectiveKernel(nn.Module):
    """Selective kernel: two paths stacked ``(B, 2, C, H, W)``, attention logits ``(B, 2C, 1, 1)`` viewed as
    ``(B, 2, C, 1, 1)`` and softmaxed over the paths: logit rows i and C + i belong to channel i."""

    def __init__(self, c: int = 6, r: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.path0 = nn.Conv2d(c, c, 3, padding=1)
        self.path1 = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.fc_reduce = nn.Conv2d(c, r, 1)
        self.fc_select = nn.Conv2d(r, 2 * c, 1)
        self.mix = nn.Conv2d(c, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        paths = torch.stack([F.relu(self.path0(x)), F.relu(self.path1(x))], dim=1)
        a = F.relu(self.fc_reduce(paths.sum(1).mean((2, 3), keepdim=True)))
        a = self.fc_select(a)
        b, c2, h, w = a.shape
        a = torch.softmax(a.view(b, 2, c2 // 2, h, w), dim=1)
        x = (paths * a).sum(1)
        return self.head(F.relu(self.mix(x)).mean((2, 3)))


class GatedConv(nn.Module):
    """MambaOut's gated convolution on NHWC tensors: ``fc1`` makes (g, i, c) split along the last axis in fixed
    sizes, c runs a depthwise convolution (permuted to NCHW and back), ``fc2(act(g) * cat(i, c))``."""

    def __init__(self, dim: int = 4, hidden: int = 6, conv: int = 4):
        super().__init__()
        self.sizes = (hidden, hidden - conv, conv)
        self.embed = nn.Conv2d(3, dim, 2, stride=2)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.conv = nn.Conv2d(conv, conv, 3, padding=1, groups=conv)
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x).permute(0, 2, 3, 1)
        g, i, c = torch.split(self.fc1(x), self.sizes, dim=-1)
        c = self.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.fc2(F.gelu(g) * torch.cat((i, c), dim=-1))
        return self.head(x.mean((1, 2)))


def _members(cls, n: int = 2, **kw):
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = cls(**kw).eval()
        if kw.get("norm"):
            with torch.no_grad():
                m.norm.weight.uniform_(0.5, 1.5)
                m.norm.bias.normal_(0, 0.1)
        out.append(m)
    return out


def _x():
    torch.manual_seed(100)
    return torch.randn(2, 3, 8, 8)


def _fresh_trace(model, x):
    trace._CACHE.clear()
    return fusion.channel_groups(model, x)


CASES = [
    (PatchMerging, {}),
    (PatchMerging, {"norm": True}),
    (GlobalContext, {}),
    (SelectiveKernel, {}),
    (GatedConv, {}),
]
IDS = ["patch_merging", "patch_merging_norm", "global_context", "selective_kernel", "gated_conv"]


@pytest.mark.parametrize(("cls", "kw"), CASES, ids=IDS)
def test_reshape_models_trace_claim_every_channel_once_and_load(cls, kw):
    members = _members(cls, **kw)
    x = _x()
    graph = _fresh_trace(members[0], x)  # the self-check runs inside: a random permutation keeps the function
    for tensor, dims in graph.tensor_dims.items():
        for d in dims:
            assert (claims(graph, tensor, d) == 1).all(), (tensor, d)
    state = full_state(members[0])
    new = graph.assemble([state], graph.random_permutation(torch.Generator().manual_seed(3)))
    assert sum(not torch.equal(new[k], state[k]) for k in graph.tensor_dims) >= len(graph.tensor_dims) // 2
    assert rel_err(model_out(build_model(members[0], new), x), model_out(members[0], x)) < 1e-5
    for method in ("nt", "avg"):
        fused = fusion.fuse(members, method, example_inputs=x)
        fresh = cls(**kw).eval()
        fresh.load_state_dict(fused.state_dict(), strict=True)
        assert torch.isfinite(model_out(fresh, x)).all()


@pytest.mark.parametrize("cls", [PatchMerging, SelectiveKernel], ids=["patch_merging", "selective_kernel"])
def test_nt_at_sparsity0_is_the_ensemble_through_reshapes(cls):
    """No norm, no fixed width: the concatenated model is the output ensemble, which needs every member's
    channels placed in each of the four segments (patch merging) or in both paths' logits (selective kernel)."""
    members = _members(cls)
    x = _x()
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-5


def test_patch_merging_inputs_are_four_segments_of_the_same_channels():
    """Each of the block's channels c sits at c, C + c, 2C + c, 3C + c of the reduction's input; placing
    them as a flatten of stride 4 would (4c ... 4c + 3, torch-pruning's guess) changes the function."""
    model = _members(PatchMerging, 1)[0]
    x = _x()
    graph = _fresh_trace(model, x)
    g = next(g for g in graph.groups if "reduction" in g.layers and g.name == "fc")
    pos = torch.cat([s.positions for s in g.slots if s.tensor == "reduction.weight"], 2)  # [C, 1, 4]
    c = g.n_units
    assert sorted(pos[0].reshape(-1).tolist()) == [0, c, 2 * c, 3 * c]
    # negative control: permute fc's rows and the reduction's columns as a stride-4 flatten would place them
    perm = torch.roll(torch.arange(c), 1)
    state = full_state(model)
    good, bad = dict(state), dict(state)
    for new in (good, bad):
        new["fc.weight"], new["fc.bias"] = state["fc.weight"][perm], state["fc.bias"][perm]
    cols = torch.arange(4 * c).reshape(4, c)  # column s * C + j reads channel j of segment s
    good["reduction.weight"] = state["reduction.weight"][:, cols[:, perm].reshape(-1)]
    stride = torch.arange(4 * c).reshape(c, 4)  # the wrong layout: channel j at 4j ... 4j + 3
    bad["reduction.weight"] = state["reduction.weight"][:, stride[perm].reshape(-1)]
    ref = model_out(model, x)
    assert rel_err(model_out(build_model(model, good), x), ref) < 1e-5
    assert rel_err(model_out(build_model(model, bad), x), ref) > 1e-3


def test_selective_kernel_logits_pair_channel_i_with_i_plus_c():
    """The softmax over paths couples fc_select's rows i and C + i (not i and i + 1): one unit each."""
    model = _members(SelectiveKernel, 1)[0]
    graph = _fresh_trace(model, _x())
    g = next(g for g in graph.groups if g.name == "fc_select")
    assert g.unit_kind == "coupled channels" and g.n_units == 6
    pos = next(s.positions for s in g.slots if s.tensor == "fc_select.weight")
    assert pos[:, 0].tolist() == [[i, 6 + i] for i in range(6)]


def test_global_context_maps_the_context_as_channels_and_the_attention_apart():
    """The context ``(B, C, HW) @ attn`` keeps the block's channels (the MLP's output joins the stream);
    the one-channel attention map is its own group (it is the matrix product's other operand, not a channel
    of the context). Its width is fixed by the model's reshape, so NT fuses it at the members' width only."""
    members = _members(GlobalContext)
    x = _x()
    graph = _fresh_trace(members[0], x)
    stream = next(g for g in graph.groups if "stem" in g.layers and "fc2" in g.layers)
    assert {"fc1", "conv_attn", "mix"} <= set(stream.layers) and stream.n_units == 6
    attn = next(g for g in graph.groups if g.name == "conv_attn")
    assert attn.n_units == 1 and set(attn.layers) == {"conv_attn"}
    with pytest.raises(fusion.FusionError, match="does not run"):
        fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)


@pytest.mark.parametrize(
    ("cls", "kw"),
    [(GlobalContext, {}), (PatchMerging, {}), (SelectiveKernel, {})],
    ids=["gc", "patch_merging", "selective_kernel"],
)
def test_without_the_channel_axis_torch_pruning_mapping_is_refused(cls, kw, monkeypatch):
    """Negative control: with torch-pruning's own reshape and matmul mappings (the channel axis not followed),
    these models are refused (an explosion of indices, channels claimed by no group) or their channels look
    mixed with each other (selective kernel's logits paired as i, i + 1) and are pinned in place: never
    moved wrongly, and with the channel axis followed, nothing is pinned."""
    model = _members(cls, 1, **kw)[0]
    assert not _fresh_trace(model, _x()).pinned
    monkeypatch.setattr(trace, "_reshapes_follow_channel_axis", lambda dg: None)
    try:
        graph = _fresh_trace(model, _x())
    except fusion.FusionError:
        return
    assert graph.pinned


def test_an_nhwc_split_along_the_last_axis_is_a_channel_split(monkeypatch):
    """MambaOut splits ``(B, H, W, C)`` along its last axis: a channel split only once the channel axis is
    followed (torch-pruning's convention, dim 1 of a 4-D tensor, sees none and the halves get mixed)."""
    model = _members(GatedConv, 1)[0]
    graph = _fresh_trace(model, _x())
    fc1_rows = [s for g in graph.groups for s in g.slots if s.tensor == "fc1.weight" and s.dim == 0]
    assert sum(int((s.positions >= 0).sum()) for s in fc1_rows) == 12
    monkeypatch.setattr(trace, "_axis_at", lambda node, ndim, axes, of_input: trace._channel_dim(ndim))
    with pytest.raises(fusion.FusionError):
        _fresh_trace(model, _x())


class SharedLayer(nn.Module):
    """One Linear called twice (CoaT shares its convolutional position encodings): torch-pruning makes it one
    node, so the graph of nodes has a cycle."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.tanh(self.shared(self.fc(x)))
        x = torch.tanh(self.shared(torch.tanh(self.mid(x))))
        return self.head(x)


def test_the_channel_axis_walk_ends_on_a_cycle_of_nodes():
    """The axes are propagated in one post-order pass that opens each node once (a walk that re-opened a node
    still in progress never ended here, and ran past the zoo's time limit on CoaT)."""
    import time

    torch.manual_seed(0)
    model = SharedLayer().eval()
    start = time.perf_counter()
    try:
        _fresh_trace(model, torch.randn(2, 4))
    except fusion.FusionError:
        pass  # a refusal is fine; the walk must end
    assert time.perf_counter() - start < 5


class Unfold(nn.Module):
    """MobileViT's unfold and fold: ``(B, C, H, W) -> (B * C * nh, ph, nw, pw) -> ... -> (B * P, N, C)``, a
    token layer, and back. On the way the channels are merged into the batch axis, where no channel axis
    holds them: torch-pruning's mapping stays there (segments of the batch made the fold-back a mixing)."""

    def __init__(self, c: int = 6, p: int = 2):
        super().__init__()
        self.p = p
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.token = nn.Linear(c, c)
        self.proj = nn.Conv2d(c, 5, 1)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        b, c, h, w = x.shape
        p, nh, nw = self.p, h // self.p, w // self.p
        x = x.reshape(b * c * nh, p, nw, p).transpose(1, 2)
        x = x.reshape(b, c, nh * nw, p * p).transpose(1, 3).reshape(b * p * p, nh * nw, c)
        x = x + F.gelu(self.token(x))
        x = x.contiguous().view(b, p * p, nh * nw, c).transpose(1, 3).reshape(b * c * nh, nw, p, p)
        x = x.transpose(1, 2).reshape(b, c, h, w)
        return self.head(F.relu(self.proj(x)).mean((2, 3)))


def test_channels_merged_into_the_batch_axis_keep_torch_pruning_mapping():
    members = _members(Unfold)
    x = _x()
    _fresh_trace(members[0], x)
    wide = fusion.fuse(members, "nt", example_inputs=x, sparsity=0.0)
    assert rel_err(model_out(wide, x), model_out(fusion.ensemble(members), x)) < 1e-5
