"""Git Re-Basin weight matching (Ainsworth, Hayase & Srinivasa, ICLR 2023), on the traced channel groups.

For two members, find one permutation per channel group of member B that maximises the summed inner
products ``sum_W <W_A, P(W_B)>`` over every tensor the groups touch (the rows a group produces, its bias and
normalization, and the columns its consumers read). Groups are coupled (a residual stream is read and
written by every block), so the permutations are found by coordinate descent: visit the groups in a random
order (``seed``), solve each one exactly as a linear assignment with the others fixed, and sweep until no
permutation changes (at most ``max_iter`` sweeps). Each step is the exact optimum of its sub-problem, so the
objective never decreases. For N > 2 members, MergeMany: align every member in turn to the mean of the
others (already aligned), until no permutation changes; the fused model is the mean of the aligned members.

No per-architecture permutation spec is written by hand: the groups come from the tracer (residual
streams, depthwise and grouped convolutions as whole blocks, attention heads as units).
"""

from __future__ import annotations

import torch

from ..align import average_aligned, register_planner
from ..build import check_runs
from ..errors import FusionError
from ..layers import is_float
from ..registry import register
from ..state import full_state
from ..trace import channel_groups
from .ot import WeightCost, _same, assignment, transform_tensor


def _check(max_iter, seed):
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise FusionError(f"max_iter must be a positive integer, got {max_iter!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FusionError(f"seed must be an integer, got {seed!r}")


def objective(graph, target: dict, member: dict, plans) -> float:
    """``sum <target, P(member)>`` over every floating-point tensor a group touches."""
    total = 0.0
    for name in graph.tensor_dims:
        t = target[name]
        if is_float(t):
            total += float((t.double() * transform_tensor(graph, name, member[name], plans).double()).sum())
    return total


def match(
    graph, target: dict, member: dict, *, max_iter: int, generator: torch.Generator, plans=None, trace=False
):
    """Permutations of ``member``'s groups maximising the inner product with ``target``; returns
    ``(plans, history)`` where ``history`` is the objective before the first and after every sweep (only
    with ``trace``: evaluating it costs a pass over every weight per sweep, about a third of the solve)."""
    n = len(graph.groups)
    plans = list(plans) if plans is not None else [None] * n
    versions = [0] * n
    cost = WeightCost(graph, target, member, incoming_only=False)
    history = [objective(graph, target, member, plans)] if trace else []
    for _ in range(max_iter):
        changed = False
        for gi in torch.randperm(n, generator=generator).tolist():
            c = cost(gi, plans, versions)
            if c is None:
                continue
            new = assignment(c)  # min squared distance == max inner product between permutations
            if plans[gi] is None and torch.equal(new, torch.arange(new.numel())):
                continue
            if not _same(new, plans[gi]):
                plans[gi], changed = new, True
                versions[gi] += 1
        if trace:
            history.append(objective(graph, target, member, plans))
        if not changed:
            break
    return plans, history


def weight_matching_plans(models, *, example_inputs=None, max_iter=100, seed=0, verify=True, history=None):
    """(graph, per member: its permutations). ``history``: a list that receives the objective per sweep."""
    _check(max_iter, seed)
    graph = channel_groups(models[0], example_inputs, verify=verify)
    gen = torch.Generator().manual_seed(seed)
    states = [full_state(m) for m in models]
    with torch.no_grad():
        if len(models) == 2:
            plans, hist = match(
                graph, states[0], states[1], max_iter=max_iter, generator=gen, trace=history is not None
            )
            if history is not None:
                history.append(hist)
            return graph, [None, plans]
        # MergeMany: each member against the mean of the others, in their current alignment
        member_plans: list = [None] * len(models)
        aligned = [dict(s) for s in states]
        for _ in range(max_iter):
            changed = False
            for i in torch.randperm(len(models), generator=gen).tolist():
                others = [aligned[j] for j in range(len(models)) if j != i]
                target = {
                    name: sum(o[name] for o in others) / len(others) if is_float(t) else t
                    for name, t in states[i].items()
                }
                plans, hist = match(
                    graph,
                    target,
                    states[i],
                    max_iter=max_iter,
                    generator=gen,
                    plans=member_plans[i],
                    trace=history is not None,
                )
                if history is not None:
                    history.append(hist)
                if not all(_same(p, q) for p, q in zip(plans, member_plans[i] or [None] * len(plans))):
                    member_plans[i], changed = plans, True
                    aligned[i] = {
                        name: transform_tensor(graph, name, t, plans) if is_float(t) else t
                        for name, t in states[i].items()
                    }
            if not changed:
                break
        return graph, _in_frame_of_first(member_plans)


def _in_frame_of_first(member_plans):
    """The same alignment expressed in member 0's frame (member 0 unpermuted): the fused model then reads
    like member 0, as OT's anchor does. Aligned unit i of member k is its unit ``perm_k[i]``; composing
    with the inverse of member 0's permutation renames the common frame's units."""
    first = member_plans[0]
    if first is None:
        return member_plans
    out = [None]
    for plans in member_plans[1:]:
        new = []
        for gi, p0 in enumerate(first):
            pk = None if plans is None else plans[gi]
            if p0 is None:
                new.append(pk)
                continue
            inverse = torch.argsort(p0)
            new.append(inverse if pk is None else pk[inverse])
        out.append(new)
    return out


@register("weight_matching")
def weight_matching(models, *, example_inputs=None, max_iter=100, seed=0, verify=True):
    """Permute the members to maximise weight inner products (Git Re-Basin; MergeMany for N > 2), then average."""
    graph, member_plans = weight_matching_plans(
        models, example_inputs=example_inputs, max_iter=max_iter, seed=seed, verify=verify
    )
    fused = average_aligned("weight_matching", models, graph, member_plans)
    check_runs(fused, example_inputs, like=models[0])
    return fused


register_planner("weight_matching")(weight_matching_plans)
