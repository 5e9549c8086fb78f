"""Git Re-Basin weight matching (Ainsworth, Hayase & Srinivasa, ICLR 2023), on the traced channel groups.

For two members, find one permutation per channel group of member B that maximises the summed inner
products ``sum_W <W_A, P(W_B)>`` over every tensor the groups touch (the rows a group produces, its bias and
normalization, and the columns its consumers read). Groups are coupled (a residual stream is read and
written by every block), so the permutations are found by coordinate descent: visit the groups in a random
order (``seed``), solve each one exactly as a linear assignment with the others fixed, and sweep until no
permutation changes (at most ``max_iter`` sweeps). Each step is the exact optimum of its sub-problem, so the
objective never decreases. For N > 2 members, MergeMany: align every member in turn to the mean of the
others (already aligned), until no permutation changes or a round raises MergeMany's objective by at most
``tol`` (relative); the fused model is the mean of the aligned members.

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


def _check(max_iter, seed, tol=0.0):
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise FusionError(f"max_iter must be a positive integer, got {max_iter!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FusionError(f"seed must be an integer, got {seed!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise FusionError(f"tol must be a number in [0, 1), got {tol!r}")


def objective(graph, target: dict, member: dict, plans) -> float:
    """``sum <target, P(member)>`` over every floating-point tensor a group touches."""
    total = 0.0
    for name in graph.tensor_dims:
        t = target[name]
        if is_float(t):
            total += float((t.double() * transform_tensor(graph, name, member[name], plans).double()).sum())
    return total


def match(
    graph,
    target: dict,
    member: dict,
    *,
    max_iter: int,
    generator: torch.Generator,
    plans=None,
    trace=False,
    converged_flag=False,
    start=None,
):
    """Permutations of ``member``'s groups maximising the inner product with ``target``; returns
    ``(plans, history)`` where ``history`` is the objective before the first and after every sweep (only
    with ``trace``: evaluating it costs a pass over every weight per sweep, about a third of the solve);
    with ``converged_flag`` also whether the last sweep changed nothing (rather than ``max_iter`` ran out).
    ``start``: ``member`` with ``plans`` applied, if at hand (the first sweep reads its features there)."""
    n = len(graph.groups)
    plans = list(plans) if plans is not None else [None] * n
    versions = [0] * n
    cost = WeightCost(
        graph,
        target,
        member,
        incoming_only=False,
        incremental=True,
        start=None if start is None else (start, list(plans)),
    )
    history = [objective(graph, target, member, plans)] if trace else []
    changed = True
    for _ in range(max_iter):
        changed = False
        for gi in torch.randperm(n, generator=generator).tolist():
            c = cost.cross(gi, plans, versions)
            if c is None:
                continue
            new = assignment(c, maximize=True)  # max inner product == min squared distance
            if plans[gi] is None and torch.equal(new, torch.arange(new.numel())):
                continue
            if not _same(new, plans[gi]):
                plans[gi], changed = new, True
                versions[gi] += 1
        if trace:
            history.append(objective(graph, target, member, plans))
        if not changed:
            break
    return (plans, history, not changed) if converged_flag else (plans, history)


def weight_matching_plans(
    models, *, example_inputs=None, max_iter=100, seed=0, verify=True, tol=0.0, history=None, rounds=None
):
    """(graph, per member: its permutations). ``history``: a list that receives the objective per sweep of
    every match; ``rounds``: a list that receives MergeMany's objective (the sum of the aligned members'
    pairwise inner products) before the first round and after every round (N > 2 only)."""
    _check(max_iter, seed, tol)
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
        return graph, _in_frame_of_first(
            merge_many(
                graph, states, max_iter=max_iter, generator=gen, tol=tol, history=history, rounds=rounds
            )
        )


def _aligned_sum(names, aligned) -> dict:
    """The members' sum per tensor, in float64 (summed afresh, in member order)."""
    total = {}
    for name in names:
        acc = aligned[0][name].to(torch.float64, copy=True)  # never the member's own tensor
        for a in aligned[1:]:
            acc += a[name]
        total[name] = acc
    return total


def merge_many(graph, states, *, max_iter, generator, tol=0.0, history=None, rounds=None):
    """MergeMany: every member in turn (random order per round) matched to the mean of the others in their
    current alignment; per member its plans (None: never moved).

    The objective ``F = sum_{i<j} <A_i, A_j>`` over the aligned members ``A`` is ``<A_i, S - A_i>`` plus terms
    without member i (``S``: the members' sum), so member i's match (coordinate steps that never lower
    ``<A_i, S - A_i>``, started at its current plans) never lowers ``F``. Hence:

    * the target of member i is ``(S - A_i) / (N - 1)`` from a running sum ``S`` (float64, updated when a
      member's alignment changes, summed afresh at the start of every round so rounding cannot drift) instead
      of N - 1 states summed per match;
    * a member none of whose others changed since its last (converged) match has the same target, so its match
      would find the same plans: it is skipped (its group order is still drawn, so the random stream, hence
      every later match, is the one of running it);
    * ``F = (|S|^2 - sum_i |A_i|^2) / 2`` and permutations keep ``|A_i|``, so ``F`` costs one pass over ``S``
      per round. Rounds stop when none changes a permutation (``tol=0``: the only rule) or when a round raises
      ``F`` by at most ``tol * |F|``.
    """
    n_members = len(states)
    names = [name for name in graph.tensor_dims if is_float(states[0][name])]
    aligned = [dict(s) for s in states]
    member_plans: list = [None] * n_members
    const = sum(float(s[name].double().square().sum()) for s in states for name in names)
    # per member: the count of alignment changes of the others when it last converged (None: must match)
    changes, seen = 0, [None] * n_members
    per_member = [0] * n_members

    def value(total):
        return 0.5 * (sum(float(t.square().sum()) for t in total.values()) - const)

    total = _aligned_sum(names, aligned)
    last = value(total)
    if rounds is not None:
        rounds.append(last)
    for _ in range(max_iter):
        changed = False
        for i in torch.randperm(n_members, generator=generator).tolist():
            if seen[i] is not None and changes - per_member[i] == seen[i]:
                torch.randperm(len(graph.groups), generator=generator)  # the one sweep the match would do
                continue
            target = dict(states[i])
            for name in names:
                mean = torch.sub(total[name], aligned[i][name]).div_(n_members - 1)
                target[name] = mean.to(states[i][name].dtype)
            plans, hist, converged = match(
                graph,
                target,
                states[i],
                max_iter=max_iter,
                generator=generator,
                plans=member_plans[i],
                trace=history is not None,
                converged_flag=True,
                start=aligned[i] if member_plans[i] is not None else None,
            )
            if history is not None:
                history.append(hist)
            if not all(_same(p, q) for p, q in zip(plans, member_plans[i] or [None] * len(plans))):
                member_plans[i], changed = plans, True
                new = {name: transform_tensor(graph, name, states[i][name], plans) for name in names}
                for name in names:
                    total[name] += new[name]
                    total[name] -= aligned[i][name]
                aligned[i] = {**aligned[i], **new}
                changes += 1
                per_member[i] += 1
            seen[i] = changes - per_member[i] if converged else None
        total = _aligned_sum(names, aligned)
        now = value(total)
        if rounds is not None:
            rounds.append(now)
        if not changed or (tol > 0 and now - last <= tol * abs(now)):
            break
        last = now
    return member_plans


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
def weight_matching(models, *, example_inputs=None, max_iter=100, seed=0, verify=True, tol=0.0):
    """Permute the members to maximise weight inner products (Git Re-Basin; MergeMany for N > 2), then average.
    ``tol``: MergeMany stops once a round raises its objective by at most ``tol`` (relative); 0: only once no
    permutation changes."""
    graph, member_plans = weight_matching_plans(
        models, example_inputs=example_inputs, max_iter=max_iter, seed=seed, verify=verify, tol=tol
    )
    fused = average_aligned("weight_matching", models, graph, member_plans)
    check_runs(fused, example_inputs, like=models[0])
    return fused


register_planner("weight_matching")(weight_matching_plans)
