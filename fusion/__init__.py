"""fusion: N models of one architecture in, one fused model out.

>>> import fusion
>>> fused = fusion.fuse(models, "nt", example_inputs=torch.randn(1, 3, 32, 32))
>>> fusion.available_methods()
['activation_matching', 'avg', 'nt', 'nt_hierarchical', 'nt_iterative', 'ot', 'weight_matching', 'zipit']

Channel groups are traced automatically with torch-pruning's dependency graph (``channel_groups``), so
every method works on any architecture that can be traced, on the members' device. This package imports
nothing of the rest of fusebench, nor MLflow or Optuna.
"""

from . import methods as _methods  # noqa: F401  (registers the methods)
from .align import align, alignment_methods, interpolate
from .api import check_members, fuse
from .ensemble import Ensemble, ensemble
from .errors import FusionError
from .groups import ChannelGraph, ChannelGroup, Slot
from .provenance import Provenance, provenance_of
from .registry import available_methods, method_options, register
from .repair import repair
from .trace import channel_groups

__all__ = [
    "fuse",
    "available_methods",
    "ensemble",
    "channel_groups",
    "FusionError",
    "Ensemble",
    "ChannelGraph",
    "ChannelGroup",
    "Slot",
    "register",
    "method_options",
    "check_members",
    "Provenance",
    "provenance_of",
    "repair",
    "align",
    "alignment_methods",
    "interpolate",
]
