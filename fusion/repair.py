"""Statistics repair of a fused model: ``fusion.repair(model, batches, members=..., mode=...)``.

Fusing changes what every layer sees, so the statistics a network relies on go stale: BatchNorm running
statistics describe the members' activations, not the fused model's, and averaged channels lose variance
("variance collapse", Jordan et al., *REPAIR*, ICLR 2023). Two repairs, both without training:

``mode="reset"``
    Recompute every BatchNorm's running mean and variance on the batches: a cumulative average (each batch
    weighs the same, torch's ``momentum=None``), the rest of the model in eval mode, no gradients. A model
    without BatchNorm has nothing to reset: an unchanged copy is returned, with a warning.

``mode="repair"`` (REPAIR)
    Give every channel of the fused model the statistics that its sources have in the members. Which member
    units a fused unit is made of comes from the provenance the fusion method attached
    (:mod:`fusion.provenance`): the average over the aligned members' units for averaging and alignment
    methods (weighted like the fusion, e.g. ``(1 - a, a)`` on an interpolation path), the kept unit's own
    member for NT. The targets are the weighted means of the sources' per-channel mean and standard deviation.

    Where the statistics are taken and corrected:

    * a channel written by a conv / linear layer that feeds a BatchNorm is measured *after that BatchNorm,
      before any activation* (computed exactly from the BatchNorm's input statistics and its parameters, so
      timm's fused ``BatchNormAct`` layers work too). The BatchNorm's running statistics are set to its
      input's statistics and its affine weight and bias to the target std and mean;
    * any other conv / linear layer that produces a traced group is measured at its output and corrected by
      folding the scale into its weight rows and the shift into its bias (the architecture does not change).
      A layer without bias gets the scale only; a BatchNorm without affine parameters gets its statistics
      reset only.

    Layers are corrected in execution order, each measured with every earlier correction in place, so the
    statistics of every corrected channel equal their targets on the batches given (up to the variance of
    the estimate). Memory: per-channel running sums only, never stored activations.

Both modes return a new model (the input is not modified, not even its mode), on the input's device, in
eval mode, with the same parameter names and shapes: it loads into a fresh model of the architecture.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from .api import check_members
from .errors import FusionError
from .layers import OUT
from .provenance import provenance_of
from .trace import channel_groups

MODES = ("reset", "repair")
_BN = nn.modules.batchnorm._BatchNorm


def repair(model: nn.Module, batches, *, members=None, mode: str = "reset", example_inputs=None) -> nn.Module:
    """Repaired copy of ``model``; see the module docstring. ``batches``: input tensors or (inputs, labels)."""
    if not isinstance(model, nn.Module):
        raise FusionError(f"repair() takes a model, got {type(model).__name__}")
    if mode not in MODES:
        raise FusionError(f"unknown repair mode {mode!r}; available: {', '.join(MODES)}")
    params = list(model.parameters())
    if not params:
        raise FusionError("the model has no parameters: nothing to repair")
    device = params[0].device
    inputs = _inputs(batches, device)
    fused = copy.deepcopy(model)
    if mode == "reset":
        if not any(isinstance(m, _BN) for m in fused.modules()):
            warnings.warn(
                "repair(mode='reset'): the model has no BatchNorm, nothing to reset; returning an unchanged copy",
                stacklevel=2,
            )
            return fused.eval()
        return reset_batchnorm(fused, inputs).eval()
    return _repair(fused, inputs, members, example_inputs)


# ----------------------------------------------------------------------------- input
def _inputs(batches, device) -> list[torch.Tensor]:
    if batches is None or isinstance(batches, (torch.Tensor, nn.Module)) or not hasattr(batches, "__iter__"):
        raise FusionError(
            "batches must be an iterable of input tensors or (inputs, labels) pairs, "
            f"got {type(batches).__name__}"
        )
    out = []
    for i, batch in enumerate(batches):
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, torch.Tensor):
            raise FusionError(
                f"batch {i} is a {type(batch).__name__}, not a tensor or an (inputs, labels) pair"
            )
        if x.dim() == 0 or x.shape[0] == 0:
            raise FusionError(f"batch {i} is empty")
        out.append(x.to(device))
    if not out:
        raise FusionError("repair needs at least one batch of inputs, got none")
    return out


# ----------------------------------------------------------------------------- reset
@torch.no_grad()
def reset_batchnorm(model: nn.Module, inputs: list[torch.Tensor]) -> nn.Module:
    """Recompute BatchNorm running statistics in place: cumulative average over ``inputs``."""
    model.eval()
    saved = {}
    for m in model.modules():
        if isinstance(m, _BN) and m.track_running_stats:
            saved[m] = m.momentum
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch weighs the same
            m.train()
    try:
        for x in inputs:
            model(x)
    finally:
        for m, momentum in saved.items():
            m.momentum = momentum
            m.eval()
    return model


# ----------------------------------------------------------------------------- statistics
class _Moments:
    """Per-channel count, sum and sum of squares (float64) of a stream of tensors."""

    def __init__(self) -> None:
        self.n = 0
        self.s = None
        self.ss = None

    def add(self, t: torch.Tensor, channel_dim: int) -> None:
        t = t.detach().double().movedim(channel_dim, -1).reshape(-1, t.shape[channel_dim])
        s, ss = t.sum(0), (t * t).sum(0)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += t.shape[0]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        var = (self.ss / self.n - mean * mean).clamp(min=0)
        return mean, var.sqrt()


def _channel_dim(module: nn.Module, t: torch.Tensor) -> int:
    return t.dim() - 1 if isinstance(module, nn.Linear) else 1


@torch.no_grad()
def _measure(
    model: nn.Module, inputs, points: dict[str, str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per point (module name -> "in" for a BatchNorm's input, "out" for a layer's output): mean and std."""
    modules = dict(model.named_modules())
    moments = {name: _Moments() for name in points}
    handles = []
    for name, side in points.items():
        mod = modules[name]
        if side == "in":
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: moments[n].add(a[0], 1)))
        else:
            handles.append(
                mod.register_forward_hook(lambda m, a, o, n=name: moments[n].add(o, _channel_dim(m, o)))
            )
    was = model.training
    model.eval()
    try:
        for x in inputs:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {name: mom.mean_std() for name, mom in moments.items() if mom.n}


def _bn_output(bn: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of a BatchNorm's (eval-mode) output, from its input's per-channel mean and std."""
    rm = bn.running_mean.double() if bn.running_mean is not None else mean
    rv = bn.running_var.double() if bn.running_var is not None else std * std
    inv = 1.0 / torch.sqrt(rv + bn.eps)
    w = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    b = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    return (mean - rm) * inv * w + b, std * inv * w.abs()


@torch.no_grad()
def _execution_order(model: nn.Module, x: torch.Tensor, names) -> tuple[list[str], set[str]]:
    """The points in the order they run, and the producers whose output goes straight into a BatchNorm."""
    modules = dict(model.named_modules())
    order, produced, feeds_bn = [], {}, set()
    handles = []
    for name in names:
        mod = modules[name]

        def pre(m, a, n=name):
            if n not in order:
                order.append(n)
            if isinstance(m, _BN) and a and id(a[0]) in produced:
                feeds_bn.add(produced[id(a[0])][0])

        handles.append(mod.register_forward_pre_hook(pre))
        if not isinstance(mod, _BN):
            # the output itself is kept alive with its id: a freed tensor's id could be reused by another
            handles.append(
                mod.register_forward_hook(lambda m, a, o, n=name: produced.__setitem__(id(o), (n, o)))
            )
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return order, feeds_bn


# ----------------------------------------------------------------------------- REPAIR
def _points(graph) -> dict[str, list[tuple[int, object]]]:
    """Module name -> the (group, slot) pairs of its output channels: producing conv/linear layers and
    BatchNorms of traced groups."""
    points: dict[str, list] = {}
    for gi, g in enumerate(graph.groups):
        for s in g.slots:
            if s.role != OUT or s.dim != 0:
                continue
            producer = s.is_weight and s.kind in ("conv", "linear") and s.tensor.endswith(".weight")
            norm = s.kind == "bn" and (s.tensor.endswith(".weight") or s.tensor.endswith(".running_mean"))
            if producer or norm:
                points.setdefault(s.layer, [])
                if all(gi != h for h, _ in points[s.layer]):
                    points[s.layer].append((gi, s))
    return points


def _to_units(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-channel ``values`` [C] gathered to [U, u, r] along a slot's positions (0 where absent)."""
    pos = positions.to(values.device)
    return values[pos.clamp(min=0)] * (pos >= 0)


def _targets(name, fused_slots, member_slots, prov, graph_m, member_stats, c_fused):
    """Target mean and std per fused channel of point ``name``; NaN where no slot covers a channel."""
    mean = torch.full((c_fused,), float("nan"), dtype=torch.float64)
    std = torch.full((c_fused,), float("nan"), dtype=torch.float64)
    for (gi, s_f), (gj, s_m) in zip(fused_slots, member_slots):
        if gi != gj:
            raise FusionError(
                f"layer {name!r} belongs to different channel groups in the fused model and members"
            )
        n_units = graph_m.groups[gi].n_units
        means = [_to_units(st[name][0].cpu(), s_m.positions) for st in member_stats]
        stds = [_to_units(st[name][1].cpu(), s_m.positions) for st in member_stats]
        t_mean, t_std = prov.combine(gi, n_units, means), prov.combine(gi, n_units, stds)
        pos = s_f.positions
        if t_mean.shape != pos.shape:
            raise FusionError(
                f"provenance of group {graph_m.groups[gi].name!r} has {t_mean.shape[0]} units but the fused "
                f"model has {pos.shape[0]}"
            )
        valid = pos >= 0
        mean[pos[valid]] = t_mean[valid]
        std[pos[valid]] = t_std[valid]
    return mean, std


@torch.no_grad()
def _repair(fused: nn.Module, inputs, members, example_inputs) -> nn.Module:
    if members is None:
        raise FusionError("repair(mode='repair') needs the members that were fused: pass members=[...]")
    members = check_members(members)
    for m in members:
        if type(m) is not type(fused):
            raise FusionError(
                f"members are {type(m).__name__} models but the fused model is a {type(fused).__name__}"
            )
    prov = provenance_of(fused)
    if prov is None:
        raise FusionError(
            "the model carries no fusion provenance (not made by fusion.fuse / fusion.interpolate): "
            "REPAIR cannot tell which member units its units come from; use mode='reset'"
        )
    if prov.n_members != len(members):
        raise FusionError(f"the model was fused from {prov.n_members} members but {len(members)} were given")
    example = example_inputs if example_inputs is not None else inputs[0][:2]
    graph_m = channel_groups(members[0], example)
    graph_f = channel_groups(fused, example)
    if [g.name for g in graph_m.groups] != [g.name for g in graph_f.groups]:
        raise FusionError("the fused model's channel groups do not correspond to the members' groups")
    points_m, points_f = _points(graph_m), _points(graph_f)
    if set(points_m) != set(points_f):
        raise FusionError("the fused model's layers do not correspond to the members' layers")
    modules = dict(fused.named_modules())
    order, feeds_bn = _execution_order(fused, example.to(inputs[0].device), list(points_f))
    sides = {n: ("in" if isinstance(modules[n], _BN) else "out") for n in points_f}
    member_stats = []
    for member in members:
        stats = _measure(member, inputs, sides)
        mod_m = dict(member.named_modules())
        for n, side in sides.items():  # BatchNorm points: the statistics after the BatchNorm
            if side == "in" and n in stats:
                stats[n] = _bn_output(mod_m[n], *stats[n])
        member_stats.append(stats)
    for name in order:
        if name in feeds_bn:
            continue  # its BatchNorm is corrected instead
        mod = modules[name]
        stats = _measure(fused, inputs, {name: sides[name]}).get(name)
        if stats is None or any(name not in st for st in member_stats):
            continue
        mean, std = stats
        t_mean, t_std = _targets(
            name, points_f[name], points_m[name], prov, graph_m, member_stats, mean.numel()
        )
        t_mean, t_std = t_mean.to(mean.device), t_std.to(mean.device)
        ok = ~torch.isnan(t_mean)
        if isinstance(mod, _BN):
            _correct_bn(mod, mean, std, t_mean, t_std, ok)
        else:
            _correct_layer(mod, mean, std, t_mean, t_std, ok)
    return fused.eval()


def _correct_bn(bn, mean, std, t_mean, t_std, ok) -> None:
    dtype = bn.running_mean.dtype if bn.running_mean is not None else torch.float32
    if bn.running_mean is not None:
        bn.running_mean.copy_(torch.where(ok, mean, bn.running_mean.double()).to(dtype))
        bn.running_var.copy_(torch.where(ok, std * std, bn.running_var.double()).to(dtype))
    if bn.weight is None:
        return
    var = bn.running_var.double() if bn.running_var is not None else std * std
    # output std = std * |w| / sqrt(var + eps): choose |w| for the target, keep the sign
    scale = torch.where(
        std > 0, t_std * torch.sqrt(var + bn.eps) / std.clamp(min=1e-12), torch.zeros_like(std)
    )
    sign = torch.where(bn.weight.double() < 0, -1.0, 1.0)
    new_w = torch.where(ok, sign * scale, bn.weight.double())
    new_b = torch.where(ok, t_mean, bn.bias.double())
    bn.weight.copy_(new_w.to(bn.weight.dtype))
    bn.bias.copy_(new_b.to(bn.bias.dtype))


def _correct_layer(layer, mean, std, t_mean, t_std, ok) -> None:
    a = torch.where(ok & (std > 1e-12), t_std / std.clamp(min=1e-12), torch.ones_like(std))
    w = layer.weight
    w.mul_(a.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1))))
    if getattr(layer, "bias", None) is not None:
        c = torch.where(ok, t_mean - a * mean, torch.zeros_like(mean))
        layer.bias.copy_((layer.bias.double() * a + c).to(layer.bias.dtype))
