"""Where every unit of a fused model came from: the record that statistics repair needs.

A fusion method knows, per traced channel group, which units of which members make each unit of the fused
model: NT keeps one member's unit as it is, averaging and alignment methods (OT, weight / activation
matching) average the members' aligned units, ZipIt! averages any set of correlated units. A
:class:`Provenance` holds exactly that, as a weighted list per group, and is attached to the fused model
(``fusion.provenance_of(model)``). :func:`fusion.repair` reads it to give each fused unit the statistics its
sources had (REPAIR, Jordan et al., 2023).

Groups are indexed as in ``fusion.channel_groups(member, example_inputs)`` (the trace is deterministic and
cached per architecture); fused unit indices are positions in the fused model's own group, which has the
same groups (possibly with another number of units, e.g. NT at a lower sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

ATTRIBUTE = "fusion_provenance"

# per group: (fused_unit [E], member [E], member_unit [E], weight [E]) -- fused unit k is
# sum over the entries with fused_unit == k of weight * (that member's unit); a fused unit's weights sum to 1.
Sources = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class Provenance:
    method: str
    n_members: int
    # None: plain averaging, every fused unit u is the mean of the members' units u (no trace was needed)
    sources: list[Sources] | None
    # with sources None: the members' weights in that average (None: uniform); e.g. (1 - a, a) on a linear path
    member_weights: tuple[float, ...] | None = None
    # the traced channel sets kept in place and averaged (``ChannelGraph.pinned``): in no group, so in no sources
    pinned: tuple[str, ...] = ()

    def group_sources(self, gi: int, n_units: int) -> Sources:
        """The entries of group ``gi`` (``n_units``: the members' units in that group)."""
        if self.sources is not None:
            return self.sources[gi]
        n = self.n_members
        units = torch.arange(n_units).repeat(n)
        members = torch.arange(n).repeat_interleave(n_units)
        w = torch.tensor(self.member_weights or [1.0 / n] * n, dtype=torch.float32)
        return units, members, units.clone(), w.repeat_interleave(n_units)

    def n_fused_units(self, gi: int, n_units: int) -> int:
        fused = self.group_sources(gi, n_units)[0]
        return int(fused.max()) + 1 if fused.numel() else 0

    def combine(self, gi: int, n_units: int, member_values: list[torch.Tensor]) -> torch.Tensor:
        """Per fused unit, the weighted mean of its sources' values (``member_values[m]``: [U, ...])."""
        fused, members, units, weights = self.group_sources(gi, n_units)
        ref = member_values[0]
        out = ref.new_zeros((self.n_fused_units(gi, n_units), *ref.shape[1:]))
        for m, values in enumerate(member_values):
            pick = members == m
            if not bool(pick.any()):
                continue
            w = weights[pick].to(values.device, values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
            out.index_add_(0, fused[pick].to(values.device), values[units[pick].to(values.device)] * w)
        total = torch.zeros(out.shape[0], dtype=out.dtype, device=out.device)
        total.index_add_(0, fused.to(out.device), weights.to(out.device, out.dtype))
        return out / total.clamp(min=1e-12).reshape(-1, *([1] * (out.dim() - 1)))


def from_selection(method: str, n_members: int, selection, pinned=()) -> Provenance:
    """NT-style: fused unit k of a group is exactly unit ``units[k]`` of member ``members[k]``."""
    sources = []
    for members, units in selection:
        k = members.numel()
        sources.append((torch.arange(k), members.clone().cpu(), units.clone().cpu(), torch.ones(k)))
    return Provenance(method, n_members, sources, pinned=tuple(pinned))


def from_plans(method: str, group_units: list[int], member_plans: list[list | None], pinned=()) -> Provenance:
    """Alignment then averaging: ``member_plans[m]`` is None for the anchor (identity) or one plan per group:
    None (identity), a permutation (aligned unit i is member unit ``perm[i]``) or a row-stochastic matrix
    ``M`` (aligned unit i is ``sum_j M[i, j]`` member unit j). Every fused unit is the mean of the aligned units.
    """
    n = len(member_plans)
    sources = []
    for gi, n_units in enumerate(group_units):
        parts = []
        for m, plans in enumerate(member_plans):
            plan = None if plans is None else plans[gi]
            if plan is None:
                idx = torch.arange(n_units)
                parts.append((idx, torch.full_like(idx, m), idx.clone(), torch.full((n_units,), 1.0 / n)))
            elif plan.dim() == 1:
                idx = torch.arange(n_units)
                perm = plan.cpu().long()
                parts.append((idx, torch.full_like(idx, m), perm, torch.full((n_units,), 1.0 / n)))
            else:
                rows, cols = plan.cpu().nonzero(as_tuple=True)
                w = plan.cpu()[rows, cols].float() / n
                parts.append((rows, torch.full_like(rows, m), cols, w))
        sources.append(tuple(torch.cat([p[i] for p in parts]) for i in range(4)))
    return Provenance(method, n, sources, pinned=tuple(pinned))


def identity(n_units: list[int], member: int, n_members: int) -> Provenance:
    """An original member as a provenance over all members: its unit u is its own unit u."""
    sources = []
    for u in n_units:
        idx = torch.arange(u)
        sources.append((idx, torch.full_like(idx, member), idx.clone(), torch.ones(u)))
    return Provenance("member", n_members, sources)


def compose(outer: Provenance, inner: list[Provenance], group_units: list[int]) -> Provenance:
    """``outer`` fused models ``inner[j]``-made inputs: the same record in terms of the original members."""
    sources = []
    for gi, n_units in enumerate(group_units):
        fused, members, units, weights = outer.group_sources(gi, n_units)
        parts = []
        for j, prov in enumerate(inner):
            pick = (members == j).nonzero().squeeze(1)
            if pick.numel() == 0:
                continue
            f2, m2, u2, w2 = prov.group_sources(gi, n_units)
            order = torch.argsort(f2, stable=True)
            f2, m2, u2, w2 = f2[order], m2[order], u2[order], w2[order]
            counts = torch.bincount(f2, minlength=int(units.max()) + 1 if units.numel() else 0)
            starts = torch.cumsum(counts, 0) - counts
            refs = units[pick]  # the inner model's units the outer entries read
            c = counts[refs]
            entry = torch.repeat_interleave(torch.arange(pick.numel()), c)
            offset = torch.arange(int(c.sum())) - torch.repeat_interleave(torch.cumsum(c, 0) - c, c)
            idx = starts[refs].repeat_interleave(c) + offset
            parts.append((fused[pick][entry], m2[idx], u2[idx], w2[idx] * weights[pick][entry]))
        sources.append(tuple(torch.cat([p[i] for p in parts]) for i in range(4)))
    return Provenance(outer.method, inner[0].n_members, sources, pinned=outer.pinned)


def attach(model: nn.Module, provenance: Provenance) -> nn.Module:
    object.__setattr__(model, ATTRIBUTE, provenance)
    return model


def provenance_of(model: nn.Module) -> Provenance | None:
    """The :class:`Provenance` a fusion method attached to ``model``, or None (not a fused model)."""
    return getattr(model, ATTRIBUTE, None)
