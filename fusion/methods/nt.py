"""Neuron Transplantation (Öz et al., 2024): concatenate the members, prune the least important units.

The concatenated (N-times wide, block-diagonal) model is never built: a unit's magnitude importance in
the concatenated model equals its importance inside its own member (the zero blocks add nothing; the
classifier's 1/N scaling is applied), so every member is scored on its own, the best units across the
members are chosen per group, and the fused tensors are gathered directly (``ChannelGraph.assemble``).

Per group, ``keep = round(N * units * (1 - sparsity))`` units survive (at least one), chosen by importance
and kept in concatenation order (member, then unit), exactly what torch-pruning keeps when it prunes the
concatenated model per layer. ``sparsity = 1 - 1/N`` (the default) gives back the members' architecture,
``sparsity = 0`` keeps the whole concatenation, i.e. the output-averaging ensemble for models without
cross-channel normalization (see README: "What holds for LayerNorm models").
"""

from __future__ import annotations

import torch

from ..build import build_model, check_runs
from ..errors import FusionError
from ..groups import ChannelGraph
from ..provenance import Provenance, attach, compose, from_selection, identity, provenance_of
from ..registry import register
from ..state import full_state
from ..trace import channel_groups


def _check_sparsity(sparsity) -> None:
    if sparsity is None:
        return
    if (
        isinstance(sparsity, bool)
        or not isinstance(sparsity, (int, float))
        or not 0.0 <= float(sparsity) < 1.0
    ):
        raise FusionError(f"sparsity must be a number in [0, 1), got {sparsity!r}")


def _check_p(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise FusionError(f"importance norm p must be a positive number, got {p!r}")


def select_units(graph: ChannelGraph, states, sparsity: float | None, p: float):
    """Per group: the (member, unit) pairs NT keeps, in concatenation order."""
    n = len(states)
    selection = []
    per_member = [[imp.float().cpu() for imp in graph.unit_importance(s, n, p)] for s in states]
    for gi, group in enumerate(graph.groups):
        units = group.n_units
        scores = torch.stack([imps[gi] for imps in per_member]).reshape(-1)
        keep = units if sparsity is None else max(1, int(round(n * units * (1.0 - float(sparsity)))))
        # stable descending sort: ties go to the earlier member, as in a pruner that drops the lowest scores
        order = torch.sort(scores, descending=True, stable=True).indices[:keep]
        kept = order.sort().values
        selection.append((kept // units, kept % units))
    return selection


def transplant(models, example_inputs, sparsity, p, verify=True, method="nt", inner=None):
    """Fuse ``models`` jointly. ``inner``: per model, its provenance over the original members (iterative and
    hierarchical NT fuse fused models); the result's provenance is expressed over those originals."""
    graph = channel_groups(models[0], example_inputs, verify=verify)
    states = [full_state(m) for m in models]
    with torch.no_grad():
        selection = select_units(graph, states, sparsity, p)
        state = graph.assemble(states, selection)
    fused = build_model(models[0], state)
    check_runs(fused, example_inputs, like=models[0])
    prov = from_selection(method, len(models), selection, graph.pinned)
    if inner is not None:
        prov = compose(prov, inner, [g.n_units for g in graph.groups])
    return attach(fused, prov)


def _originals(models, example_inputs, verify) -> list[Provenance]:
    units = [g.n_units for g in channel_groups(models[0], example_inputs, verify=verify).groups]
    return [identity(units, i, len(models)) for i in range(len(models))]


@register("nt")
def neuron_transplantation(models, *, example_inputs=None, sparsity=None, p=2.0, verify=True):
    """Joint NT of all members at once. ``sparsity`` in [0, 1), default ``1 - 1/N``; ``p``: importance norm."""
    _check_sparsity(sparsity)
    _check_p(p)
    return transplant(models, example_inputs, sparsity, p, verify)


def _no_sparsity(method: str, sparsity) -> None:
    if sparsity is not None:
        raise FusionError(
            f"{method} fuses pairs at sparsity 0.5 so that every step returns the member architecture; "
            "the option sparsity is only available for 'nt'"
        )


@register("nt_iterative")
def neuron_transplantation_iterative(models, *, example_inputs=None, p=2.0, verify=True, sparsity=None):
    """Fuse member 1 with member 2, the result with member 3, ... (later members weigh more)."""
    _no_sparsity("nt_iterative", sparsity)
    _check_p(p)
    originals = _originals(models, example_inputs, verify)
    fused = models[0]
    for i, nxt in enumerate(models[1:], start=1):
        inner = [provenance_of(fused) or originals[0], originals[i]]
        fused = transplant([fused, nxt], example_inputs, None, p, verify, "nt_iterative", inner)
    return fused


@register("nt_hierarchical")
def neuron_transplantation_hierarchical(models, *, example_inputs=None, p=2.0, verify=True, sparsity=None):
    """Fuse pairwise in merge-sort order: fuse(fuse(first half), fuse(second half))."""
    _no_sparsity("nt_hierarchical", sparsity)
    _check_p(p)

    originals = _originals(models, example_inputs, verify)

    def merge(lo, hi):
        if hi - lo == 1:
            return models[lo], originals[lo]
        mid = (lo + hi) // 2
        (a, pa), (b, pb) = merge(lo, mid), merge(mid, hi)
        fused = transplant([a, b], example_inputs, None, p, verify, "nt_hierarchical", [pa, pb])
        return fused, provenance_of(fused)

    return merge(0, len(models))[0]
