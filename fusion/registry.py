"""A small registry of fusion methods: a method is one function ``fn(models, *, example_inputs, **options)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from .errors import FusionError

_METHODS: dict[str, Callable] = {}
#: Display metadata: the order in which reports list and colour the methods (NT and the classic
#: baselines first, then every other registered method by name), so a method keeps its colour.
DISPLAY_FIRST = ("nt", "avg", "ot", "nt_iterative", "nt_hierarchical")


def register(name: str) -> Callable[[Callable], Callable]:
    """Register ``fn`` as fusion method ``name``; its keyword-only parameters are the method's options."""

    def decorator(fn: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"fusion method {name!r} is registered twice")
        _METHODS[name] = fn
        return fn

    return decorator


def available_methods() -> list[str]:
    """Names of the registered fusion methods, sorted."""
    return sorted(_METHODS)


def display_order() -> list[str]:
    """The registered methods in display order (``DISPLAY_FIRST``, then the others sorted)."""
    first = [m for m in DISPLAY_FIRST if m in _METHODS]
    return first + [m for m in available_methods() if m not in first]


def get_method(name: str) -> Callable:
    if not isinstance(name, str) or name not in _METHODS:
        raise FusionError(f"unknown fusion method {name!r}; available: {', '.join(available_methods())}")
    return _METHODS[name]


def method_options(name: str) -> list[str]:
    """The option names a method accepts (its keyword-only parameters besides ``example_inputs``)."""
    sig = inspect.signature(get_method(name))
    return [
        p.name
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "example_inputs"
    ]


def check_options(name: str, options: dict) -> None:
    accepted = method_options(name)
    for key in options:
        if key not in accepted:
            listed = ", ".join(accepted) if accepted else "none"
            raise FusionError(f"unknown option {key!r} for fusion method {name!r} (accepted: {listed})")
