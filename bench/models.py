"""Model factory: the built-in MLP family and any timm model, adapted to the data set.

The MLP stays a plain ``nn.Sequential`` (Flatten, Linear, ReLU, ..., Linear) so the fusion library can
trace it without example inputs and so members' state dicts are trivially comparable.
"""

from __future__ import annotations

from torch import nn

from bench.errors import FusebenchError
from bench.validation import did_you_mean


def arch_label(mcfg: dict) -> str:
    """The architecture tag of docs/design.md §3: ``mlp-<width>x<depth>`` or the timm name."""
    if mcfg["arch"] in BUILT_IN:
        return f"{mcfg['arch']}-{mcfg['width']}x{mcfg['depth']}"
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
    hint = did_you_mean(name, [*BUILT_IN, *names], n=4, cutoff=0.6)
    if not hint:  # e.g. "resnet" -> resnet18, resnet50...
        hint = did_you_mean(name, [n for n in names if n.startswith(name)][:4], n=4, cutoff=0.0)
    return FusebenchError(f"model.arch: unknown architecture '{name}'{hint}; use 'mlp' or a timm model name")


BUILT_IN = ("mlp", "cnn1d")


def check_arch(name: str) -> None:
    """Fail fast (before data loading or training) on an architecture name timm does not know."""
    if name in BUILT_IN:
        return
    import timm

    if not timm.is_model(name):
        raise _unknown_arch(name)


def build_cnn1d(in_chans: int, width: int, depth: int, num_classes: int) -> nn.Sequential:
    """A 1-D CNN for signals (e.g. MNIST-1D): ``depth`` blocks of Conv1d(k=3) + BatchNorm1d + ReLU, the
    second and later blocks with stride 2, then global average pooling and a linear head. BatchNorm makes it
    the CPU benchmark's case where statistics repair matters."""
    layers: list[nn.Module] = []
    prev = in_chans
    for i in range(depth):
        layers += [
            nn.Conv1d(prev, width, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(),
        ]
        prev = width
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(prev, num_classes)]
    return nn.Sequential(*layers)


def build_model(mcfg: dict, in_chans: int, num_classes: int, image_size: int, dims: int = 2) -> nn.Module:
    """A freshly initialized model for the ``model`` config section (uses the global torch RNG).

    ``dims``: spatial dimensions of the data (2: images, 1: signals such as mnist1d)."""
    arch = mcfg["arch"]
    if arch == "mlp":
        return build_mlp(in_chans * image_size**dims, mcfg["width"], mcfg["depth"], num_classes)
    if arch == "cnn1d":
        if dims != 1:
            raise FusebenchError("model.arch: cnn1d takes 1-D signals (data.name: mnist1d); use a timm model")
        return build_cnn1d(in_chans, mcfg["width"], mcfg["depth"], num_classes)
    if dims != 2:
        raise FusebenchError(
            f"model.arch: '{arch}' is an image model but the data are 1-D signals; use 'mlp' or 'cnn1d'"
        )
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
