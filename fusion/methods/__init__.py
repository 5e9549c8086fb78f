"""Fusion methods; importing this package registers them."""

from . import activation_matching, avg, nt, ot, weight_matching, zipit  # noqa: F401
