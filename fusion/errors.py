"""The one exception type of the fusion library."""


class FusionError(ValueError):
    """The models or options given to :func:`fusion.fuse` cannot be fused; the message says why.

    Raised instead of ever returning a silently wrong model.
    """
