"""Alignment as a first-class operation: the members permuted (or transported) into one frame.

Alignment methods (OT, weight matching, activation matching) share two steps: find one plan per traced
channel group for every member, then average the aligned members. ``align`` exposes the first step, so a
benchmark can study the aligned members themselves, e.g. along the linear path between two of them (linear
mode connectivity); ``interpolate`` walks that path. A method joins by registering its planner here: a
function ``planner(models, *, example_inputs, **options) -> (graph, member_plans)`` with ``member_plans[i]``
None (identity) or one plan per group (see ``fusion.methods.ot.transform_tensor``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .api import check_members
from .build import build_model
from .errors import FusionError
from .layers import is_float
from .provenance import Provenance, attach, from_plans
from .registry import check_options
from .state import full_state

_PLANNERS: dict[str, Callable] = {}


def register_planner(name: str) -> Callable[[Callable], Callable]:
    def decorator(fn: Callable) -> Callable:
        _PLANNERS[name] = fn
        return fn

    return decorator


def alignment_methods() -> list[str]:
    """Fusion methods that align the members before averaging them (``align`` accepts these)."""
    return sorted(_PLANNERS)


def apply_plans(graph, state: dict, plans) -> dict:
    """A member's state with its plans applied to every tensor the groups touch."""
    from .methods.ot import transform_tensor

    if plans is None:
        return dict(state)
    return {name: transform_tensor(graph, name, t, plans) if is_float(t) else t for name, t in state.items()}


def average_aligned(method: str, models, graph, member_plans, template_index: int = 0) -> nn.Module:
    """The mean of the aligned members (one aligned copy alive at a time), with its provenance."""
    with torch.no_grad():
        total = None
        for model, plans in zip(models, member_plans):
            aligned = apply_plans(graph, full_state(model), plans)
            if total is None:
                total = {n: t.clone() if is_float(t) else t.clone() for n, t in aligned.items()}
            else:
                for n, t in aligned.items():
                    if is_float(t):
                        total[n].add_(t)
        for t in total.values():
            if is_float(t):
                t.div_(len(models))
    fused = build_model(models[template_index], total)
    return attach(fused, from_plans(method, [g.n_units for g in graph.groups], member_plans, graph.pinned))


def align(models, method: str, *, example_inputs=None, **options) -> list[nn.Module]:
    """The members aligned by ``method`` (see ``alignment_methods()``), as new models: the anchor (member 0
    for OT and activation matching) comes back as a copy; the members are not modified."""
    if method not in _PLANNERS:
        raise FusionError(
            f"method {method!r} does not align members; alignment methods: {', '.join(alignment_methods())}"
        )
    check_options(method, options)
    models = check_members(models)
    graph, member_plans = _PLANNERS[method](models, example_inputs=example_inputs, **options)
    return [
        build_model(m, apply_plans(graph, full_state(m), plans)) for m, plans in zip(models, member_plans)
    ]


def interpolate(a: nn.Module, b: nn.Module, alpha: float) -> nn.Module:
    """``(1 - alpha) * a + alpha * b`` for every parameter and floating-point buffer (``a``'s structure),
    with the provenance of that weighted average (so ``fusion.repair`` can repair any point of the path)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise FusionError(f"alpha must be a number in [0, 1], got {alpha!r}")
    check_members([a, b])
    sa, sb = full_state(a), full_state(b)
    alpha = float(alpha)
    with torch.no_grad():
        state = {
            n: torch.lerp(t, sb[n].to(t.dtype), alpha) if is_float(t) else t.clone() for n, t in sa.items()
        }
    model = build_model(a, state)
    return attach(model, Provenance("interpolate", 2, None, member_weights=(1.0 - alpha, alpha)))
