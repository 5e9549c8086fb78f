"""Attention, recognised by its layout and never by model names: which layers make a head's q, k and v rows
(one ``qkv``, ``q`` + ``kv``, ``q`` + ``k`` + ``v``, Linears or 1x1 convolutions, also behind norm wrappers), in
which order (head-first, role-first, head-major), which tensors hold one entry per head (relative-position
tables, temperatures, talking-heads Linears), and how a traced channel group becomes a group of whole heads.
Also where the dependency graph is cut inside an attention (channels mapped onto spatial positions) and the
refusals that name an attention layout fusion does not know.

The tracer (:mod:`fusion.trace`) calls these while it turns torch-pruning's groups into channel groups; nothing
here walks the dependency graph itself.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch_pruning as tp

from .axes import out_shape
from .errors import FusionError
from .groups import ChannelGraph, ChannelGroup, Slot, slot_of
from .layers import IN, OUT, ROOT_TYPES
from .state import full_state


def _unknown_attention_reason(model: nn.Module, root: str, reached: list[str] = ()) -> str | None:
    """The refusal for a group that exploded at an attention fusion does not recognise (see
    :func:`attention_layout`), or None when neither ``root`` nor a layer the walk ``reached`` is in a module
    with a head count.

    Names the attention (the innermost module around ``root``, else around a reached layer, that keeps
    ``num_heads`` or ``heads``: the walk from a residual stream goes through EfficientViT's cascaded group
    attention) and, when it has one, a parameter with no dimension per head (BoTNet's relative position
    tables of shape ``(2 * size - 1, head_dim)``, read by every head): permuting whole heads would keep the
    function, but heads of different members could not keep their own tables, so not even the concatenation
    is the ensemble."""
    modules = dict(model.named_modules())
    for path in [root, *reached]:
        parts = path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:cut])
            module = modules.get(name)
            heads = _head_count(module) if module is not None else None
            if (
                isinstance(heads, int)
                and heads > 0
                and attention_layout(module) is None
                and output_heads_layout(module) is None
            ):
                return _unknown_attention_message(modules, name, module, heads, parts[cut], root)
    return None


def _outside_queries_reason(model: nn.Module, graph: ChannelGraph, exc: FusionError) -> str | None:
    """A refusal naming the structure for an inconsistent trace (``exc``, see :func:`_check_coverage`) inside an
    attention whose queries come from outside it (see :func:`outside_query_layout`) that
    :func:`_outside_query_heads` could not trace as heads of the group carrying the queries (no single group
    holds its keys, several head counts meet in it, or it reads channels several times); else None."""
    modules = dict(model.named_modules())
    tensors = [t for t in graph.tensor_dims if t in str(exc)]
    for tensor in tensors:
        parts = tensor.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:cut])
            module = modules.get(name)
            layout = outside_query_layout(module) if module is not None else None
            if layout is not None:
                heads, hd = layout
                return (
                    f"attention {name!r} ({type(module).__name__}) makes only keys and values (its qkv has 2 x "
                    f"{heads} heads x {hd} rows): its queries come from outside it, so its heads are channels of "
                    "the tensor they come from, and the channel group carrying them could not be traced as "
                    f"{heads} heads of {hd} channels; fusion refused"
                )
    return None


def _shared_attention_layer_reason(model: nn.Module, root: str, reached: list[str] = ()) -> str | None:
    """The refusal for a group that exploded at a layer with parameters called by several attentions (one
    module under several names, each inside its own module with a head count), or None. Such a layer reads the
    heads of every one of them (CoaT's convolutional relative position encoding: depthwise convolutions over
    v's heads reshaped into images, one module per stage shared by its blocks), so the heads of all of them
    would have to move together."""
    modules = dict(model.named_modules())
    aliases: dict = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    for path in [root, *reached]:
        module = modules.get(path)
        if module is None or not list(module.parameters()):
            continue
        owners = []
        for alias in aliases[id(module)]:
            parts = alias.split(".")
            owner = next(
                (
                    ".".join(parts[:cut])
                    for cut in range(len(parts) - 1, 0, -1)
                    if isinstance(_head_count(modules.get(".".join(parts[:cut]))), int)
                ),
                None,
            )
            if owner is not None and owner not in owners:
                owners.append(owner)
        if len(owners) > 1:
            return (
                f"layer {path!r} ({type(module).__name__}) is shared by {len(owners)} attentions ({owners[0]!r}, "
                f"{owners[1]!r}...) and reads their heads reshaped next to the spatial positions: the heads of all "
                "of them would have to move together, which fusion does not support; fusion refused"
            )
    return None


def _unknown_attention_message(
    modules: dict, name: str, module: nn.Module, heads: int, inner: str, root: str
):
    """The words of :func:`_unknown_attention_reason` for attention ``name`` (``inner``: its child that ``root``
    or the reached layer is in, not searched for parameters shared by the heads)."""
    where = (
        "its q/k/v channels are"
        if root.startswith(name + ".")
        else f"the channels of {root!r} reach it and are"
    )
    reason = (
        f"attention {name!r} ({type(module).__name__}): {where} reshaped into heads next to the spatial positions "
        "in a layout fusion does not know (no q/k/v Linears or 1x1 convs read by a proj)"
    )
    for pname, p in module.named_parameters():
        if pname.split(".", 1)[0] == inner or p.dim() < 2 or heads in p.shape:
            continue
        owner = modules.get(f"{name}.{pname.rsplit('.', 1)[0]}") if "." in pname else module
        if isinstance(owner, (*ROOT_TYPES, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
            continue
        # every head reads it: heads of different members could not keep their own, even the concatenation
        reason += f"; {pname!r} {tuple(p.shape)} is shared by all heads"
        break
    return reason + "; fusion refused"


# the Linears that make an attention's q, k and v, and how many of them each makes (rows r * dim + head * head_dim
# + j for its r-th one): one fused qkv (ViT, Swin, XCiT), q and kv (PVT, Twins, VOLO's class attention), q, k and
# v (XCiT's class attention), wq, wk and wv (CrossViT), qk and v (TNT)
_QKV_LAYOUTS = (
    (("qkv", 3),),
    (("q", 1), ("kv", 2)),
    (("q", 1), ("k", 1), ("v", 1)),
    (("wq", 1), ("wk", 1), ("wv", 1)),  # CrossViT's cross-attention (its q from the class token only)
    (("qk", 2), ("v", 1)),
    (("v", 1),),  # VOLO's outlook attention: its attention weights are a Linear's "head-blocks" rows
)


def _pointwise(m) -> tuple[int, int] | None:
    """``(in, out)`` channels of a Linear or of a 1x1, ungrouped convolution (a Linear over channels), else None."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if (
        isinstance(m, nn.modules.conv._ConvNd)
        and not m.transposed
        and m.groups == 1
        and all(k == 1 for k in m.kernel_size)
    ):
        return m.in_channels, m.out_channels
    return None


def attention_layout(module: nn.Module) -> tuple[int, int, tuple[tuple[str, int], ...]] | None:
    """``(num_heads, head_dim, producers)`` of a timm-style self-attention, or None.

    Such a module has Linears (or 1x1 convolutions, as in Visformer) making q, k and v (``producers``: see
    ``_QKV_LAYOUTS``), each ``num_heads`` heads of ``head_dim`` consecutive rows, a ``proj`` reading the heads'
    outputs, and ``num_heads``; ``head_dim`` is read when the module keeps it and inferred otherwise (Swin's
    window attention, XCiT's and EdgeNeXt's cross-covariance attention, DaViT's channel attention, VOLO keep
    only ``num_heads``).
    """
    proj, heads = _pointwise(getattr(module, "proj", None)), _head_count(module)
    if proj is None or not isinstance(heads, int) or heads <= 0 or head_major_layout(module) is not None:
        return None
    for producers in _QKV_LAYOUTS:
        layers = [_pointwise(getattr(module, attr, None)) for attr, _ in producers]
        if any(m is None for m in layers):
            continue
        dim = proj[0]
        head_dim = getattr(module, "head_dim", None)
        if not isinstance(head_dim, int):
            if dim % heads:
                return None
            head_dim = dim // heads
        if dim != heads * head_dim or any(m[1] != n * dim for m, (_, n) in zip(layers, producers)):
            return None
        return heads, head_dim, producers
    return None


def _head_count(module: nn.Module):
    """An attention module's head count: ``num_heads`` (timm's ViT, Swin, MaxViT...) or ``heads`` (Hiera)."""
    heads = getattr(module, "num_heads", None)
    return getattr(module, "heads", None) if heads is None else heads


def _cut_attention_internals(dg, skeleton: nn.Module) -> None:
    """Cut torch-pruning's graph inside every attention :func:`attention_layout` recognises: between its q/k/v
    producers and what reads their outputs, and between ``proj`` and what feeds it. Only where the uncut walk
    exploded (see :func:`_trace`): elsewhere the graph inside an attention is what ties a per-head tensor outside
    it to the heads (one relative-position MLP shared by every block).

    Between those layers the channels are reshaped into heads and moved next to the spatial positions
    (``view(B, heads, 3 * head_dim, H * W)`` of a 1x1-conv qkv in MaxViT / CoAtNet, ``reshape(B, T, N, 3, heads,
    head_dim)`` in NesT, mask units in Hiera; attentions with layers of their own are not cut, see
    :func:`_has_inner_layers`); torch-pruning maps each channel there to thousands of
    (channel, position) indices and the walk explodes. What couples those channels is known without the walk:
    :func:`_attention_heads` builds the whole head group (q/k/v rows, ``proj``'s columns, the per-head
    parameters) from the layout, and the self-check verifies it. A coupling the cut hides (a producer's output
    also read outside the attention, a normalization between the heads and ``proj``) leaves a tensor that a
    permutation of the heads does not follow, which the self-check refuses. The same for head-major attentions
    (see :func:`head_major_layout`), after the norms wrapped with their layers."""
    for module in skeleton.modules():
        layout = attention_layout(module)
        if layout is None or _has_inner_layers(module, layout[2]):
            continue
        for attr, _ in layout[2]:
            node = dg.module2node.get(getattr(module, attr))
            if node is not None:
                _cut_edges(node, node.outputs)
        node = dg.module2node.get(module.proj)
        if node is not None:
            _cut_edges(node, node.inputs)
    for module in skeleton.modules():
        layout = head_major_layout(module)
        if layout is None:
            continue
        # the wrapped layers' outputs are those of the norm after them (EfficientFormerV2's ConvNorm); a
        # depthwise convolution over a producer's rows (v_local) is added to the heads' output
        for attr in _head_major_row_layers(module, layout[3]):
            top = getattr(module, attr)
            last = [
                m for m in top.modules() if _is_layer(m) or isinstance(m, nn.modules.batchnorm._BatchNorm)
            ][-1]
            node = dg.module2node.get(last)
            if node is not None:
                _cut_edges(node, node.outputs)
        node = dg.module2node.get(_wrapped_pointwise(module, "proj")[1])
        if node is not None:
            _cut_edges(node, node.inputs)


def _attention_orders(dg, skeleton: nn.Module) -> dict:
    """``{(module name, attribute): order}`` for the attention layers whose channels are not in ViT's order:
    ``"head-first"`` q/k/v producers (see :func:`_producer_row_order`), a ``"head-last"`` ``proj`` (see
    :func:`_proj_column_order`); and ``"head-blocks"``, another Linear or 1x1 convolution of the attention
    whose rows are reshaped head first into several values per head (VOLO's outlook attention makes its
    attention weights ``[heads, k * k, k * k]`` per position with a Linear ``attn``): its rows move with the
    heads, one block per head."""
    orders = {}
    for name, module in skeleton.named_modules():
        layout = attention_layout(module)
        if layout is None:
            continue
        heads, hd, producers = layout
        for attr, n in producers:
            node = dg.module2node.get(getattr(module, attr))
            if (
                node is not None
                and _producer_row_order(node, getattr(module, attr), heads, hd, n) == "head-first"
            ):
                orders[(name, attr)] = "head-first"
        node = dg.module2node.get(module.proj)
        if node is not None and _proj_column_order(node, module.proj, heads, hd) == "head-last":
            orders[(name, "proj")] = "head-last"
        own = {attr for attr, _ in producers} | {"proj"}
        for sub_name, sub in module.named_modules():
            node = dg.module2node.get(sub)
            width = _pointwise(sub)
            if sub_name.split(".", 1)[0] in own or node is None or width is None or width[1] % heads:
                continue
            for factors in _channel_splits(node, sub, "outputs"):
                if width[1] > heads and [f for f in factors if f != 1][:1] == [heads]:
                    orders[(name, sub_name)] = "head-blocks"
                break
    return orders


def _has_inner_layers(module: nn.Module, producers) -> bool:
    """Whether an attention has layers besides its q/k/v producers and ``proj`` (MViTv2's pooling convolutions and
    norms on each head's q, k, v; Twins' spatial-reduction conv; SwinV2's position-bias MLP): the graph through
    them is what ties them to the heads (see :func:`_attention_heads`), so it is not cut there."""
    own = {getattr(module, attr) for attr, _ in producers} | {module.proj}
    return any(
        isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.LayerNorm, nn.modules.batchnorm._BatchNorm))
        and m not in own
        for m in module.modules()
    )


def _cut_edges(node, others) -> None:
    """Remove the dependencies between ``node`` and each of ``others``, both ways."""
    others = {id(o) for o in others}
    node.dependencies = [d for d in node.dependencies if id(d.target) not in others]
    for other in node.inputs + node.outputs:
        if id(other) in others:
            other.dependencies = [d for d in other.dependencies if d.target is not node]


def _producer_row_order(node, layer: nn.Module, heads: int, hd: int, n: int) -> str | None:
    """How the reshape after a q/k/v producer splits its ``n * heads * hd`` output channels, from the shapes
    autograd recorded: ``"role-first"`` (factors ``n, heads, hd``: ViT's ``(B, N, 3, heads, hd)``),
    ``"head-first"`` (``heads, n * hd`` or ``heads, n, hd``: MaxViT's ``view(B, heads, 3 * hd, H * W)``), None
    when no such reshape follows or the split is neither (role-first is then assumed; the self-check judges).
    Where both match (n == heads) role-first is kept, the order every earlier trace assumed. A single head
    decides nothing about the member, but a model with more heads reads its rows in that order: an axis of size
    1 for the head (``view(B, N, 1, 3 * hd)``) is matched first."""
    patterns = (
        ("role-first", (n, heads, hd)),
        ("head-first", (heads, n * hd)),
        ("head-first", (heads, n, hd)),
    )
    for factors in _channel_splits(node, layer, "outputs"):
        return _match_factors(factors, patterns)
    return None


def _proj_column_order(node, layer: nn.Module, heads: int, hd: int) -> str | None:
    """How the reshape before ``proj`` makes its ``heads * hd`` input channels: ``"head-last"`` when they are a
    ``(hd, heads)`` axis pair (NesT's ``permute(0, 2, 3, 4, 1).reshape(B, T, N, C)``: column ``j * heads +
    head``), ``"head-first"`` for ``(heads, hd)`` and also where both match (heads == hd), None when no such
    reshape feeds it (head-first is then assumed; the self-check judges)."""
    for factors in _channel_splits(node, layer, "inputs"):
        return _match_factors(factors, (("head-first", (heads, hd)), ("head-last", (hd, heads))))
    return None


def _match_factors(factors: list[int], patterns) -> str | None:
    """The first pattern ``(name, sizes)`` equal to ``factors`` with their axes of size 1, else the first equal
    without them, else None."""
    for name, sizes in patterns:
        if factors == list(sizes):
            return name
    plain = [f for f in factors if f != 1]
    for name, sizes in patterns:
        if plain == [f for f in sizes if f != 1]:
            return name
    return None


def _channel_splits(node, layer: nn.Module, side: str, depth: int = 4):
    """The splits of a layer's channel axis (a Linear's last axis, a convolution's axis 1) into several axes by
    the nearest reshapes on ``side`` (``"outputs"``: the channels it makes become these axes; ``"inputs"``:
    the axes that become the channels it reads), through parameter-free element-wise operations and reshapes
    that keep the axis whole (a Linear over a 4-D tensor is recorded as view, addmm, view)."""
    channel = -1 if isinstance(layer, nn.Linear) else 1
    seen, frontier = {id(node)}, list(getattr(node, side))
    for _ in range(depth):
        nxt = []
        for other in frontier:
            if id(other) in seen:
                continue
            seen.add(id(other))
            gf = other.grad_fn
            if other.type == tp.ops.OPTYPE.RESHAPE and gf is not None:
                ins = getattr(gf, "_saved_self_sym_sizes", None)
                out = out_shape(gf, 0)
                if ins is None or out is None:
                    continue
                ins, out = [int(x) for x in ins], [int(x) for x in out]
                if side == "outputs":
                    factors = _axis_factors(ins, out, channel % len(ins))
                else:
                    factors = _axis_factors(out, ins, channel % len(out))
                if factors is None:
                    continue
                if len(factors) > 1:  # axes of size 1 included: a single head's axis is an answer
                    yield factors
                    continue
            elif other.type != tp.ops.OPTYPE.ELEMENTWISE or isinstance(other.module, nn.Parameter):
                continue
            nxt += getattr(other, side)
        frontier = nxt


def _axis_factors(ins: list[int], out: list[int], axis: int) -> list[int] | None:
    """The dimensions of a reshape's output ``out`` that axis ``axis`` of its input ``ins`` becomes (axes of size 1
    between them and the leading ones included), or None when that axis is merged with a neighbour (its
    elements are not a run of whole output dims)."""
    lead = 1
    for s in ins[:axis]:
        lead *= s
    prod, i = 1, 0
    while i < len(out) and prod < lead:
        prod *= out[i]
        i += 1
    if prod != lead:
        return None
    factors, total = [], 1
    while i < len(out) and total < ins[axis]:
        total *= out[i]
        factors.append(out[i])
        i += 1
    return factors if total == ins[axis] else None


def _per_head_params(module: nn.Module, name: str, heads: int, producers) -> list[tuple[str, int]]:
    """The attention module's other parameters indexed by head: its own (Swin's relative position bias table
    ``[positions, heads]``, XCiT's temperature ``[heads, 1, 1]``) and those of its other submodules (the
    last layer of SwinV2's continuous position bias MLP makes one bias per head): ``(tensor name, head
    dimension)``. They move with the heads. A parameter with no dimension of ``heads`` is not per head and is
    left alone, one with several is refused as ambiguous; the self-check verifies the rest.

    The parameters of a Linear or convolution inside the attention are read by what the layer does, not by
    their sizes (see :func:`_per_head_layer_params`): a kernel of 4 x 4 is not per head in a 4-head attention
    (Twins' spatial-reduction convolution)."""
    skip = {attr for attr, _ in producers} | {"proj", "q_norm", "k_norm"}
    out = []
    layer_params = set()
    for sub_name, sub in module.named_modules():
        if sub_name and sub_name.split(".", 1)[0] not in skip and _is_layer(sub):
            layer_params.update(f"{sub_name}.{p}" for p, _ in sub.named_parameters(recurse=False))
            out += [(f"{name}.{sub_name}.{p}", d) for p, d in _per_head_layer_params(sub, heads)]
    for pname, p in module.named_parameters():
        if pname.split(".", 1)[0] in skip or pname in layer_params:
            continue
        dims = [d for d, n in enumerate(p.shape) if n == heads and not _kernel_dim(module, pname, d)]
        if len(dims) > 1:
            raise FusionError(
                f"attention {name!r}: parameter {pname!r} of shape {tuple(p.shape)} has several dimensions of "
                f"its {heads} heads; which one is per head is ambiguous; fusion refused"
            )
        if dims:
            out.append((f"{name}.{pname}", dims[0]))
    return out


def _kernel_dim(module: nn.Module, pname: str, d: int) -> bool:
    """Whether dimension ``d`` of parameter ``pname`` of ``module`` is a convolution's kernel axis (Twins' and
    PVT's spatial-reduction convolution ``sr`` of kernel size 4 in an attention of 4 heads): a spatial axis,
    never one per head."""
    owner = module.get_submodule(pname.rsplit(".", 1)[0]) if "." in pname else module
    return isinstance(owner, nn.modules.conv._ConvNd) and pname.endswith("weight") and d >= 2


def _is_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))


def _per_head_layer_params(layer: nn.Module, heads: int) -> list[tuple[str, int]]:
    """A Linear or convolution inside an attention: its output rows (and bias) are per head when it makes one
    per head (SwinV2's position-bias MLP), its input columns when it reads one per head. A Linear from heads to
    heads mixes the heads (talking-heads attention, CaiT's ``proj_l`` / ``proj_w`` over the head axis of the
    attention logits): a permutation of the heads moves its rows and its columns together, and between two
    members' heads its entries are zero, so keeping every head computes each member's own mixing. Kernel
    dimensions are never per head."""
    if isinstance(layer, nn.Linear):
        out_ch, in_ch = layer.out_features, layer.in_features
    elif layer.groups == 1 and not layer.transposed:
        out_ch, in_ch = layer.out_channels, layer.in_channels
    else:
        out_ch, in_ch = layer.out_channels, None  # grouped: the input side is per block, not per head
    found = []
    if out_ch == heads:
        found.append(("weight", 0))
        if layer.bias is not None:
            found.append(("bias", 0))
    if in_ch == heads:
        found.append(("weight", 1))
    return found


def _attention_heads(
    skeleton: nn.Module, groups: list[ChannelGroup], orders: dict | None = None
) -> list[ChannelGroup]:
    """Replace the group of every attention's q/k/v outputs by one group whose units are whole heads.

    torch-pruning couples q, k and v rows as independent channels, but a head's q and k rows meet in a dot
    product: only whole heads (their q, k, v rows, the projection's input columns and the module's per-head
    parameters) may move. Whole heads are also a symmetry of attention across channels within a head
    (XCiT's cross-covariance attention). ``orders`` (see :func:`_attention_orders`) names the layers in another
    order than ViT's: a ``"head-first"`` producer's rows (all ``n * head_dim`` rows of head 0, then head 1...)
    are one run per head in its slot, a ``"head-last"`` ``proj``'s columns (``j * heads + head``: NesT) one
    repeat per ``j``, so that a new model keeps that order (assembly writes repeat after repeat).
    """
    orders = orders or {}
    groups, shared = _shared_head_tables(skeleton, groups)
    for name, module in skeleton.named_modules():
        layout = attention_layout(module)
        if layout is None or name in shared:
            continue
        if any(
            p.numel()
            for sub in ("q_norm", "k_norm")
            for p in getattr(module, sub, nn.Identity()).parameters()
        ):
            raise FusionError(
                f"attention {name!r} normalizes q/k per head (qk_norm); fusion does not support it"
            )
        heads, hd, producers = layout
        per_head = _per_head_params(module, name, heads, producers)
        proj_w = f"{name}.proj.weight"
        rows = {f"{name}.{attr}.{t}" for attr, _ in producers for t in ("weight", "bias")}
        blocks = {  # "head-blocks" layers: {tensor: (layer, rows per head)}
            f"{name}.{sub}.{t}": (f"{name}.{sub}", _pointwise(module.get_submodule(sub))[1] // heads)
            for (owner, sub), order in orders.items()
            if owner == name and order == "head-blocks"
            for t, p in module.get_submodule(sub).named_parameters(recurse=False)
            if t in ("weight", "bias") and p is not None
        }
        rows |= set(blocks)
        per_head_names = {t for t, _ in per_head}
        per_head_dims = set(per_head)
        hits = [
            gi
            for gi, g in enumerate(groups)
            for s in g.slots
            if (s.tensor in rows and s.dim == 0)
            or (s.tensor == proj_w and s.dim == 1)
            or (s.tensor, s.dim) in per_head_dims
        ]
        split_biases = _split_qkv_biases(module, name, heads * hd)
        expected = rows | {proj_w} | per_head_names | set(split_biases)
        for gi in set(hits):
            extra = [
                s.tensor
                for s in groups[gi].slots
                if s.tensor not in expected and not _shared_within_heads(module, name, s, hd)
            ]
            if extra:
                raise FusionError(
                    f"attention {name!r}: its q/k/v channels are coupled to {extra[0]!r}; not supported"
                )
        dim = heads * hd
        slots = []
        for attr, n in producers:
            if orders.get((name, attr)) == "head-first":
                # [heads, n * head_dim, 1]: one run of rows per head, which assembly writes head after head
                pos = (torch.arange(heads)[:, None] * n * hd + torch.arange(n * hd))[:, :, None]
            else:
                h, j, r = torch.meshgrid(
                    torch.arange(heads), torch.arange(hd), torch.arange(n), indexing="ij"
                )
                pos = r * dim + h * hd + j  # [heads, head_dim, n]: the rows of one head in each of q, k, v
            layer = getattr(module, attr)
            kind = "linear" if isinstance(layer, nn.Linear) else "conv"
            slots.append(Slot(f"{name}.{attr}.weight", 0, OUT, kind, True, f"{name}.{attr}", pos))
            if layer.bias is not None:
                slots.append(Slot(f"{name}.{attr}.bias", 0, OUT, kind, False, f"{name}.{attr}", pos))
        h, j = torch.meshgrid(torch.arange(heads), torch.arange(hd), indexing="ij")
        kind = "linear" if isinstance(module.proj, nn.Linear) else "conv"
        cols = (
            (j * heads + h)[:, None, :]
            if orders.get((name, "proj")) == "head-last"
            else (h * hd + j)[:, :, None]
        )
        slots.append(Slot(proj_w, 1, IN, kind, True, f"{name}.proj", cols))
        for tensor, d in per_head:
            slots.append(Slot(tensor, d, OUT, "param", False, name, torch.arange(heads)[:, None, None]))
        for tensor, layer in split_biases.items():
            slots.append(Slot(tensor, 0, OUT, "linear", False, layer, (h * hd + j)[:, :, None]))
        for tensor, (layer, n) in blocks.items():
            kind = "linear" if isinstance(module.get_submodule(layer[len(name) + 1 :]), nn.Linear) else "conv"
            pos = torch.arange(heads * n).reshape(heads, n, 1)
            slots.append(Slot(tensor, 0, OUT, kind, tensor.endswith("weight"), layer, pos))
        groups = [g for gi, g in enumerate(groups) if gi not in set(hits)]
        groups.append(ChannelGroup(f"{name}.{producers[0][0]}", heads, slots, unit_kind="head"))
    return groups


def _shared_head_tables(
    skeleton: nn.Module, groups: list[ChannelGroup]
) -> tuple[list[ChannelGroup], set[str]]:
    """Attentions whose heads meet in a per-head tensor outside all of them (one relative-position MLP shared by
    every block, its last layer making one bias per head: head h of every block reads row h), so that head h of
    each moves with head h of the others: one group of whole heads for all of them, the shared tensor's rows
    included. Returns the groups and the attentions handled here. Attentions with different head counts, or
    sharing a tensor that is not one row per head, are left to :func:`_attention_heads`, which refuses them."""
    where: dict = {}  # (tensor, dim) -> attention
    heads_of: dict = {}
    for name, module in skeleton.named_modules():
        layout = attention_layout(module)
        if layout is None:
            continue
        heads, _, producers = layout
        heads_of[name] = heads
        mine = [(f"{name}.{attr}.{t}", 0) for attr, _ in producers for t in ("weight", "bias")]
        mine += [(f"{name}.proj.weight", 1)] + _per_head_params(module, name, heads, producers)
        where.update({key: name for key in mine})
    parent = {n: n for n in heads_of}

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    hits: dict = {}  # group index -> attentions it reaches
    for gi, g in enumerate(groups):
        reached = {where[(s.tensor, s.dim)] for s in g.slots if (s.tensor, s.dim) in where}
        if reached:
            hits[gi] = reached
            first, *rest = sorted(reached)
            for other in rest:
                parent[find(other)] = find(first)
    components: dict = {}
    for n in heads_of:
        components.setdefault(find(n), []).append(n)
    shapes = {n: tuple(t.shape) for n, t in full_state(skeleton).items()}
    modules = dict(skeleton.named_modules())
    handled: set[str] = set()
    for names in components.values():
        heads = {heads_of[n] for n in names}
        if len(names) < 2 or len(heads) != 1:
            continue
        heads = heads.pop()
        gis = sorted(gi for gi, reached in hits.items() if reached & set(names))
        own = {t for t, _ in where if t.startswith(tuple(f"{n}." for n in names))}
        extras = [s for gi in gis for s in groups[gi].slots if s.tensor not in own]
        if any(s.tensor.startswith(tuple(f"{n}." for n in names)) for s in extras) or any(
            shapes.get(s.tensor, ())[s.dim : s.dim + 1] != (heads,) for s in extras
        ):
            continue  # something else reached: _attention_heads names it
        slots = []
        for (
            n
        ) in names:  # each attention's own head slots, as _attention_heads makes them (names made absolute)
            (own_group,) = _attention_heads(modules[n], [])
            slots += [dataclasses.replace(s, tensor=n + s.tensor, layer=n + s.layer) for s in own_group.slots]
        seen = set()
        for s in extras:
            if (s.tensor, s.dim) not in seen:
                seen.add((s.tensor, s.dim))
                slots.append(dataclasses.replace(s, positions=torch.arange(heads)[:, None, None]))
        groups = [g for gi, g in enumerate(groups) if gi not in set(gis)]
        groups.append(ChannelGroup(f"{names[0]}.heads", heads, slots, unit_kind="head"))
        handled |= set(names)
        hits = {}  # indices moved: recompute for the next component
        for gi, g in enumerate(groups):
            reached = {where[(s.tensor, s.dim)] for s in g.slots if (s.tensor, s.dim) in where}
            if reached and g.unit_kind != "head":
                hits[gi] = reached
    return groups, handled


def _split_qkv_biases(module: nn.Module, name: str, dim: int) -> dict[str, str]:
    """The biases of q, k and v kept apart from a bias-free ``qkv`` Linear and added as ``cat(q_bias, k_bias,
    v_bias)`` (SwinV2, EVA; ``k_bias`` is a buffer of zeros): ``{tensor name: layer}``, each ``dim`` long and
    indexed like its part of the rows (head h, channel j at ``h * head_dim + j``)."""
    out = {}
    tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
    for part in ("q", "k", "v"):
        t = tensors.get(f"{part}_bias")
        if t is not None and t.dim() == 1 and t.shape[0] == dim:
            out[f"{name}.{part}_bias"] = name
    return out


def _shared_within_heads(module: nn.Module, name: str, slot: Slot, head_dim: int) -> bool:
    """A tensor of the attention itself whose traced dimension is one head wide: a layer applied to every head
    alike (MViTv2's pooling convolutions and LayerNorms over a head's channels, its decomposed relative
    positions ``[positions, head_dim]``). Heads move whole, each head's channels in order, so such a tensor
    stays where it is; it is left out of the head group (tensors in no group are averaged across members: shared
    by all heads, it cannot be kept per member, so the concatenation is not the ensemble, as with LayerNorm)."""
    if not slot.tensor.startswith(name + "."):
        return False
    local = slot.tensor[len(name) + 1 :]
    t = dict(module.named_parameters()).get(local)
    if t is None:
        t = dict(module.named_buffers()).get(local)
    return t is not None and t.dim() > slot.dim and t.shape[slot.dim] == head_dim


# ---------------------------------------------------------------------------- head-major attention
def head_major_layout(module: nn.Module) -> tuple[int, int, int, tuple[tuple[str, int], ...]] | None:
    """``(num_heads, key_dim, val_dim, producers)`` of an attention whose producers make their rows head by head,
    each head's parts together: one ``qkv`` Linear, ``qkv(x).view(B, N, num_heads, -1).split([key_dim, key_dim,
    val_dim])`` (TinyViT, LeViT and EfficientFormer keep ``key_dim`` and ``val_dim`` or ``attn_ratio``), a ``q``
    and such a ``kv`` (LeViT's subsampling attention), or ``q``, ``k`` and ``v`` of ``key_dim``, ``key_dim`` and
    ``val_dim`` rows per head (EfficientFormerV2); and a ``proj`` reading ``num_heads * val_dim`` channels. ``producers``: ``(attribute, rows per head)``. Head h is rows ``h * width + j`` of each producer
    and columns ``h * val_dim + j`` of proj, unlike :func:`attention_layout`'s q, k and v blocks (with
    ``attn_ratio`` 1 the sizes are the same, so the attributes decide). The layers may be wrapped with a
    per-channel norm (see :func:`_wrapped_pointwise`)."""
    heads, dims = getattr(module, "num_heads", None), _key_value_dims(module)
    proj = _wrapped_pointwise(module, "proj")
    if proj is None or dims is None or not (isinstance(heads, int) and heads > 0):
        return None
    kd, vd = dims
    for producers in (
        (("qkv", 2 * kd + vd),),
        (("q", kd), ("kv", kd + vd)),
        (("q", kd), ("k", kd), ("v", vd)),
    ):
        layers = [_wrapped_pointwise(module, attr) for attr, _ in producers]
        if (
            all(
                layer is not None and _pointwise(layer[1])[1] == heads * width
                for layer, (_, width) in zip(layers, producers)
            )
            and _pointwise(proj[1])[0] == heads * vd
        ):
            return heads, kd, vd, producers
    return None


def _wrapped_pointwise(module: nn.Module, attr: str) -> tuple[str, nn.Module] | None:
    """``(path, layer)``: attribute ``attr`` of ``module`` when it is a Linear or 1x1 convolution (see
    :func:`_pointwise`), or the one such layer inside it when everything else there keeps the channels apart
    (LeViT's ``LinearNorm``, a Linear and a BatchNorm over its outputs; its ``proj``, an activation and a
    ``LinearNorm``; EfficientFormerV2's ``ConvNorm``): per-channel norms and parameter-free modules. A query
    made by a last such layer after layers over the attention's input (EfficientFormerV2's ``LocalGlobalQuery``:
    a depthwise convolution and a pooling of the input, then ``proj``) is that last layer: its rows are the
    query's. ``path`` is relative to ``module``."""
    top = getattr(module, attr, None)
    if not isinstance(top, nn.Module):
        return None
    if _pointwise(top) is not None:
        return attr, top
    layers = [(n, m) for n, m in top.named_modules() if _is_layer(m)]
    if not layers or _pointwise(layers[-1][1]) is None:
        return None
    if len(layers) > 1 and not (attr == "q" and all(_is_depthwise(m) for _, m in layers[:-1])):
        return None
    inner = {m for _, layer in layers for m in layer.modules()}
    for m in top.modules():
        if (
            m not in inner
            and list(m.parameters(recurse=False))
            and not isinstance(m, nn.modules.batchnorm._BatchNorm)
        ):
            return None
    return f"{attr}.{layers[-1][0]}", layers[-1][1]


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.in_channels == m.out_channels > 1


def _key_value_dims(module: nn.Module) -> tuple[int, int] | None:
    """``(key_dim, val_dim)`` per head of an attention that keeps them (``val_dim``, or ``attn_ratio * key_dim``),
    else None."""
    kd, vd = getattr(module, "key_dim", None), getattr(module, "val_dim", None)
    if (
        not isinstance(vd, int)
        and isinstance(kd, int)
        and isinstance(getattr(module, "attn_ratio", None), (int, float))
    ):
        vd = int(module.attn_ratio * kd)
    if not all(isinstance(v, int) and v > 0 for v in (kd, vd)):
        return None
    return kd, vd


def _head_major_heads(skeleton: nn.Module, groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """Replace the groups on every head-major attention's qkv rows and proj columns (see :func:`head_major_layout`)
    by one group of whole heads, with the module's per-head parameters (TinyViT's ``attention_biases``
    ``[heads, offsets]``). A group that also reaches other tensors is refused by name."""
    for name, module in skeleton.named_modules():
        layout = head_major_layout(module)
        if layout is None:
            continue
        heads, _, vd, producers = layout
        per_head = _per_head_params(module, name, heads, producers)
        paths = {attr: _wrapped_pointwise(module, attr)[0] for attr, _ in producers}
        proj_path, proj = _wrapped_pointwise(module, "proj")
        rows = {attr: _row_tensors(module, name, attr, paths[attr]) for attr, _ in producers}
        for attr, subs in _depthwise_rows(module, producers).items():
            for sub in subs:
                rows[attr] |= _row_tensors(module, name, sub, _wrapped_depthwise(module, sub)[0])
        proj_w = f"{name}.{proj_path}.weight"
        mine = {(t, 0) for r in rows.values() for t in r} | {(proj_w, 1)} | set(per_head)
        hits = {gi for gi, g in enumerate(groups) for s in g.slots if (s.tensor, s.dim) in mine}
        for gi in hits:
            extra = [s.tensor for s in groups[gi].slots if s.tensor not in {t for t, _ in mine}]
            if extra:
                raise FusionError(
                    f"attention {name!r} (heads of q, k and v together): its q/k/v channels are coupled to "
                    f"{extra[0]!r}; not supported"
                )
        slots = [
            Slot(
                t,
                0,
                OUT,
                kind,
                t.endswith("weight"),
                layer,
                torch.arange(heads * width).reshape(heads, width, 1),
            )
            for attr, width in producers
            for t, (kind, layer) in sorted(rows[attr].items(), reverse=True)
        ]
        kind = "linear" if isinstance(proj, nn.Linear) else "conv"
        slots.append(
            Slot(
                proj_w,
                1,
                IN,
                kind,
                True,
                f"{name}.{proj_path}",
                torch.arange(heads * vd).reshape(heads, vd, 1),
            )
        )
        for tensor, d in per_head:
            slots.append(Slot(tensor, d, OUT, "param", False, name, torch.arange(heads)[:, None, None]))
        groups = [g for gi, g in enumerate(groups) if gi not in hits]
        groups.append(ChannelGroup(f"{name}.{paths[producers[0][0]]}", heads, slots, unit_kind="head"))
    return groups


def _head_major_row_layers(module: nn.Module, producers) -> dict[str, str]:
    """``{attribute: path of its layer}`` for the layers that make a head-major attention's rows: its producers
    (see :func:`_wrapped_pointwise`) and the depthwise convolutions over them (see :func:`_depthwise_rows`)."""
    out = {attr: _wrapped_pointwise(module, attr)[0] for attr, _ in producers}
    for subs in _depthwise_rows(module, producers).values():
        out |= {sub: _wrapped_depthwise(module, sub)[0] for sub in subs}
    return out


def _wrapped_depthwise(module: nn.Module, attr: str) -> tuple[str, nn.Module] | None:
    """``(path, conv)``: attribute ``attr`` of ``module`` when it is a depthwise convolution, or the one
    convolution inside it when it is depthwise and the rest are per-channel norms (EfficientFormerV2's
    ``ConvNorm``)."""
    top = getattr(module, attr, None)
    if not isinstance(top, nn.Module):
        return None
    layers = [(n, m) for n, m in top.named_modules() if _is_layer(m)]
    others = [
        m
        for m in top.modules()
        if list(m.parameters(recurse=False))
        and not _is_layer(m)
        and not isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if len(layers) != 1 or others:
        return None
    path, conv = layers[0]
    if not _is_depthwise(conv):
        return None
    return (f"{attr}.{path}" if path else attr), conv


def _depthwise_rows(module: nn.Module, producers) -> dict[str, list[str]]:
    """``{producer: [attributes]}``: depthwise convolutions of an attention over one producer's rows
    (EfficientFormerV2's ``v_local``, a depthwise convolution of v added to the heads' output), found by their
    width: a width two producers share, or no producer has, is left to the self-check. Their channels are the
    producer's rows, so they move with them."""
    widths = {attr: _pointwise(_wrapped_pointwise(module, attr)[1])[1] for attr, _ in producers}
    out: dict = {}
    for attr, _ in module.named_children():
        conv = _wrapped_depthwise(module, attr)
        if attr in widths or attr == "proj" or conv is None:
            continue
        owners = [p for p, w in widths.items() if w == conv[1].out_channels]
        if len(owners) == 1:
            out.setdefault(owners[0], []).append(attr)
    return out


def _row_tensors(module: nn.Module, name: str, attr: str, path: str) -> dict[str, tuple[str, str]]:
    """``{tensor: (kind, layer)}``: the output rows of the layer at ``path`` inside ``module`` (named ``name``) and
    those of a per-channel norm over its outputs inside the same attribute ``attr`` (see
    :func:`_wrapped_pointwise`), all indexed like the layer's rows."""
    rows = {}
    for sub, m in getattr(module, attr).named_modules(prefix=f"{name}.{attr}"):
        if sub == f"{name}.{path}" or isinstance(m, nn.modules.batchnorm._BatchNorm):
            kind = (
                "bn"
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
                else ("linear" if isinstance(m, nn.Linear) else "conv")
            )
            tensors = dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))
            rows |= {
                f"{sub}.{t}": (kind, sub)
                for t, v in tensors.items()
                if v is not None and v.dim() >= 1 and t != "num_batches_tracked"
            }
    return rows


def output_heads_layout(module: nn.Module) -> tuple[int, int, dict[str, torch.Tensor]] | None:
    """``(num_heads, dim_head_v, rows)`` of an attention with no ``proj`` whose output is its heads' values, head by
    head (channel ``h * dim_head_v + j``), read by the layers after it: timm's ``BottleneckAttn`` (BoTNet: one
    1x1-conv ``qkv`` making blocks of q, k and v, each head by head) and ``HaloAttn`` (a ``q``, and a ``kv``
    making each head's k and v together), which keep ``dim_head_qk`` and ``dim_head_v``. ``rows``: per producer,
    the rows of each head, ``[heads, width, repeats]`` (-1 pads), repeats in the layer's order (q, k, v blocks),
    so that assembly keeps it."""
    heads, dqk, dv = (getattr(module, a, None) for a in ("num_heads", "dim_head_qk", "dim_head_v"))
    if not all(isinstance(v, int) and v > 0 for v in (heads, dqk, dv)) or hasattr(module, "proj"):
        return None
    qkv, q, kv = (_pointwise(getattr(module, a, None)) for a in ("qkv", "q", "kv"))
    if qkv is not None and qkv[1] == heads * (2 * dqk + dv):
        h, j = torch.arange(heads)[:, None], torch.arange(max(dqk, dv))[None, :]
        blocks = [(0, dqk), (heads * dqk, dqk), (2 * heads * dqk, dv)]
        rows = torch.stack([torch.where(j < w, start + h * w + j, -1) for start, w in blocks], -1)
        return heads, dv, {"qkv": rows}
    if q is not None and kv is not None and q[1] == heads * dqk and kv[1] == heads * (dqk + dv):
        return (
            heads,
            dv,
            {
                "q": torch.arange(heads * dqk).reshape(heads, dqk, 1),
                "kv": torch.arange(heads * (dqk + dv)).reshape(heads, dqk + dv, 1),
            },
        )
    return None


def _cut_output_heads(dg, skeleton: nn.Module, outputs: dict) -> None:
    """Cut torch-pruning's graph around every attention :func:`output_heads_layout` recognises: after its
    producers and before its output (``outputs``: the grad_fn of each one's output, recorded while the graph was
    built). Inside, channels are reshaped into heads next to the spatial positions (see
    :func:`_cut_attention_internals`); what couples them is the layout, and the channels of the output are
    walked from the output on (:func:`_output_slots`). The graph node of each output is kept on the graph as
    ``dg.fusion_attention_outputs``."""
    found = {}
    modules = dict(skeleton.named_modules())
    by_grad_fn = {id(node.grad_fn): node for node in dg.module2node.values() if node.grad_fn is not None}
    for name, grad_fn in outputs.items():
        node = by_grad_fn.get(id(grad_fn)) if grad_fn is not None else None
        if node is None:
            raise FusionError(
                f"attention {name!r}: its output is not in torch-pruning's graph; fusion refused"
            )
        for attr in output_heads_layout(modules[name])[2]:
            producer = dg.module2node.get(getattr(modules[name], attr))
            if producer is not None:
                _cut_edges(producer, producer.outputs)
        _cut_edges(node, node.inputs)
        found[name] = node
    dg.fusion_attention_outputs = found


def _output_heads(skeleton: nn.Module, groups: list[ChannelGroup], outputs: dict) -> list[ChannelGroup]:
    """One group of whole heads per attention :func:`output_heads_layout` recognises: its producers' rows of each
    head and the tensors its output channels reach (``outputs``, see :func:`_output_slots`), channel
    ``h * dim_head_v + j`` being head h's. The groups the cut walks left on the producers' rows or on those
    tensors are replaced; one that also holds other tensors is refused by name. Such attentions have no
    per-head parameters: their relative-position tables ``[positions, dim_head_qk]`` are read by every head
    (with 8 heads of 8 channels a size says nothing), so they stay out of the group and are averaged across
    members; a per-head tensor would be left unpermuted, which the self-check refuses."""
    for name, module in skeleton.named_modules():
        layout = output_heads_layout(module)
        if layout is None:
            continue
        heads, dv, rows = layout
        slots = []
        for attr, pos in rows.items():
            layer = getattr(module, attr)
            kind = "linear" if isinstance(layer, nn.Linear) else "conv"
            for t in ("weight", "bias"):
                if getattr(layer, t, None) is not None:
                    slots.append(
                        Slot(f"{name}.{attr}.{t}", 0, OUT, kind, t == "weight", f"{name}.{attr}", pos)
                    )
        for spec, layer, by_root in outputs.get(name, []):
            slots.append(slot_of(spec, layer, by_root.reshape(heads, dv, -1)))
        mine = {(sl.tensor, sl.dim) for sl in slots}
        hits = {gi for gi, g in enumerate(groups) for sl in g.slots if (sl.tensor, sl.dim) in mine}
        for gi in hits:
            extra = [sl.tensor for sl in groups[gi].slots if (sl.tensor, sl.dim) not in mine]
            if extra:
                raise FusionError(
                    f"attention {name!r} (its output is its heads' values): its channels are coupled to "
                    f"{extra[0]!r}; not supported"
                )
        groups = [g for gi, g in enumerate(groups) if gi not in hits]
        groups.append(ChannelGroup(f"{name}.{next(iter(rows))}", heads, slots, unit_kind="head"))
    return groups


# ---------------------------------------------------------------------------- queries from outside the attention
def outside_query_layout(module: nn.Module) -> tuple[int, int] | None:
    """``(num_heads, head_dim)`` of an attention whose ``qkv`` Linear makes only keys and values (``2 * num_heads *
    head_dim`` rows: k, then v, each head by head) and whose ``proj`` reads ``num_heads * head_dim`` channels: its
    queries come from outside it (GCViT's ``WindowAttentionGlobal``: the stage's global query, made from the
    stage's input by convolutions with a shortcut, read by every other block), channel ``h * head_dim + j`` of
    that tensor being channel j of head h. Else None."""
    heads, hd = _head_count(module), getattr(module, "head_dim", None)
    qkv, proj = _pointwise(getattr(module, "qkv", None)), _pointwise(getattr(module, "proj", None))
    if (
        not (isinstance(heads, int) and isinstance(hd, int) and heads > 0 and hd > 0)
        or qkv is None
        or proj is None
    ):
        return None
    if attention_layout(module) is not None or not qkv[1] == 2 * heads * hd == 2 * proj[0]:
        return None
    return heads, hd


def _outside_query_heads(skeleton: nn.Module, groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """Trace attentions whose queries come from outside them (see :func:`outside_query_layout`) as heads of the
    channel group that carries those queries: the walk reaches their keys from the queries (``q @ k``), so that
    group holds their qkv rows. Its units become whole heads, channel ``h * head_dim + j`` of its root being
    channel j of head h (every layer of that group, a whole stage's residual stream in GCViT, then moves head by
    head); each attention's k and v rows, ``proj``'s columns and per-head parameters move with its heads. Groups
    that hold only those tensors are replaced; anything else is left to the coverage check and the self-check."""
    found: dict = {}  # group index -> [(attention name, module, heads, head_dim)]
    for name, module in skeleton.named_modules():
        layout = outside_query_layout(module)
        if layout is None:
            continue
        gis = [
            gi
            for gi, g in enumerate(groups)
            for s in g.slots
            if (s.tensor, s.dim) == (f"{name}.qkv.weight", 0)
        ]
        if len(set(gis)) == 1:
            found.setdefault(gis[0], []).append((name, module, *layout))
    drop = set()
    for gi, attentions in found.items():
        g = groups[gi]
        heads = {h for _, _, h, _ in attentions}
        hds = {hd for _, _, _, hd in attentions}
        if len(heads) != 1 or len(hds) != 1:
            continue
        heads, hd = heads.pop(), hds.pop()
        own = {}  # (tensor, dim) -> slot, laid out by the attentions
        for name, module, _, _ in attentions:
            h, j, r = torch.meshgrid(torch.arange(heads), torch.arange(hd), torch.arange(2), indexing="ij")
            rows = r * heads * hd + h * hd + j
            for t in ("weight", "bias"):
                if getattr(module.qkv, t, None) is not None:
                    own[(f"{name}.qkv.{t}", 0)] = Slot(
                        f"{name}.qkv.{t}", 0, OUT, "linear", t == "weight", f"{name}.qkv", rows
                    )
            cols = torch.arange(heads * hd).reshape(heads, hd, 1)
            own[(f"{name}.proj.weight", 1)] = Slot(
                f"{name}.proj.weight", 1, IN, "linear", True, f"{name}.proj", cols
            )
            for tensor, d in _per_head_params(module, name, heads, (("qkv", 2),)):
                own[(tensor, d)] = Slot(
                    tensor, d, OUT, "param", False, name, torch.arange(heads)[:, None, None]
                )
        others = [s for s in g.slots if (s.tensor, s.dim) not in own]
        if g.n_units != heads * hd or any(s.positions.shape[1] != 1 for s in others):
            continue
        slots = [slot_of(s, s.layer, s.positions.reshape(heads, hd, -1)) for s in others] + list(own.values())
        groups[gi] = ChannelGroup(g.name, heads, slots, unit_kind="head")
        drop |= {
            other
            for other, og in enumerate(groups)
            if other != gi and og.slots and all((s.tensor, s.dim) in own for s in og.slots)
        }
    return [g for gi, g in enumerate(groups) if gi not in drop]
