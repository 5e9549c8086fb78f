"""Vanilla weight averaging: every parameter and floating-point buffer is the members' mean."""

from __future__ import annotations

from ..build import build_model
from ..groups import mean_tensor
from ..layers import is_float
from ..provenance import Provenance, attach
from ..registry import register
from ..state import full_state


@register("avg")
def average(models, *, example_inputs=None):
    """Average the members' weights (and BatchNorm statistics) elementwise. Needs no tracing."""
    states = [full_state(m) for m in models]
    new = {
        name: mean_tensor([s[name] for s in states]) if is_float(ref) else ref.clone()
        for name, ref in states[0].items()
    }
    return attach(build_model(models[0], new), Provenance("avg", len(models), None))
