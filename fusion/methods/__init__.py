"""Fusion methods; importing this package registers them."""

from . import avg, nt  # noqa: F401
