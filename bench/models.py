"""Model factory: the built-in MLP family and any timm model, adapted to the data set.

The MLP stays a plain ``nn.Sequential`` (Flatten, Linear, ReLU, ..., Linear) so the fusion library can
trace it without example inputs and so members' state dicts are trivially comparable.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from bench.errors import FusebenchError


def arch_label(mcfg: dict) -> str:
    """The architecture tag of docs/design.md §3: ``mlp-<width>x<depth>`` or the timm name."""
    if mcfg["arch"] == "mlp":
        return f"mlp-{mcfg['width']}x{mcfg['depth']}"
    return mcfg["arch"]


def build_mlp(in_features: int, width: int, depth: int, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    prev = in_features
    for _ in range(depth):
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def _unknown_arch(name: str) -> FusebenchError:
    import timm

    names = timm.list_models()
    close = difflib.get_close_matches(name, ["mlp", *names], n=4, cutoff=0.6)
    if not close:  # e.g. "resnet" -> resnet18, resnet50...
        close = [n for n in names if n.startswith(name)][:4]
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return FusebenchError(f"model.arch: unknown architecture '{name}'{hint}; use 'mlp' or a timm model name")


def check_arch(name: str) -> None:
    """Fail fast (before data loading or training) on an architecture name timm does not know."""
    if name == "mlp":
        return
    import timm

    if not timm.is_model(name):
        raise _unknown_arch(name)


def build_model(mcfg: dict, in_chans: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialized model for the ``model`` config section (uses the global torch RNG)."""
    arch = mcfg["arch"]
    if arch == "mlp":
        return build_mlp(in_chans * image_size * image_size, mcfg["width"], mcfg["depth"], num_classes)
    import timm

    check_arch(arch)
    kwargs = dict(mcfg.get("kwargs") or {})
    kwargs.setdefault("num_classes", num_classes)
    kwargs.setdefault("in_chans", in_chans)
    # ViT-style models need img_size for small images; CNNs do not take it (global pooling), and timm
    # rejects unknown kwargs with a TypeError naming them: try with it, fall back without.
    if "img_size" not in kwargs:
        try:
            return timm.create_model(arch, pretrained=False, img_size=image_size, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise FusebenchError(f"model: timm model '{arch}' rejected {kwargs}: {exc}") from None
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except TypeError as exc:
        raise FusebenchError(f"model.kwargs: timm model '{arch}' rejected {kwargs}: {exc}") from None


def example_inputs(
    in_chans: int, image_size: int, batch: int = 2, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """A random batch shaped like the model's input (for tracing / latency when no data is at hand)."""
    return torch.randn(batch, in_chans, image_size, image_size, device=device)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
