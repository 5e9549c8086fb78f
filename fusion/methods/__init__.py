"""Fusion methods; importing this package registers them."""

from . import avg, nt, ot  # noqa: F401
