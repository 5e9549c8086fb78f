"""Optimal-Transport fusion (Singh & Jaggi, 2020), generalised through the traced channel groups.

Every member is aligned to an anchor (member 0 by default), group by group, then the aligned weights are
averaged. For a group, the ground metric is the squared distance between units' feature vectors:

* ``ground_metric="weights"`` (default): a unit's weights — its incoming weights (every tensor slice the
  group produces: the layer's rows, its bias, normalization parameters and statistics...) and its outgoing
  weights (the consumers' columns) — after the member's other groups have been aligned to the anchor with
  their current plans;
* ``ground_metric="activations"``: the unit's pre-activation outputs (of the conv / linear layers that
  produce it) on a data batch passed as ``data``.

The transport plan comes from POT with uniform marginals: ``solver="emd"`` (exact, ``ot.emd``; between equal
widths it is a permutation) or ``solver="sinkhorn"`` (entropic, ``ot.sinkhorn`` with ``reg`` relative to the
largest cost). The plan is applied normalised by its marginal, ``M = diag(1/a) T``, to every slot of the group
(skip paths, depthwise convs, normalization layers and the next layers' inputs get the same alignment).

In weights mode the groups depend on each other (a residual stream is read and written by many layers), so
the plans are found by coordinate descent: sweep over the groups in forward order, re-solving each group
with the others fixed, until no plan changes (at most ``max_iter`` sweeps) — Git Re-Basin's weight matching
when the solver is exact. Cost matrices are computed on the members' device; only the small U x U plan
problem goes through POT.
"""

from __future__ import annotations

import numpy as np
import ot
import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from ..align import average_aligned, register_planner
from ..build import check_runs
from ..errors import FusionError
from ..groups import ChannelGraph
from ..layers import OUT, is_float
from ..registry import register
from ..state import full_state, map_inputs, meta_copy
from ..trace import channel_groups

SOLVERS = ("emd", "sinkhorn")
METRICS = ("weights", "activations")


def _check(models, anchor, ground_metric, solver, reg, data, max_iter):
    if isinstance(anchor, bool) or not isinstance(anchor, int) or not 0 <= anchor < len(models):
        raise FusionError(f"anchor must be a member index in [0, {len(models) - 1}], got {anchor!r}")
    if solver not in SOLVERS:
        raise FusionError(f"unknown OT solver {solver!r}; available: {', '.join(SOLVERS)}")
    if ground_metric not in METRICS:
        raise FusionError(f"unknown ground_metric {ground_metric!r}; available: {', '.join(METRICS)}")
    if solver == "sinkhorn" and (isinstance(reg, bool) or not isinstance(reg, (int, float)) or not reg > 0):
        raise FusionError(f"sinkhorn needs a positive regularisation reg, got {reg!r}")
    if ground_metric == "activations" and data is None:
        raise FusionError("ground_metric='activations' needs a data batch: pass data=<tensor of inputs>")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise FusionError(f"max_iter must be a positive integer, got {max_iter!r}")


# ----------------------------------------------------------------------------- applying plans
def _permutation_index(graph: ChannelGraph, gi: int, si: int, perm: torch.Tensor):
    """(dst, src): along the slot's dimension, position ``dst[k]`` receives the old ``src[k]`` under ``perm``."""
    pos = graph.groups[gi].slots[si].positions
    dst, src = pos.reshape(-1), pos[perm.cpu()].reshape(-1)
    valid = dst >= 0
    if not torch.equal(valid, src >= 0):
        raise FusionError(f"units of group {graph.groups[gi].name!r} differ in shape; cannot permute")
    return dst[valid], src[valid]


def transform_tensor(graph: ChannelGraph, name: str, t: torch.Tensor, plans, skip: int | None = None):
    """``t`` with every group's plan applied along the dimensions the group occupies.

    A plan is ``None`` (identity), a permutation (LongTensor: new unit i is old unit ``perm[i]``) or a
    row-stochastic matrix ``M`` (new unit i is ``sum_j M[i, j]`` old unit j).
    """
    for d, refs in graph.tensor_dims.get(name, {}).items():
        for gi, si in refs:
            plan = plans[gi]
            if gi == skip or plan is None:
                continue
            pos = graph.groups[gi].slots[si].positions
            if plan.dim() == 1:
                dst, src = _permutation_index(graph, gi, si, plan)
                idx = torch.arange(t.shape[d])
                idx[dst] = src
                t = t.index_select(d, idx.to(t.device))
            else:
                if (pos < 0).any():
                    raise FusionError(f"soft plans are not supported for group {graph.groups[gi].name!r}")
                flat = pos.reshape(pos.shape[0], -1)
                tm = t.movedim(d, 0)
                rows = tm[flat.reshape(-1).to(t.device)].reshape(flat.shape[0], flat.shape[1], *tm.shape[1:])
                mixed = torch.tensordot(plan.to(t.dtype), rows, dims=([1], [0]))
                out = tm.clone()
                out[flat.reshape(-1).to(t.device)] = mixed.reshape(-1, *tm.shape[1:])
                t = out.movedim(0, d)
    return t


# ----------------------------------------------------------------------------- costs
def _unit_features(t: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    tm = t.movedim(dim, 0)
    if positions.numel() == tm.shape[0] and torch.equal(positions.reshape(-1), torch.arange(tm.shape[0])):
        return tm.reshape(positions.shape[0], -1).float()  # the group is the whole dimension, in order
    idx = positions.to(t.device)
    if (idx >= 0).all():
        return tm[idx].reshape(positions.shape[0], -1).float()
    rows = tm[idx.clamp(min=0)]  # [U, u, r, *rest]
    mask = (idx >= 0).reshape(*idx.shape, *([1] * (rows.dim() - 3)))
    return (rows * mask).reshape(positions.shape[0], -1).float()


def _permuted_features(graph: ChannelGraph, t: torch.Tensor, gi: int, si: int, plans) -> torch.Tensor:
    """Group ``gi``'s unit features in slot ``si`` of ``t`` once every other group's permutation is applied:
    ``_unit_features(transform_tensor(..., skip=gi), ...)`` for permutation plans, in one copy of ``t``
    (one ``index_select`` per other dimension, all of its groups' permutations in one index) instead of a
    copy per group and another for the features."""
    s = graph.groups[gi].slots[si]
    tm = t.movedim(s.dim, 0)
    for d, refs in graph.tensor_dims[s.tensor].items():
        if d == s.dim:  # other groups on the slot's own dimension move only units outside this group
            continue
        idx = None
        for h, hi in refs:
            if h == gi or plans[h] is None:
                continue
            if idx is None:
                idx = torch.arange(t.shape[d])
            dst, src = _permutation_index(graph, h, hi, plans[h])
            idx[dst] = src
        if idx is not None:
            tm = tm.index_select(d + 1 if d < s.dim else d, idx.to(t.device))
    return _unit_features(tm, s.positions, 0)


def _sq_distances(fa: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    return (fa * fa).sum(1)[:, None] + (fb * fb).sum(1)[None, :] - 2 * (fa @ fb.T)


class WeightCost:
    """Squared distances between the units of one group, over the weights the group touches.

    ``incoming_only``: only the slices the group produces (Singh & Jaggi's incoming weights); otherwise its
    outgoing weights too, which makes the sum over groups Git Re-Basin's weight-matching objective, so that
    re-solving one group with the others fixed never makes the total worse.

    The cost is a sum over the group's slots of ``|a|^2 + |b|^2 - 2 <a, b>`` terms, and a slot's cross term
    depends only on the plans of the groups on its tensor's other dimensions. Each slot's term is kept with
    the plan versions it was computed at and recomputed only when one of those changed: when one layer's
    input alignment changes, only that layer's product is redone, not the group's other layers (a residual
    stream touches many). The anchor's side never changes and is computed once (shared by every member
    through ``anchor_cache``); a member's unit norms are computed once while the other groups' plans are
    permutations (which only reorder a unit's weights). A recomputation copies the member tensor once (all
    its other groups' permutations in one index per dimension).
    """

    #: incremental updates of a kept term before it is recomputed from scratch (bounds float drift)
    REFRESH = 8

    def __init__(
        self,
        graph: ChannelGraph,
        anchor: dict,
        member: dict,
        incoming_only: bool,
        anchor_cache=None,
        incremental: bool = False,
        start=None,
    ):
        self.graph, self.anchor, self.member = graph, anchor, member
        self.incoming_only = incoming_only
        self.incremental = incremental and not incoming_only
        # (the member's state with the plans ``plans`` applied, plans): while a slot's groups still hold those
        # plans, its features are read from that state instead of permuting the member's tensor again
        self._start = start
        self._anchor: dict[int, tuple[list, torch.Tensor]] = {} if anchor_cache is None else anchor_cache
        # per (group, slot): (plan versions of the slot's other groups, cross term, their plans, updates)
        self._terms: dict[tuple[int, int], tuple] = {}
        # per (group, slot): the member's unit norms, which permutations of other groups do not change
        self._norms: dict[tuple[int, int], torch.Tensor] = {}
        # per group: the plan versions of its dependencies when it was last costed and solved
        self._solved_at: dict[int, tuple] = {}
        self.deps = [dependencies(graph, gi, incoming_only) for gi in range(len(graph.groups))]
        self._slots = [self._select(gi) for gi in range(len(graph.groups))]

    def _select(self, gi):
        """Per costed slot: (slot index, slot, the groups on its tensor's other dimensions, keep its term).

        A term is kept (U x U floats) only where reusing it can pay: the group is revisited (weight
        matching's objective, a cyclic coordinate descent), its slots do not all depend on the same groups,
        and the slot's product is worth more than its storage (at least 16 features per unit).
        """
        chosen = []
        for si, s in enumerate(self.graph.groups[gi].slots):
            if is_float(self.anchor[s.tensor]) and (s.role == OUT or not self.incoming_only):
                others = tuple(
                    sorted(
                        {h for refs in self.graph.tensor_dims[s.tensor].values() for h, _ in refs if h != gi}
                    )
                )
                chosen.append((si, s, others))
        mixed = len({others for _, _, others in chosen}) > 1
        out = []
        for si, s, others in chosen:
            per_unit = self.anchor[s.tensor].numel() // max(1, s.positions.shape[0])
            worth = not self.incoming_only and per_unit >= 16
            out.append((si, s, others, worth and (mixed or self.incremental)))
        return out

    def slots(self, gi):
        return [s for _, s, _, _ in self._slots[gi]]

    def _member_features(self, gi: int, si: int, s, others, plans):
        """The member's features for one slot under the current plans."""
        b = self.member[s.tensor]
        if any(plans[h] is not None and plans[h].dim() != 1 for h in others):  # a soft plan mixes units
            return _unit_features(
                transform_tensor(self.graph, s.tensor, b, plans, skip=gi), s.positions, s.dim
            )
        return _permuted_features(self.graph, b, gi, si, plans)

    def _member_side(self, gi: int, si: int, s, others, plans):
        """The member's features for one slot under the current plans, and their squared norms."""
        if any(plans[h] is not None and plans[h].dim() != 1 for h in others):  # a soft plan mixes units
            fb = self._member_features(gi, si, s, others, plans)
            return fb, (fb * fb).sum(1)
        fb = self._member_features(gi, si, s, others, plans)
        norms = self._norms.get((gi, si))
        if norms is None:
            norms = self._norms[(gi, si)] = (fb * fb).sum(1)
        return fb, norms

    def __call__(self, gi: int, plans, versions) -> torch.Tensor | None:
        return self._cost(gi, plans, versions, norms=True)

    def cross(self, gi: int, plans, versions) -> torch.Tensor | None:
        """The cost's cross term alone, ``sum_slots <a_u, b_v>`` (None as for the cost). Over permutations the
        squared distance is ``|a_u|^2 + |b_v|^2 - 2 <a_u, b_v>`` summed along a permutation, so the norms add
        the same constant to every permutation's total: maximising this term is minimising the cost, without
        computing norms or the U x U sum (weight matching needs no more)."""
        return self._cost(gi, plans, versions, norms=False)

    def _term_at_start(self, gi: int, s, others, plans, fa):
        """The slot's cross term from the start state, or None when a plan moved since or it does not apply.

        The start state holds every group's plan, this group's too: its unit ``u`` is the member's unit
        ``plan[u]``, so its products with ``fa`` are the term's columns in the order ``plan``, and the term is
        that product with the columns put back (``[:, argsort(plan)]``): one U x U gather, no copy of the
        member's tensor under the other groups' permutations."""
        if self._start is None:
            return None
        state, start = self._start
        if any(plans[h] is not start[h] for h in (gi, *others)):
            return None
        if any(p is not None and p.dim() != 1 for p in (plans[gi], *(plans[h] for h in others))):
            return None
        dims = self.graph.tensor_dims[s.tensor]
        if any(h == gi for d, refs in dims.items() if d != s.dim for h, _ in refs):
            return None  # the group also on another dimension: its cost leaves that one unpermuted
        term = fa @ _unit_features(state[s.tensor], s.positions, s.dim).T
        return term if plans[gi] is None else term[:, torch.argsort(plans[gi]).to(term.device)]

    def _update(self, gi: int, si: int, s, others, cached, plans, slot_key):
        """A kept term brought to the current plans from the change alone, or None (recompute it).

        The term is ``sum_c <a[u, c], b[v, idx[c]]>`` over the tensor's other dimension, ``idx`` being what the
        other groups' permutations make of it. When they move only the positions ``K`` (a few units swapped),
        the new term is the old one plus ``a[:, K] (b[:, new[K]] - b[:, old[K]])^T``: a product over ``|K|``
        positions instead of all. Exact up to rounding; a term is recomputed after ``REFRESH`` updates, when
        a third of the positions or more moved, or where this form does not apply (more than one other
        dimension, soft plans, units with missing channels).
        """
        _, term, old, updates = cached
        dims = self.graph.tensor_dims[s.tensor]
        if updates >= self.REFRESH or len(dims) != 2 or (s.positions < 0).any():
            return None
        if any(p is not None and p.dim() != 1 for p in (*old.values(), *(plans[h] for h in others))):
            return None
        ((d, refs),) = [(d, refs) for d, refs in dims.items() if d != s.dim]
        a, b = self.anchor[s.tensor], self.member[s.tensor]

        def index(pl):
            idx = torch.arange(b.shape[d])
            for h, hi in refs:
                if h != gi and pl[h] is not None:
                    dst, src = _permutation_index(self.graph, h, hi, pl[h])
                    idx[dst] = src
            return idx

        was, now = index(old), index(plans)
        moved = (was != now).nonzero().flatten()
        if 3 * moved.numel() >= b.shape[d]:
            return None
        if moved.numel():
            fa = _unit_features(a.index_select(d, moved.to(a.device)), s.positions, s.dim)
            fb_now = _unit_features(b.index_select(d, now[moved].to(b.device)), s.positions, s.dim)
            fb_was = _unit_features(b.index_select(d, was[moved].to(b.device)), s.positions, s.dim)
            term.addmm_(fa, (fb_now - fb_was).T)
        entry = (slot_key, term, {h: plans[h] for h in others}, updates + 1)
        self._terms[(gi, si)] = entry
        return entry

    def _cost(self, gi: int, plans, versions, norms: bool) -> torch.Tensor | None:
        key = tuple(versions[h] for h in sorted(self.deps[gi]))
        if self._solved_at.get(gi) == key:
            return None  # unchanged since the group was last solved: so is its plan
        slots = self._slots[gi]
        if not slots:
            raise FusionError(f"group {self.graph.groups[gi].name!r} has no weights to compare")
        if gi not in self._anchor:
            feats = [_unit_features(self.anchor[s.tensor], s.positions, s.dim) for _, s, _, _ in slots]
            self._anchor[gi] = (feats, sum((f * f).sum(1) for f in feats) if norms else None)
        feats, na = self._anchor[gi]
        if norms and na is None:
            na = sum((f * f).sum(1) for f in feats)
            self._anchor[gi] = (feats, na)
        cross, nb = None, None
        for (si, s, others, keep), fa in zip(slots, feats):
            slot_key = tuple(versions[h] for h in others)
            cached = self._terms.get((gi, si))
            if cached is not None and cached[0] != slot_key and self.incremental:
                cached = self._update(gi, si, s, others, cached, plans, slot_key)
            if cached is not None and cached[0] == slot_key:
                term, fresh = cached[1], False
                if norms:
                    slot_norms = self._norms.get((gi, si))
                    if slot_norms is None:  # a soft plan was involved: norms are not kept
                        slot_norms = self._member_side(gi, si, s, others, plans)[1]
            else:
                term = None if norms else self._term_at_start(gi, s, others, plans, fa)
                if term is None and norms:
                    fb, slot_norms = self._member_side(gi, si, s, others, plans)
                    term = fa @ fb.T
                elif term is None:
                    term = fa @ self._member_features(gi, si, s, others, plans).T
                fresh = True
                if keep:
                    self._terms[(gi, si)] = (slot_key, term, {h: plans[h] for h in others}, 0)
                    fresh = False
            # the terms are summed in slot order whether kept or recomputed: the same cost either way
            cross = (term if fresh else term.clone()) if cross is None else cross.add_(term)
            if norms:
                nb = slot_norms if nb is None else nb + slot_norms
        self._solved_at[gi] = key
        if not norms:
            return cross
        return na[:, None] + nb[None, :] - 2 * cross


def dependencies(graph: ChannelGraph, gi: int, incoming_only: bool) -> set[int]:
    """Groups whose plans change group ``gi``'s cost: the groups on the other dimensions of its tensors."""
    deps = set()
    for s in graph.groups[gi].slots:
        if incoming_only and s.role != OUT:
            continue
        for refs in graph.tensor_dims[s.tensor].values():
            deps.update(h for h, _ in refs if h != gi)
    return deps


def topological_order(deps: list[set[int]], preferred: list[int]) -> list[int] | None:
    """An order in which every group comes after the groups it depends on, or None if they form a cycle."""
    remaining = {g: set(d) for g, d in enumerate(deps)}
    order = []
    while remaining:
        ready = [g for g in preferred if g in remaining and not remaining[g]]
        if not ready:
            return None
        for g in ready:
            del remaining[g]
            order.append(g)
        for d in remaining.values():
            d.difference_update(ready)
    return order


def _producers(graph: ChannelGraph) -> dict[str, list[tuple[int, object]]]:
    """Per conv / linear layer that produces channels of a group: the (group index, slot) it produces."""
    wanted: dict[str, list] = {}
    for gi, g in enumerate(graph.groups):
        for s in g.slots:
            if s.role == OUT and s.is_weight and s.kind in ("conv", "linear"):
                wanted.setdefault(s.layer, []).append((gi, s))
    return wanted


class _Observer:
    """Runs a member on inputs with forward hooks at the given layers; ``run`` returns their outputs."""

    def __init__(self, model: nn.Module, layers):
        self.skeleton = meta_copy(model).eval()
        self.modules = dict(self.skeleton.named_modules())
        self.layers = list(layers)
        self.state = full_state(model)
        self.device = next(iter(self.state.values())).device

    def channel_dim(self, name: str, out: torch.Tensor) -> int:
        return out.dim() - 1 if isinstance(self.modules[name], nn.Linear) else 1

    def run(self, inputs) -> dict[str, torch.Tensor]:
        outputs = {}

        def hook(name):
            def fn(_mod, _inp, out):
                outputs[name] = out.detach().clone()  # a later in-place activation must not rewrite it

            return fn

        handles = [self.modules[name].register_forward_hook(hook(name)) for name in self.layers]
        try:
            with torch.no_grad():
                torch.func.functional_call(
                    self.skeleton, self.state, map_inputs(inputs, lambda t: t.to(self.device)), strict=False
                )
        finally:
            for h in handles:
                h.remove()
        return outputs


def _activation_features(model: nn.Module, graph: ChannelGraph, data) -> list[torch.Tensor | None]:
    """Per group: unit features from the outputs of the conv / linear layers that produce the group."""
    wanted = _producers(graph)
    observer = _Observer(model, wanted)
    outputs = observer.run(data)
    feats: list[torch.Tensor | None] = [None] * len(graph.groups)
    for name, entries in wanted.items():
        out = outputs.pop(name, None)  # each layer's output is released once its groups have read it
        if out is None:
            continue
        for gi, s in entries:
            f = _unit_features(out, s.positions, observer.channel_dim(name, out))
            feats[gi] = f if feats[gi] is None else torch.cat([feats[gi], f], dim=1)
    return feats


# ----------------------------------------------------------------------------- solving
def solve_plan(cost: torch.Tensor, solver: str, reg: float):
    """Uniform-marginal OT plan between anchor units (rows) and member units (columns), normalised by the
    row marginal. Exact plans between equal widths are returned as permutations.

    Between equal widths with uniform marginals the exact OT problem is a linear assignment (the optimum of
    a transport polytope is attained at a vertex, a permutation matrix: Birkhoff), so it is solved with
    scipy's ``linear_sum_assignment`` (Jonker-Volgenant, O(n^3) but dense and fast) instead of the network
    simplex of ``ot.emd``, which is many times slower at thousands of units. Same optimum, same problem.
    """
    n, m = cost.shape
    c = cost.detach().double().clamp(min=0)
    if solver == "emd" and n == m:
        return assignment(c)
    if solver == "emd":
        a = np.full(n, 1.0 / n)
        b = np.full(m, 1.0 / m)
        plan = torch.as_tensor(ot.emd(a, b, c.cpu().numpy(), numItermax=max(100000, 50 * n * m)))
        if n == m:
            perm = plan.argmax(dim=1)
            if torch.equal(perm.sort().values, torch.arange(n)):
                return perm
        return (plan * n).float()
    scale = float(c.max()) or 1.0
    a = torch.full((n,), 1.0 / n, dtype=torch.float64, device=c.device)
    b = torch.full((m,), 1.0 / m, dtype=torch.float64, device=c.device)
    plan = ot.sinkhorn(a, b, c / scale, reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-9)
    return (plan * n).float()


def assignment(cost: torch.Tensor, maximize: bool = False) -> torch.Tensor:
    """The permutation ``perm`` minimising (or maximising) ``sum_i cost[i, perm[i]]`` (exact).

    Row and column minima are subtracted first: that changes every assignment's total by the same constant,
    so the optimum is the same, and it spares the solver the shared offsets (squared distances carry both
    units' norms), which makes it 2-3x faster on thousands of units.
    """
    # in place on one float64 copy (numpy's column minima read rows contiguously): the same values as
    # out-of-place torch ops, a fifth of the time at 4096 units
    c = cost.detach().to("cpu", torch.float64, copy=True).numpy()
    if maximize:
        np.negative(c, out=c)
    c -= c.min(axis=1, keepdims=True)
    c -= c.min(axis=0, keepdims=True)
    rows, cols = linear_sum_assignment(c)
    perm = torch.empty(cost.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def _same(p, q) -> bool:
    if p is None or q is None:
        return p is None and q is None
    if p.dim() == 1 and q.dim() == 1:
        return torch.equal(p.cpu(), q.cpu())
    if p.dim() == 1 or q.dim() == 1:
        return False
    return bool((p.cpu() - q.cpu()).abs().max() < 1e-5)


def _forward_order(model: nn.Module, graph: ChannelGraph) -> list[int]:
    rank = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(range(len(graph.groups)), key=lambda gi: rank.get(graph.groups[gi].name, 0))


def align(
    graph: ChannelGraph,
    order,
    anchor: dict,
    member: dict,
    solver: str,
    reg: float,
    max_iter: int,
    anchor_feats=None,
    member_feats=None,
    anchor_cache=None,
):
    """Plans that align ``member`` to ``anchor``, one per group. ``anchor_cache``: a dict kept across the
    members aligned to one anchor (its features are computed once).

    Weights: when no group's incoming weights depend on a later group (chains, VGG, MLPs), one pass in that
    order is exactly Singh & Jaggi's layer-wise OT fusion. When they form a cycle (a residual stream read and
    written by every block), the groups are solved by coordinate descent on the weight-matching objective
    (incoming and outgoing weights) until no plan changes, at most ``max_iter`` sweeps.
    """
    plans = [None] * len(graph.groups)
    if anchor_feats is not None:
        for gi in order:
            if anchor_feats[gi] is not None:
                plans[gi] = solve_plan(_sq_distances(anchor_feats[gi], member_feats[gi]), solver, reg)
        return plans
    versions = [0] * len(graph.groups)
    incoming = [dependencies(graph, gi, True) for gi in range(len(graph.groups))]
    acyclic = topological_order(incoming, order)
    cost = WeightCost(graph, anchor, member, incoming_only=acyclic is not None, anchor_cache=anchor_cache)
    sweeps = 1 if acyclic is not None else max_iter
    for _ in range(sweeps):
        changed = False
        for gi in acyclic or order:
            c = cost(gi, plans, versions)
            if c is None:
                continue
            new = solve_plan(c, solver, reg)
            if plans[gi] is None and new.dim() == 1 and torch.equal(new.cpu(), torch.arange(new.numel())):
                continue  # still the identity
            if not _same(new, plans[gi]):
                plans[gi], changed = new, True
                versions[gi] += 1
        if not changed:
            break
    return plans


def ot_plans(
    models,
    *,
    example_inputs=None,
    anchor=0,
    ground_metric="weights",
    solver="emd",
    reg=0.01,
    data=None,
    max_iter=20,
    verify=True,
):
    """(graph, per member: its plans aligning it to the anchor; None for the anchor itself)."""
    _check(models, anchor, ground_metric, solver, reg, data, max_iter)
    graph = channel_groups(models[anchor], example_inputs, verify=verify)
    order = _forward_order(models[anchor], graph)
    anchor_state = full_state(models[anchor])
    anchor_feats = (
        _activation_features(models[anchor], graph, data) if ground_metric == "activations" else None
    )
    member_plans: list = [None] * len(models)
    anchor_cache: dict = {}
    with torch.no_grad():
        for i, model in enumerate(models):
            if i == anchor:
                continue
            member_feats = _activation_features(model, graph, data) if anchor_feats is not None else None
            member_plans[i] = align(
                graph,
                order,
                anchor_state,
                full_state(model),
                solver,
                reg,
                max_iter,
                anchor_feats,
                member_feats,
                anchor_cache,
            )
    return graph, member_plans


@register("ot")
def optimal_transport(
    models,
    *,
    example_inputs=None,
    anchor=0,
    ground_metric="weights",
    solver="emd",
    reg=0.01,
    data=None,
    max_iter=20,
    verify=True,
):
    """Align every member to the anchor with OT plans per channel group, then average the aligned weights."""
    graph, member_plans = ot_plans(
        models,
        example_inputs=example_inputs,
        anchor=anchor,
        ground_metric=ground_metric,
        solver=solver,
        reg=reg,
        data=data,
        max_iter=max_iter,
        verify=verify,
    )
    fused = average_aligned("ot", models, graph, member_plans, template_index=anchor)
    check_runs(fused, example_inputs if example_inputs is not None else data, like=models[anchor])
    return fused


register_planner("ot")(ot_plans)
