"""Which axis of each tensor holds channels, read from autograd's record of the traced forward pass.

torch-pruning couples a Linear's input columns to whatever channels reach it, and a transpose is an element-wise
operation to it. A Linear applied after ``x.transpose(1, 2)`` (MLP-Mixer's and gMLP's token-mixing MLPs, gMLP's
spatial gating unit) acts on the token axis: its input columns and, where its output is transposed back, its
output rows are sequence positions, which no permutation may move, while the channels of the stream pass
through it untouched, as a batch axis. torch-pruning instead ties the stream's channels to the positions
(claims beyond the tensor's size, or a permutation of positions).

Every axis of every tensor of the forward pass gets a label, propagated in execution order:

* ``("F", layers)``: the output features of these layers (a Linear's last axis, a convolution's axis 1), carried
  by element-wise operations, transposes, permutes and reshapes that keep the axis whole; where several meet in
  an element-wise operation (a residual sum), the union;
* :data:`POS`: positions (a convolution's spatial axes, and what flattening them gives);
* ``("M", sizes, labels)``: axes merged by a reshape (a Linear's own flattening of its leading axes), restored
  when a reshape splits them back into the same sizes;
* ``None``: unknown (any operation not modelled here); nothing is decided from it.

From the labels: a Linear whose input columns read positions is *positional on its input*; a Linear whose output
features meet positions on one axis of an element-wise operation is *positional on its output*.
:func:`token_axis_layers` rewires torch-pruning's graph accordingly (see there). Anything it gets wrong is caught by
the coverage check and the float64 permutation self-check, as for any other trace.
"""

from __future__ import annotations

import contextlib
import threading

import torch.nn as nn

POS = ("P",)

_ELEMENTWISE = {
    "AddBackward0", "AddBackward1", "SubBackward0", "SubBackward1", "MulBackward0", "MulBackward1",
    "DivBackward0", "DivBackward1", "CloneBackward0", "SiluBackward0", "GeluBackward0", "ReluBackward0",
    "SigmoidBackward0", "TanhBackward0", "HardswishBackward0", "HardsigmoidBackward0", "NativeDropoutBackward0",
    "NativeLayerNormBackward0", "NativeBatchNormBackward0", "NegBackward0", "LeakyReluBackward0", "EluBackward0",
    "SoftplusBackward0", "ExpBackward0", "PowBackward0", "AbsBackward0", "ToCopyBackward0", "AliasBackward0",
    "MishBackward0", "ErfBackward0", "SqrtBackward0", "RsqrtBackward0", "AddcmulBackward0", "HardtanhBackward0",
}  # fmt: skip
_RESHAPES = {"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "_ReshapeAlias"}
# a Linear's own flattening of its input's leading axes, walked back to find the tensor it reads
_LINEAR_INPUT_VIEWS = _RESHAPES | {"CloneBackward0", "ExpandBackward0"}


def out_shape(gf, nr: int = 0):
    """The shape of output ``nr`` of autograd node ``gf`` (a leaf: its variable's), or None."""
    var = getattr(gf, "variable", None)
    if var is not None:
        return tuple(var.shape)
    meta = getattr(gf, "_input_metadata", None)
    if meta is None or nr >= len(meta):
        return None
    return tuple(int(s) for s in meta[nr].shape)


def _axis(dim: int, ndim: int) -> int:
    if dim >= 1 << 63:  # autograd saves a negative dimension as its unsigned 64-bit value
        dim -= 1 << 64
    return dim % ndim


def is_feature(label) -> bool:
    return isinstance(label, tuple) and len(label) == 2 and label[0] == "F"


def is_positional(label) -> bool:
    if label == POS:
        return True
    if isinstance(label, tuple) and label and label[0] == "M":
        parts = label[2]
        return any(is_positional(p) for p in parts) and not any(is_feature(p) for p in parts)
    return False


def _merge_axis(labels: list, found: list, where):
    """One axis of an element-wise operation: the inputs' labels (broadcast axes left out) combined; a feature
    axis meeting positions is recorded in ``found``."""
    feats = [lab for lab in labels if is_feature(lab)]
    pos = [lab for lab in labels if is_positional(lab)]
    if feats and pos:
        found.append((where, frozenset().union(*(f[1] for f in feats))))
        return POS
    if pos:
        return POS
    if feats and len(feats) == len([lab for lab in labels if lab is not None]):
        return ("F", frozenset().union(*(f[1] for f in feats)))
    known = {lab for lab in labels if lab is not None}
    return known.pop() if len(known) == 1 else None


def _reshape(labels, ins, out):
    """Labels through a reshape from ``ins`` to ``out``: axes kept whole keep theirs, merged axes become an
    ``M`` label, an ``M`` label split into its own sizes is restored; anything else is unknown."""
    res = [None] * len(out)
    i = j = 0
    while i < len(ins) or j < len(out):
        if i < len(ins) and ins[i] == 1 and not (j < len(out) and out[j] == 1):
            i += 1
            continue
        if j < len(out) and out[j] == 1 and not (i < len(ins) and ins[i] == 1):
            j += 1
            continue
        if i >= len(ins) or j >= len(out):
            break
        a, b = [i], [j]
        pa, pb = ins[i], out[j]
        while pa != pb:
            if pa < pb:
                i += 1
                if i >= len(ins):
                    return [None] * len(out)
                a.append(i)
                pa *= ins[i]
            else:
                j += 1
                if j >= len(out):
                    return [None] * len(out)
                b.append(j)
                pb *= out[j]
        i, j = i + 1, j + 1
        if len(a) == 1 and len(b) == 1:
            res[b[0]] = labels[a[0]]
        elif len(b) == 1:
            res[b[0]] = ("M", tuple(ins[k] for k in a), tuple(labels[k] for k in a))
        elif len(a) == 1:
            lab = labels[a[0]]
            if isinstance(lab, tuple) and lab and lab[0] == "M" and lab[1] == tuple(out[k] for k in b):
                for k, part in zip(b, lab[2]):
                    res[k] = part
            elif lab == POS:
                for k in b:
                    res[k] = POS
    return res


class AxisLabels:
    """The labels of every autograd output of one traced forward pass (see the module docstring)."""

    def __init__(self, grad_fns, linear_of_weight: dict):
        self.linear_of_weight = linear_of_weight  # id(weight parameter) -> Linear module
        self.labels: dict = {}  # (grad_fn, output nr) -> tuple of labels
        self.meets_positions: list = []  # (grad_fn, layers whose features meet positions there)
        self.reads: dict = {}  # Linear module -> (its mm / addmm grad_fn, the input it reads, that input's labels)
        self.param_uses: dict = {}  # id(parameter) -> [(element-wise grad_fn it enters, its axes' offset there)]
        for gf in _topological(grad_fns):
            self._visit(gf)

    def of(self, gf, nr: int = 0):
        lab = self.labels.get((gf, nr))
        if lab is None:
            shape = out_shape(gf, nr) if gf is not None else None
            return None if shape is None else (None,) * len(shape)
        return lab

    def _inputs(self, gf):
        return [(f, nr) for f, nr in gf.next_functions]

    def _visit(self, gf) -> None:
        kind = type(gf).__name__
        out = out_shape(gf, 0)
        if out is None:
            return
        n_out = len(getattr(gf, "_input_metadata", ())) or 1
        labels = None
        ins = self._inputs(gf)
        if kind in ("MmBackward0", "AddmmBackward0"):
            mat1, mat2 = (ins[0], ins[1]) if kind == "MmBackward0" else (ins[1], ins[2])
            layer = self._weight_layer(mat2[0])
            if layer is not None and mat1[0] is not None:
                read = self.of(*mat1)
                self.reads[layer] = (gf, mat1[0], read)
                labels = (read[0], ("F", frozenset([id(layer)])))
        elif kind == "ConvolutionBackward0":
            src, weight = ins[0], ins[1]
            var = getattr(weight[0], "variable", None)
            if var is not None:  # (the model's input has no autograd record: its batch axis is unknown)
                batch = self.of(*src)[0] if src[0] is not None else None
                labels = (batch, ("F", frozenset([id(var)]))) + (POS,) * (len(out) - 2)
        elif kind in ("TransposeBackward0", "TBackward0"):
            src = self.of(*ins[0])
            if src is not None:
                if kind == "TBackward0":
                    d0, d1 = 0, 1
                else:
                    d0, d1 = _axis(gf._saved_dim0, len(out)), _axis(gf._saved_dim1, len(out))
                lab = list(src)
                lab[d0], lab[d1] = lab[d1], lab[d0]
                labels = tuple(lab)
        elif kind == "PermuteBackward0":
            src = self.of(*ins[0])
            if src is not None:
                labels = tuple(src[_axis(d, len(out))] for d in gf._saved_dims)
        elif kind in _RESHAPES:
            src_shape = out_shape(*ins[0]) if ins and ins[0][0] is not None else None
            if src_shape is not None:
                labels = tuple(_reshape(list(self.of(*ins[0])), src_shape, out))
        elif kind in ("SplitBackward0", "SplitWithSizesBackward0"):
            src = self.of(*ins[0])
            if src is not None:
                for nr in range(n_out):
                    self.labels[(gf, nr)] = src
                return
        elif kind in _ELEMENTWISE or kind == "CatBackward0":
            labels = self._elementwise(gf, ins, out, cat=kind == "CatBackward0")
        if labels is not None and len(labels) == len(out):
            self.labels[(gf, 0)] = labels

    def _weight_layer(self, gf):
        """The Linear whose weight ``gf`` (``TBackward0`` of the parameter) transposes, else None."""
        if gf is None or type(gf).__name__ != "TBackward0":
            return None
        src = gf.next_functions[0][0]
        var = getattr(src, "variable", None)
        return None if var is None else self.linear_of_weight.get(id(var))

    def _elementwise(self, gf, ins, out, cat: bool):
        cat_dim = _axis(gf._saved_dim, len(out)) if cat else None
        per_axis = [[] for _ in out]
        for f, nr in ins:
            if f is None:
                continue
            shape = out_shape(f, nr)
            if shape is None:
                continue
            lab = self.of(f, nr)
            offset = len(out) - len(shape)
            if offset < 0:
                return None
            var = getattr(f, "variable", None)
            if var is not None and not cat:
                self.param_uses.setdefault(id(var), []).append((gf, offset))
            for k, size in enumerate(shape):
                if size == 1 and out[offset + k] != 1:
                    continue  # broadcast
                if (
                    cat
                    and offset + k == cat_dim
                    and lab[k] is None
                    and getattr(f, "variable", None) is not None
                ):
                    continue  # a parameter concatenated along the axis (a class token)
                per_axis[offset + k].append(lab[k])
        return tuple(_merge_axis(labels, self.meets_positions, gf) for labels in per_axis)


def _topological(roots) -> list:
    """Every grad_fn reachable from ``roots``, each after all of its inputs."""
    order, state = [], {}
    for root in roots:
        if root is None or root in state:
            continue
        stack = [(root, False)]
        while stack:
            gf, done = stack.pop()
            if done:
                state[gf] = 2
                order.append(gf)
                continue
            if gf in state:
                continue
            state[gf] = 1
            stack.append((gf, True))
            for f, _ in getattr(gf, "next_functions", ()):
                if f is not None and f not in state:
                    stack.append((f, False))
    return order


def label_axes(dg) -> set[int]:
    """Read the axes of ``dg``'s forward pass (:class:`AxisLabels`) once and apply what they tell:
    :func:`parameter_channel_axes`, then :func:`token_axis_layers` (its result is returned)."""
    linears = {id(m.weight): m for m in dg.model.modules() if isinstance(m, nn.Linear)}
    node_of = {node.grad_fn: node for node in dg.module2node.values() if node.grad_fn is not None}
    labels = AxisLabels(list(node_of), linears)
    parameter_channel_axes(dg, labels)
    channels_last_views(dg, labels)
    return token_axis_layers(dg, labels, node_of)


def channels_last_views(dg, labels: AxisLabels) -> None:
    """A reshape that keeps the last axis whole, where that axis holds channels (a Linear's own flattening of a
    channels-last map, ``(B, H, W, C) -> (B * H * W, C)``), keeps every channel where it is. torch-pruning guesses
    the channel counts on both sides of a 4-D reshape by walking the graph and can install a flatten mapping
    (a channels-last position embedding ``(1, H, W, C)`` read as H channels gave a stride of C / H)."""
    import torch_pruning as tp
    from torch_pruning.dependency import index_mapping as im

    for node in dg.module2node.values():
        gf = node.grad_fn
        if node.type != tp.ops.OPTYPE.RESHAPE or gf is None or type(gf).__name__ not in _RESHAPES:
            continue
        src = gf.next_functions[0] if gf.next_functions else (None, 0)
        ins = out_shape(*src) if src[0] is not None else None
        out = out_shape(gf, 0)
        if not ins or not out or ins[-1] != out[-1] or not is_feature(labels.of(*src)[-1]):
            continue
        edges = list(node.dependencies) + [
            dep for other in node.inputs + node.outputs for dep in other.dependencies if dep.target is node
        ]
        for dep in edges:
            kept = [m for m in dep.index_mapping if not isinstance(m, im._FlattenIndexMapping)]
            dep.index_mapping = kept + [None] * (2 - len(kept))


def parameter_channel_axes(dg, labels: AxisLabels) -> None:
    """The channel axis of a parameter outside any layer that is added to (or multiplies) a feature map: the axis
    that meets a feature axis there. torch-pruning takes the last axis of size > 1, and fusion the second for a
    ``(1, C, H, W)`` map; VOLO's position embedding ``(1, H, W, C)`` is added to a channels-last map."""
    for p, node in dg.module2node.items():
        if not isinstance(p, nn.Parameter) or p.dim() < 3 or p.shape[0] != 1:
            continue
        axes = set()
        for gf, offset in labels.param_uses.get(id(p), ()):
            out = labels.labels.get((gf, 0))
            if out is None:
                continue
            axes |= {k for k in range(p.dim()) if p.shape[k] > 1 and is_feature(out[offset + k])}
        if len(axes) == 1:
            node.pruning_dim = axes.pop()


def token_axis_layers(dg, labels: AxisLabels, node_of: dict) -> set[int]:
    """Rewire torch-pruning's graph ``dg`` around Linears that act on positions (see the module docstring) and
    return the ids of those whose outputs are positions (they root no channel group).

    * A Linear positional on its input loses its edges to its inputs: its input columns join no group.
    * A Linear positional on its output loses its edges to its outputs: its rows join no group, and it roots none.
      Its input columns and the rows of a Linear before it (a token-mixing MLP's hidden units) are a group as
      usual.
    * The channels that pass through as a batch axis are joined again: the tensor read by the first Linear is
      linked, channel by channel, to the consumers of the last one (found by the same merged batch axis), so a
      gate that multiplies the channels with the mixed tokens (gMLP's spatial gating unit) still pairs them.
    """
    from torch_pruning.dependency.dependency import Dependency

    linears = labels.linear_of_weight
    reads_pos = {}  # layer -> (grad_fn of the tensor it reads, its merged batch label)
    for layer, (_, src, read) in labels.reads.items():
        if len(read) == 2 and is_positional(read[1]):
            reads_pos[layer] = (src, read[0])
    ids = {id(m): m for m in linears.values()}
    writes_pos = {}
    for _, layers in labels.meets_positions:
        for lid in layers:
            if lid in ids and ids[lid] in labels.reads:
                writes_pos[ids[lid]] = labels.reads[ids[lid]][2][0]
    if not reads_pos and not writes_pos:
        return set()

    def cut(a, b):
        a.dependencies = [d for d in a.dependencies if d.target is not b]
        b.dependencies = [d for d in b.dependencies if d.target is not a]

    for layer in reads_pos:
        node = dg.module2node.get(layer)
        if node is not None:
            for other in node.inputs:
                cut(node, other)
    for layer in writes_pos:
        node = dg.module2node.get(layer)
        if node is not None:
            for other in node.outputs:
                cut(node, other)
    # the channels passing through: from the tensor the first Linear reads to the consumers of the last
    for src, batch in reads_pos.values():
        if not any(is_feature(p) for p in (batch[2] if isinstance(batch, tuple) and batch[0] == "M" else ())):
            continue
        # walk back over the Linear's own flattening (views, a contiguous copy) to the tensor it reads
        while src is not None and type(src).__name__ in _LINEAR_INPUT_VIEWS:
            src = src.next_functions[0][0]
        x = node_of.get(src)
        if x is None:
            continue
        for last, out_batch in writes_pos.items():
            if out_batch != batch:
                continue
            node = dg.module2node.get(last)
            if node is None:
                continue
            x_out = dg.get_pruner_of_module(x.module).prune_out_channels
            for y in node.outputs:
                y_in = dg.get_pruner_of_module(y.module).prune_in_channels
                x.dependencies.append(Dependency(trigger=x_out, handler=y_in, source=x, target=y))
                y.dependencies.append(Dependency(trigger=y_in, handler=x_out, source=y, target=x))
    return {id(layer) for layer in writes_pos}


class _RepeatEvery:
    """The index mapping of a reshape that merges a token tensor's channel axis, the fastest, with the axes before
    it: ``(A, P, C) -> (B, P * C)`` puts channel c at ``p * C + c`` for every p (``forward``); back, position i
    is channel ``i % C``."""

    def __init__(self, channels: int, repeats: int, reverse: bool):
        self.channels, self._stride, self.reverse = channels, repeats, reverse

    def __call__(self, idxs):
        from torch_pruning import _helpers

        c = self.channels
        if self.reverse:
            seen, out = set(), []
            for i in idxs:
                key = (i.idx % c, i.root_idx)
                if key not in seen:
                    seen.add(key)
                    out.append(_helpers._HybridIndex(idx=i.idx % c, root_idx=i.root_idx))
            return out
        return [
            _helpers._HybridIndex(idx=q * c + i.idx, root_idx=i.root_idx)
            for i in idxs
            for q in range(self._stride)
        ]

    def __repr__(self) -> str:
        return f"_RepeatEvery({self.channels} channels x {self._stride}{', reverse' if self.reverse else ''})"


def channel_fastest_merges(dg) -> None:
    """Reshapes of a token tensor ``(..., P, C)`` whose last axis merges the channel axis (fastest) with the axes
    before it, ``(..., P * C)``: Transformer-in-Transformer's inner pixel tokens ``(B * N, P, C)`` flattened into
    each patch's outer features ``(B, N, P * C)``. Channel c of the input is the P positions ``p * C + c`` of the
    output (repeated segments of the channel order, read by the LayerNorm and the Linear after it).
    torch-pruning maps reshapes of 1-D and 4-D tensors only, so the channels reached the first C positions alone."""
    import torch_pruning as tp

    for node in dg.module2node.values():
        gf = node.grad_fn
        if node.type != tp.ops.OPTYPE.RESHAPE or gf is None:
            continue
        ins = tuple(int(s) for s in getattr(gf, "_saved_self_sym_sizes", ()) or ())
        out = out_shape(gf, 0)
        if len(ins) != 3 or out is None or len(out) < 2:
            continue
        merged = None
        for j in range(len(ins) - 1):
            tail = 1
            for s in ins[j:]:
                tail *= s
            lead = 1
            for s in out[:-1]:
                lead *= s
            if out[-1] == tail and lead * tail == ins[0] * ins[1] * ins[2]:
                merged = tail // ins[-1]
                break
        if not merged or merged == 1:
            continue
        channels = ins[-1]
        for src in node.inputs:
            for dep in src.dependencies:
                if dep.target is node:
                    dep.index_mapping = [_RepeatEvery(channels, merged, False), None]
            for dep in node.dependencies:
                if dep.target is src:
                    dep.index_mapping = [_RepeatEvery(channels, merged, True), None]


# one trace at a time may replace F.linear: two threads patching and restoring it in turn would leave one of
# them tracing with the plain function (or F.linear patched for good)
_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def functional_linears_as_modules(model: nn.Module):
    """While torch-pruning traces ``model``: a ``F.linear(x, layer.weight, bias)`` written outside ``layer``'s own
    forward (SwinV2's and EVA's attention add the bias ``cat(q_bias, k_bias, v_bias)`` this way, around a ``qkv``
    Linear without a bias) runs as ``layer(x) + bias``. torch-pruning only knows a layer by its call, and took the
    functional product for an element-wise operation that passed the input's channels on to its output. The value
    is the same; only the record differs. A call with a bias of its own on a layer that has one is left alone."""
    import torch.nn.functional as F

    owners = {id(m.weight): m for m in model.modules() if isinstance(m, nn.Linear)}
    running: set[int] = set()

    def enter(module, args):
        running.add(id(module))

    def leave(module, args, output):
        running.discard(id(module))

    def linear(input, weight, bias=None):
        layer = owners.get(id(weight))
        if layer is None or id(layer) in running or (bias is not None and layer.bias is not None):
            return original(input, weight, bias)
        out = layer(input)
        return out if bias is None else out + bias

    handles = []
    for m in owners.values():
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave))
    with _PATCH_LOCK:
        original = F.linear  # read by linear() above
        F.linear = linear
        try:
            yield
        finally:
            F.linear = original
            for h in handles:
                h.remove()
