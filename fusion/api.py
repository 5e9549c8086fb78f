"""``fusion.fuse``: validation shared by every method, then the registered method."""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import FusionError
from .registry import check_options, get_method
from .state import full_state


def check_members(models) -> list[nn.Module]:
    """Members must be at least two modules of one architecture, on one device, in one dtype."""
    if isinstance(models, nn.Module) or not hasattr(models, "__iter__"):
        raise FusionError("fuse() takes a list of models")
    models = list(models)
    if len(models) < 2:
        raise FusionError(f"fusion needs at least two models, got {len(models)}")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise FusionError(f"model {i} is a {type(m).__name__}, not an nn.Module")
    ref = models[0]
    ref_state = full_state(ref)
    if not ref_state:
        raise FusionError("model 0 has no parameters: nothing to fuse")
    devices = {t.device for t in ref_state.values()}
    dtypes = {t.dtype for t in ref_state.values() if t.is_floating_point()}
    for i, m in enumerate(models[1:], start=1):
        if type(m) is not type(ref):
            raise FusionError(
                f"members differ: model {i} is a {type(m).__name__}, model 0 a {type(ref).__name__}"
            )
        state = full_state(m)
        for name, t0 in ref_state.items():
            t = state.get(name)
            if t is None:
                raise FusionError(f"members differ: model {i} has no parameter {name!r}")
            if t.shape != t0.shape:
                raise FusionError(
                    f"members differ: parameter {name!r} has shape {tuple(t.shape)} in model {i} "
                    f"but {tuple(t0.shape)} in model 0"
                )
        extra = [n for n in state if n not in ref_state]
        if extra:
            raise FusionError(f"members differ: model {i} has a parameter {extra[0]!r} that model 0 lacks")
        devices |= {t.device for t in state.values()}
        dtypes |= {t.dtype for t in state.values() if t.is_floating_point()}
    if len(devices) > 1:
        raise FusionError(
            f"members live on different devices ({sorted(map(str, devices))}); move them to one"
        )
    if len(dtypes) > 1:
        raise FusionError(f"members have different dtypes ({sorted(map(str, dtypes))})")
    return models


def fuse(models, method: str, *, example_inputs=None, **options) -> nn.Module:
    """Fuse ``models`` (same architecture) into one model with ``method``; see ``available_methods()``.

    ``example_inputs``: one batch shaped like the models' input (needed for tracing channel groups; inferred
    for plain ``nn.Sequential`` MLPs). The members are not modified; the result lives on their device and
    dtype and comes back in eval mode. Works with or without autograd enabled.
    """
    fn = get_method(method)
    check_options(method, options)
    models = check_members(models)
    if example_inputs is not None and not isinstance(example_inputs, (torch.Tensor, tuple, list, dict)):
        raise FusionError(
            f"example_inputs must be a tensor (or a tuple/dict of tensors), got {type(example_inputs).__name__}"
        )
    fused = fn(models, example_inputs=example_inputs, **options)
    return fused.eval()
