"""The output-averaging ensemble: the baseline every fusion method is measured against."""

from __future__ import annotations

import torch.nn as nn

from .errors import FusionError


class Ensemble(nn.Module):
    """Averages the members' outputs (logits). Holds the members themselves, not copies."""

    def __init__(self, models):
        super().__init__()
        models = list(models)
        if not models or not all(isinstance(m, nn.Module) for m in models):
            raise FusionError("ensemble() needs a non-empty list of nn.Module members")
        self.members = nn.ModuleList(models)

    def forward(self, *args, **kwargs):
        total = None
        for member in self.members:
            out = member(*args, **kwargs)
            total = out if total is None else total + out
        return total / len(self.members)


def ensemble(models) -> Ensemble:
    return Ensemble(models)
