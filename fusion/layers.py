"""Per-layer-type knowledge, kept in one place.

Two questions are answered here for every layer type fusion supports:

* which tensor dimensions does a channel of a traced group touch (:func:`item_slots`), and
* how does a module's bookkeeping follow new tensor shapes (:func:`resize_module`).

Everything else in the library is layer-type agnostic. A layer type that is not known here is refused
with a :class:`FusionError` naming the module, rather than fused by guesswork.
"""

from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function as tpf

from .errors import FusionError

OUT, IN = "out", "in"


@dataclass(frozen=True)
class SlotSpec:
    """One tensor dimension touched by a channel group item (before grouping into units)."""

    tensor: str  # state_dict key
    dim: int
    role: str  # OUT: the tensor produces the channels; IN: it consumes them
    kind: str  # "conv", "linear", "bn", "ln", "param", ... (used by importance)
    is_weight: bool  # the layer's main weight (magnitude importance looks only at these)
    # the item's channels first ... first + count - 1 only (count 0: all), channel first + i at positions
    # i + g * stride for g < repeats (a recurrent layer: one direction's hidden unit i, rows i, H + i... of its gates)
    first: int = 0
    count: int = 0
    repeats: int = 1
    stride: int = 0

    def positions(self, by_root: torch.Tensor) -> torch.Tensor:
        """The positions along this dimension of each root's channels (``by_root[r]``: the item's indices that
        root channel r reaches, -1 padded), [n_root, R * repeats]."""
        if self.count == 0 and self.repeats == 1:
            return by_root
        i = by_root - self.first
        valid = (by_root >= 0) & (i >= 0) & ((i < self.count) if self.count else True)
        pos = i[:, :, None] + self.stride * torch.arange(self.repeats)
        return torch.where(valid[:, :, None], pos, -1).reshape(by_root.shape[0], -1)


@dataclass(frozen=True)
class GroupedConvLink:
    """A grouped (not depthwise) convolution couples blocks of its input and output channels."""

    layer: str
    side: str  # IN or OUT
    groups: int
    block: int  # channels per block on this side


def _pruner(handler):
    return getattr(handler, "__self__", None)


def _is_out(handler) -> bool:
    return getattr(handler, "__name__", "") == "prune_out_channels"


def item_slots(module, name: str, handler, pruning_dim: int) -> tuple[list[SlotSpec], GroupedConvLink | None]:
    """Tensor dimensions of ``module`` (state_dict prefix ``name``) that a group item prunes via ``handler``.

    Returns ``([], None)`` for parameter-free operations (add, concat, reshape...).
    """
    pruner = _pruner(handler)
    out = _is_out(handler)
    prefix = f"{name}." if name else ""

    if isinstance(module, nn.Parameter):
        dim = pruning_dim if pruning_dim >= 0 else module.dim() + pruning_dim
        return [SlotSpec(name, dim, OUT, "param", True)], None

    if isinstance(module, nn.GroupNorm):
        return _group_norm_slots(module, name, prefix)

    if isinstance(module, _Blocks):
        return [], GroupedConvLink(module.key, OUT, module.groups, module.block)

    if isinstance(pruner, (ChannelwisePruner, RecurrentPruner)):
        return pruner.slots(module, prefix, out), None

    if not isinstance(module, nn.Module) or (
        not list(module.parameters(recurse=False)) and not list(module.buffers(recurse=False))
    ):
        return [], None  # a parameter-free operation: nothing to move

    if isinstance(pruner, tpf.DepthwiseConvPruner) or (
        isinstance(module, nn.modules.conv._ConvNd)
        and module.groups == module.in_channels == module.out_channels
        and module.groups > 1
    ):
        # depthwise: channel c reads only input channel c; both sides move together
        slots = [SlotSpec(prefix + "weight", 0, OUT, "conv", True)]
        if module.bias is not None:
            slots.append(SlotSpec(prefix + "bias", 0, OUT, "conv", False))
        return slots + _per_out_channel_params(module, name, prefix), None

    if isinstance(pruner, tpf.ConvPruner) and isinstance(module, nn.modules.conv._ConvNd):
        wdim_out, wdim_in = (1, 0) if module.transposed else (0, 1)
        if out:
            slots = [SlotSpec(prefix + "weight", wdim_out, OUT, "conv", True)]
            if module.bias is not None:
                slots.append(SlotSpec(prefix + "bias", 0, OUT, "conv", False))
            slots += _per_out_channel_params(module, name, prefix)
            link = None
            if module.groups > 1:
                link = GroupedConvLink(name, OUT, module.groups, module.out_channels // module.groups)
            return slots, link
        if module.groups > 1:
            if module.transposed:
                raise FusionError(f"grouped transposed convolution {name!r} is not supported")
            # the weight's input dimension is local to a block: blocks move whole, nothing to gather
            return [], GroupedConvLink(name, IN, module.groups, module.in_channels // module.groups)
        return [SlotSpec(prefix + "weight", wdim_in, IN, "conv", True)], None

    if isinstance(pruner, tpf.LinearPruner) and isinstance(module, nn.Linear):
        if out:
            slots = [SlotSpec(prefix + "weight", 0, OUT, "linear", True)]
            if module.bias is not None:
                slots.append(SlotSpec(prefix + "bias", 0, OUT, "linear", False))
            return slots, None
        return [SlotSpec(prefix + "weight", 1, IN, "linear", True)], None

    if isinstance(pruner, tpf.BatchnormPruner):
        slots = []
        for attr, is_w in (
            ("weight", True),
            ("bias", False),
            ("running_mean", False),
            ("running_var", False),
        ):
            if getattr(module, attr, None) is not None:
                slots.append(SlotSpec(prefix + attr, 0, OUT, "bn", is_w))
        return slots, None

    if isinstance(pruner, tpf.LayernormPruner):
        if len(module.normalized_shape) != 1:
            raise FusionError(
                f"LayerNorm {name!r} normalizes over {tuple(module.normalized_shape)}; only 1-D LayerNorm is supported"
            )
        slots = []
        for attr, is_w in (("weight", True), ("bias", False)):
            if getattr(module, attr, None) is not None:
                slots.append(SlotSpec(prefix + attr, 0, OUT, "ln", is_w))
        return slots, None

    if isinstance(pruner, tpf.PReLUPruner):
        if module.num_parameters == 1:
            return [], None
        return [SlotSpec(prefix + "weight", 0, OUT, "prelu", True)], None

    if isinstance(pruner, tpf.EmbeddingPruner):
        return [SlotSpec(prefix + "weight", 1, OUT, "embed", True)], None

    raise FusionError(
        f"cannot fuse module {name!r} ({type(module).__name__}): its channels are coupled by "
        f"{type(pruner).__name__ if pruner else handler}, which fusion does not support"
    )


def _per_out_channel_params(module: nn.Module, name: str, prefix: str) -> list[SlotSpec]:
    """A convolution's parameters besides weight and bias, which torch-pruning does not know: one value per
    output channel (timm's ScaledStdConv2d ``gain`` of shape [out, 1, 1, 1]) moves with the output channels;
    any other shape is refused by name rather than averaged into a wrong model."""
    out_ch = module.weight.shape[1] if getattr(module, "transposed", False) else module.weight.shape[0]
    slots = []
    for pname, p in module.named_parameters(recurse=False):
        if pname in ("weight", "bias"):
            continue
        if p.dim() >= 1 and p.shape[0] == out_ch and p.numel() == out_ch:
            slots.append(SlotSpec(prefix + pname, 0, OUT, "param", False))
        elif p.numel() != 1:
            raise FusionError(
                f"convolution {name!r} ({type(module).__name__}) has a parameter {pname!r} of shape "
                f"{tuple(p.shape)} that is neither per output channel nor a scalar; fusion refused"
            )
    return slots


class ChannelwisePruner(tpf.BasePruningFunc):
    """torch-pruning's view of a parameter-free, channel-wise module whose per-channel *buffers* it cannot see
    (timm's BlurPool2d: a fixed blur filter ``filt`` of shape [C, 1, k, k] applied with ``groups=C``).
    Registered as a customized pruner, the module is one node whose input and output channels are coupled
    (``prune_in_channels`` is ``prune_out_channels``); :meth:`slots` names the buffers that move with them.
    fusion never prunes through torch-pruning, so the pruning functions only record the coupling."""

    # module type name -> (per-channel buffers along dim 0, the attribute holding the channel count)
    KNOWN = {"BlurPool2d": (("filt",), "channels")}

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        raise NotImplementedError("fusion does not prune with torch-pruning")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module):
        return getattr(layer, self.KNOWN[type(layer).__name__][1], None)

    get_in_channels = get_out_channels

    def slots(self, module: nn.Module, prefix: str, out: bool) -> list[SlotSpec]:
        buffers, attr = self.KNOWN[type(module).__name__]
        if getattr(module, attr, None) is None:
            return []  # a single filter expanded to the input's channels at run time: nothing per channel
        return [SlotSpec(prefix + b, 0, OUT, "buffer", False) for b in buffers]


# blocks of rows per hidden unit in weight_ih, weight_hh and the biases
GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def recurrent_refusal(name: str, module: nn.RNNBase) -> str | None:
    """Why a recurrent layer cannot be fused, or None (one layer, no projection: see :class:`RecurrentPruner`)."""
    if type(module) not in GATES:
        return f"cannot fuse module {name!r} ({type(module).__name__}): an unknown recurrent layer"
    if module.num_layers != 1:
        return (
            f"cannot fuse module {name!r} ({type(module).__name__}): {module.num_layers} stacked layers (only one "
            "layer is supported: a second layer's input columns follow both directions' hidden units)"
        )
    if getattr(module, "proj_size", 0):
        return f"cannot fuse module {name!r} (LSTM): a projection of its hidden state (proj_size) is not supported"
    return None


class RecurrentPruner(tpf.BasePruningFunc):
    """torch-pruning's view of a one-layer ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` (see :func:`recurrent_as_one_operation`):
    its input channels are ``input_size`` features, its output channels the ``hidden_size`` units of each direction
    (forward, then reverse: the output concatenates them). Hidden unit i of a direction owns rows
    ``i, H + i, ...`` (one per gate) of that direction's ``weight_ih``, ``weight_hh`` and biases and column i of
    its ``weight_hh``; permuting the units of a direction with all of these is a symmetry. fusion never prunes
    through torch-pruning, so the pruning functions only record the coupling."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        raise NotImplementedError("fusion does not prune with torch-pruning")

    def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:  # not the same function: not coupled
        raise NotImplementedError("fusion does not prune with torch-pruning")

    def get_out_channels(self, layer: nn.RNNBase):
        return layer.hidden_size * (2 if layer.bidirectional else 1)

    def get_in_channels(self, layer: nn.RNNBase):
        return layer.input_size

    def slots(self, module: nn.RNNBase, prefix: str, out: bool) -> list[SlotSpec]:
        h, gates = module.hidden_size, GATES[type(module)]
        suffixes = ["_l0", "_l0_reverse"] if module.bidirectional else ["_l0"]
        slots = []
        for d, suffix in enumerate(suffixes):
            if not out:  # every direction reads every input feature
                slots.append(SlotSpec(f"{prefix}weight_ih{suffix}", 1, IN, "rnn", True))
                continue
            unit = {"first": d * h, "count": h}
            rows = {**unit, "repeats": gates, "stride": h}
            slots.append(SlotSpec(f"{prefix}weight_ih{suffix}", 0, OUT, "rnn", True, **rows))
            slots.append(SlotSpec(f"{prefix}weight_hh{suffix}", 0, OUT, "rnn", True, **rows))
            slots.append(SlotSpec(f"{prefix}weight_hh{suffix}", 1, IN, "rnn", True, **unit))
            if module.bias:
                for b in ("bias_ih", "bias_hh"):
                    slots.append(SlotSpec(f"{prefix}{b}{suffix}", 0, OUT, "rnn", False, **rows))
        return slots


@contextlib.contextmanager
def recurrent_as_one_operation(model: nn.Module):
    """While torch-pruning traces ``model``: every recurrent layer's output is made by one operation on its input
    (of the output's shape, nothing computed), not by the unrolled steps its forward records on the meta device
    (one matrix product, gate split and product per time step, each taken for an operation on channels). The
    layer is then one node between its input and its output, like a Linear, and :class:`RecurrentPruner` says
    which tensors its channels occupy."""

    class Opaque(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, shape):
            return x.new_empty(shape)

        @staticmethod
        def backward(ctx, grad):
            return None, None

    def forward(self, x, hx=None):
        d = 2 if self.bidirectional else 1
        out = Opaque.apply(x, (*x.shape[:-1], d * self.hidden_size))
        batch = () if x.dim() == 2 else (x.shape[0 if self.batch_first else 1],)
        state = x.new_zeros((d * self.num_layers, *batch, self.hidden_size))
        return out, ((state, state) if isinstance(self, nn.LSTM) else state)

    layers = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    for m in layers:
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward


class _Blocks(nn.Module):
    """Marks, while tracing, that the channels passing through are ``groups`` blocks of ``block`` channels of the
    transform ``key`` (see :func:`bilinear_transforms_as_blocks`); a parameter-free, channel-wise layer."""

    def __init__(self, key: str, groups: int, block: int):
        super().__init__()
        self.key, self.groups, self.block = key, groups, block

    def forward(self, x):
        return x.clone()


class _PassThroughPruner(tpf.BasePruningFunc):
    """torch-pruning's view of :class:`_Blocks` and :class:`_Transform`: channel-wise (input and output channels
    coupled, as for :class:`ChannelwisePruner`), the channel count read from the neighbours."""

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        raise NotImplementedError("fusion does not prune with torch-pruning")

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module):
        return None

    get_in_channels = get_out_channels


class _Transform(nn.Module):
    """The per-block transform of a feature map ``x`` by ``operands`` (the matrices), as one channel-wise operation
    (nothing computed). The operands are its inputs only so that the graph holds the layers making them: the
    tracer cuts their edges to it (:func:`transform_operands`), their channels are not the output's."""

    def forward(self, x, *operands):
        return _Opaque.apply(tuple(x.shape), x, *operands)


class _Opaque(torch.autograd.Function):
    """An output of ``shape`` made by one operation on its inputs (nothing computed: tracing on the meta device)."""

    @staticmethod
    def forward(ctx, shape, x, *operands):
        return x.new_empty(shape)

    @staticmethod
    def backward(ctx, grad):
        return (None,) * (len(ctx.needs_input_grad))


def transform_operands(dg):
    """``(node, operand nodes)`` of every :class:`_Transform` in torch-pruning's graph ``dg``."""
    for module, node in dg.module2node.items():
        if isinstance(module, _Transform):
            yield node, node.inputs[1:]


def bilinear_transforms_as_blocks(skeleton: nn.Module) -> None:
    """Trace timm's ``BilinearAttnTransform`` (BAT) by what couples its channels, on a skeleton (a meta copy).

    It multiplies channel c of the feature map by the matrices ``p`` and ``q`` of its group g = c // (C /
    groups): ``conv_p``'s and ``conv_q``'s output channels are those matrices' entries, ``(groups, block,
    block)``, so rows g * block**2 ... (g + 1) * block**2 - 1 belong to group g. A unit is a whole group: its
    channels of the feature map and its rows of ``conv_p`` and ``conv_q`` (linked like the blocks of a grouped
    convolution), and a fused model has one group per kept unit (``groups`` follows ``conv_p``, see
    :func:`resize_module`). The skeleton's forward becomes: the same layers, the matrices and the feature map
    marked as blocks, the transform one channel-wise operation on them (see :class:`_Transform`), then
    ``conv2``."""
    for name, m in skeleton.named_modules():
        if type(m).__name__ != "BilinearAttnTransform" or hasattr(m, "_fusion_blocks"):
            continue
        g, bs = m.groups, m.block_size
        m._fusion_blocks = _Blocks(name, g, m.in_channels // g)
        m._fusion_p, m._fusion_q = _Blocks(name, g, bs * bs), _Blocks(name, g, bs * bs)
        m._fusion_transform = _Transform()

        def forward(self, x):
            out = self.conv1(x)
            p = self._fusion_p(self.conv_p(nn.functional.adaptive_max_pool2d(out, (self.block_size, 1))))
            q = self._fusion_q(self.conv_q(nn.functional.adaptive_max_pool2d(out, (1, self.block_size))))
            return self.conv2(self._fusion_transform(self._fusion_blocks(x), p, q))

        m.forward = types.MethodType(forward, m)


def customized_pruners(model: nn.Module) -> dict:
    """The customized pruners torch-pruning needs for ``model``'s channel-wise buffer modules and recurrent layers
    (by type)."""
    pruner, recurrent = ChannelwisePruner(), RecurrentPruner()
    out = {type(m): pruner for m in model.modules() if type(m).__name__ in ChannelwisePruner.KNOWN}
    out.update({t: _PassThroughPruner() for t in (_Blocks, _Transform)})
    out.update({type(m): recurrent for m in model.modules() if type(m) in GATES})
    return out


def _group_norm_slots(module: nn.GroupNorm, name: str, prefix: str):
    """GroupNorm normalizes each of its ``num_groups`` blocks of consecutive channels by the block's own
    statistics, then scales and shifts per channel.

    * One group (timm's GroupNorm1, poolformer, GroupNormAct in ViT hybrids): the statistics are over all
      channels, as in LayerNorm, so any permutation of the channels with their weight and bias is a symmetry.
    * G > 1 groups: a permutation is a symmetry when it moves whole blocks (and channels within a block); the
      blocks are linked like the blocks of a grouped convolution, so they move whole and a fused model keeps
      the block size (``num_groups`` follows the channel count, see :func:`resize_module`). Without affine
      parameters nothing records the new channel count, so that case is refused.
    """
    slots = [
        SlotSpec(prefix + attr, 0, OUT, "ln", attr == "weight")
        for attr in ("weight", "bias")
        if getattr(module, attr, None) is not None
    ]
    if module.num_groups == 1:
        return slots, None
    if not slots:
        raise FusionError(
            f"GroupNorm {name!r} has {module.num_groups} groups and no affine parameters: a fused model could not "
            "keep its group size; fusion refused"
        )
    block = module.num_channels // module.num_groups
    return slots, GroupedConvLink(name, OUT, module.num_groups, block)


def resize_module(module: nn.Module, name: str) -> None:
    """Make a module's shape attributes agree with its (possibly resized) tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        out_ch, in_per_group = (w.shape[1], w.shape[0]) if module.transposed else (w.shape[0], w.shape[1])
        if module.transposed:
            if module.groups != 1:
                raise FusionError(f"grouped transposed convolution {name!r} is not supported")
            module.in_channels, module.out_channels = w.shape[0], w.shape[1]
            return
        if module.groups == 1:
            module.in_channels, module.out_channels = in_per_group, out_ch
        else:
            out_per_group = module.out_channels // module.groups
            groups = out_ch // out_per_group
            module.groups, module.out_channels, module.in_channels = groups, out_ch, groups * in_per_group
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = module.running_mean if module.running_mean is not None else module.weight
        if ref is not None:
            module.num_features = ref.shape[0]
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            module.normalized_shape = (module.weight.shape[0],)
    elif isinstance(module, nn.GroupNorm):
        if module.weight is not None:
            channels = module.weight.shape[0]
            if module.num_groups > 1:  # the block size is kept (see _group_norm_slots)
                module.num_groups = channels // (module.num_channels // module.num_groups)
            module.num_channels = channels
    elif type(module).__name__ in ChannelwisePruner.KNOWN:
        buffers, attr = ChannelwisePruner.KNOWN[type(module).__name__]
        if getattr(module, attr, None) is not None:
            setattr(module, attr, getattr(module, buffers[0]).shape[0])
    elif isinstance(module, nn.PReLU):
        module.num_parameters = module.weight.numel()
    elif isinstance(module, nn.Embedding):
        module.embedding_dim = module.weight.shape[1]
    elif type(module).__name__ == "BilinearAttnTransform":  # one group per block of conv_p's rows
        module.groups = module.conv_p.weight.shape[0] // module.block_size**2  # (conv_p is resized later)
    elif isinstance(module, nn.RNNBase):
        module.input_size, module.hidden_size = module.weight_ih_l0.shape[1], module.weight_hh_l0.shape[1]


ROOT_TYPES = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, nn.RNNBase)


def is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()
