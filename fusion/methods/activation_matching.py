"""Git Re-Basin activation matching (Ainsworth, Hayase & Srinivasa, ICLR 2023), on the traced groups.

Every member runs once on a batch of inputs (``data``), hooked at the conv / linear layers that produce each
channel group (the pre-activation outputs; a unit of several channels -- a grouped-conv block, an attention
head -- is described by all of its channels). Per group, member i's units are matched to the anchor's
(member 0) by the linear assignment that maximises the summed Pearson correlation of their activations over
the batch (ties -- units constant over the batch -- broken by the distance of their raw activations).
Unlike weight matching the groups are independent (a unit's activations do not depend on how
other groups are permuted), so one assignment per group and member suffices; for N > 2 every member is
matched to the anchor. The fused model is the mean of the aligned members.
"""

from __future__ import annotations

import torch

from ..align import average_aligned, register_planner
from ..build import check_runs
from ..errors import FusionError
from ..registry import register
from ..trace import channel_groups
from .ot import _activation_features, assignment


def correlation(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between every row of ``fa`` and every row of ``fb`` (rows: units, columns: samples)."""
    fa = fa.double() - fa.double().mean(1, keepdim=True)
    fb = fb.double() - fb.double().mean(1, keepdim=True)
    fa = fa / fa.norm(dim=1, keepdim=True).clamp(min=1e-12)
    fb = fb / fb.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return fa @ fb.T


def score(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """Correlation, with ties broken by raw distance: units whose activations do not vary over the batch (a
    squeeze-excite unit after global pooling, a dead ReLU) have no correlation, but their constant values
    still tell them apart. The tie-breaker weighs at most 1e-3 per unit."""
    fa, fb = fa.double(), fb.double()
    d = (fa * fa).sum(1)[:, None] + (fb * fb).sum(1)[None, :] - 2 * fa @ fb.T
    return correlation(fa, fb) - 1e-3 * d.clamp(min=0) / d.max().clamp(min=1e-30)


def activation_matching_plans(models, *, example_inputs=None, data=None, verify=True):
    if data is None:
        raise FusionError("activation_matching needs a batch of inputs: pass data=<tensor of inputs>")
    graph = channel_groups(models[0], example_inputs if example_inputs is not None else data, verify=verify)
    anchor = _activation_features(models[0], graph, data)
    member_plans: list = [None]
    with torch.no_grad():
        for model in models[1:]:
            feats = _activation_features(model, graph, data)
            plans = []
            for fa, fb in zip(anchor, feats):
                plans.append(None if fa is None or fb is None else assignment(score(fa, fb), maximize=True))
            member_plans.append(plans)
    return graph, member_plans


@register("activation_matching")
def activation_matching(models, *, example_inputs=None, data=None, verify=True):
    """Permute the members to maximise activation correlations with member 0 on ``data``, then average."""
    graph, member_plans = activation_matching_plans(
        models, example_inputs=example_inputs, data=data, verify=verify
    )
    fused = average_aligned("activation_matching", models, graph, member_plans)
    check_runs(fused, example_inputs if example_inputs is not None else data)
    return fused


register_planner("activation_matching")(activation_matching_plans)
