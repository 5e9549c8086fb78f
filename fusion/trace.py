"""Tracing coupled channel groups with torch-pruning's dependency graph, never per architecture.

The model is traced on a *meta-device copy* (no memory, members untouched, works under ``torch.no_grad``).
Every group item is turned into tensor slots by :mod:`fusion.layers`; grouped convolutions merge their
input and output groups into units of whole blocks. The result is then checked, because a tracer that
missed a coupling would otherwise give a silently wrong model:

1. every tensor dimension that any group touches is covered exactly once by the groups;
2. permuting every group at random leaves the model's outputs unchanged (:mod:`fusion.verify`).

Attention is recognised by its layout (q/k/v producers, head orders, per-head tables) further below; the
model's state, skeleton and calls are in :mod:`fusion.state`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch_pruning as tp

from . import trace_cache
from .attention import (
    _attention_heads,
    _attention_orders,
    _cut_attention_internals,
    _cut_edges,
    _cut_output_heads,
    _head_major_heads,
    _head_major_row_layers,
    _output_heads,
    _outside_queries_reason,
    _outside_query_heads,
    _shared_attention_layer_reason,
    _unknown_attention_reason,
    attention_layout,
    head_major_layout,
    output_heads_layout,
)
from .axes import channel_fastest_merges, functional_linears_as_modules, label_axes, out_shape
from .errors import FusionError
from .groups import ChannelGraph, ChannelGroup, serial, slot_of
from .layers import (
    IN,
    OUT,
    ROOT_TYPES,
    GroupedConvLink,
    bilinear_transforms_as_blocks,
    customized_pruners,
    item_slots,
    recurrent_as_one_operation,
    recurrent_refusal,
    transform_operands,
)
from .state import (
    full_state,
    infer_example_inputs,
    map_inputs,
    meta_copy,
)
from .verify import verify_permutation_invariance

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 16


# ---------------------------------------------------------------------------- helpers
def find_output_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose outputs are the model's outputs (their output channels are never fused)."""
    names = {m: n for n, m in model.named_modules()}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            clf = get()
        except Exception:  # noqa: BLE001 - a model may define get_classifier differently
            clf = None
        mods = clf if isinstance(clf, (tuple, list)) else [clf]
        found = []
        for m in mods:
            if not isinstance(m, nn.Module) or m not in names or not list(m.parameters()):
                continue
            if not isinstance(m, ROOT_TYPES):
                # a classifier made of layers (MetaFormer's Mlp head: fc1, norm, fc2): its last layer makes the
                # outputs, the others are hidden layers like any other
                inner = [sub for sub in m.modules() if isinstance(sub, ROOT_TYPES)]
                if inner:
                    m = inner[-1]
            found.append(names[m])
        if found:
            return found
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, ROOT_TYPES):
            last = name
    if last is None:
        raise FusionError(f"{type(model).__name__} has no Linear or Conv layer: nothing to fuse")
    return [last]


def _fingerprint(model: nn.Module, inputs, output_layers) -> tuple:
    """What a trace depends on: every module's name, type and settings (parameter-free ones included, since
    they can move channels), every tensor's name, shape and dtype, and the inputs' shapes."""
    modules = tuple(
        (n, type(m).__module__, type(m).__qualname__, m.extra_repr(), _scalar_settings(m))
        for n, m in model.named_modules()
    )
    shapes = tuple((n, tuple(t.shape), str(t.dtype)) for n, t in full_state(model).items())
    ins = []
    map_inputs(inputs, lambda t: ins.append((tuple(t.shape), str(t.dtype))))
    return (
        type(model).__module__,
        type(model).__qualname__,
        modules,
        shapes,
        tuple(ins),
        tuple(output_layers or ()),
    )


def _scalar_settings(module: nn.Module) -> tuple:
    """A module's own plain settings (ints, floats, bools, strings and tuples of them) that ``extra_repr``
    may not show but its forward reads: MaxViT's ``head_first`` decides how its qkv rows form heads, so two
    models alike in every shape can need different traces. The training flag is left out (tracing runs in
    eval mode)."""

    def plain(v) -> bool:
        if isinstance(v, tuple):
            return all(plain(x) for x in v)
        return isinstance(v, (bool, int, float, str, type(None)))

    return tuple(
        sorted(
            (k, v) for k, v in vars(module).items() if not k.startswith("_") and k != "training" and plain(v)
        )
    )


# ---------------------------------------------------------------------------- tracing
def channel_groups(
    model: nn.Module, example_inputs=None, *, output_layers: Iterable[str] | None = None, verify: bool = True
) -> ChannelGraph:
    """Trace the coupled channel groups of ``model`` (see the module docstring). Results are cached per
    architecture, so tracing and verification are paid once per architecture and input shape."""
    if not isinstance(model, nn.Module):
        raise FusionError(f"expected an nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        example_inputs = infer_example_inputs(model)
    output_layers = list(output_layers) if output_layers is not None else None
    key = _fingerprint(model, example_inputs, output_layers)
    graph = _CACHE.get(key)
    if graph is None or (verify and not getattr(graph, "_verified", False)):
        stored = trace_cache.key(model, key)
        graph = trace_cache.load(stored)  # verified in an earlier process
        if graph is None:
            with serial():  # small index tensors only: thread barriers would cost more than the work
                graph = _trace(model, example_inputs, output_layers)
            if verify:
                verify_permutation_invariance(model, graph, example_inputs)
                graph._verified = True
                trace_cache.store(stored, graph)
        _CACHE[key] = graph
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return graph


def _update_index_mappings(dg) -> None:
    """torch-pruning's ``update_index_mapping``, one node at a time: where its guess of a node's channel
    counts fails (``None`` channels summed for a concatenation fed by a chunk of a token tensor, a division by
    a channel count of 0 for a reshape), that node keeps no mapping instead of the whole graph being lost.
    Splits, concatenations and slices are re-derived exactly afterwards (:func:`_remap_split_concat_slice`);
    any other node left unmapped is judged by the coverage check and the permutation self-check."""
    from torch_pruning.dependency import index_mapping as im

    updates = {
        tp.ops.OPTYPE.CONCAT: im.update_concat_index_mapping,
        tp.ops.OPTYPE.SPLIT: im.update_split_index_mapping,
        tp.ops.OPTYPE.RESHAPE: im.update_reshape_index_mapping,
        tp.ops.OPTYPE.UNBIND: im.update_unbind_index_mapping,
        tp.ops.OPTYPE.EXPAND: _update_expand_index_mapping,
        tp.ops.OPTYPE.SLICE: im.update_slice_index_mapping,
    }
    for node in list(dg.module2node.values()):
        update = updates.get(node.type)
        if update is None:
            continue
        try:
            update(dg, node)
        except (TypeError, ZeroDivisionError, ValueError, IndexError):
            for dep in node.dependencies:
                dep.index_mapping = [None, None]
            for other in node.inputs + node.outputs:
                for dep in other.dependencies:
                    if dep.target is node:
                        dep.index_mapping = [None, None]


def _update_expand_index_mapping(dg, node) -> None:
    """torch-pruning's mapping of an ``expand``, only where it applies. The library maps every expand of a 5-D
    tensor as a grouped-query repeat of key/value heads, ``(B, kv_heads, 1 -> n_rep, N, head_dim)``, with a
    repeat of ``out_channels // in_channels``; on any other 5-D expand (``repeat_interleave`` along the batch,
    GCViT's global query: ``(B, 1 -> r, heads, N, head_dim)``) that guess is meaningless, a repeat of 0 that
    divided by zero inside the walk. An expand that does not grow axis 2 keeps the channels where they are
    (as torch-pruning treats expands of other ranks); a grouped-query expand with no valid repeat keeps no mapping
    (see :func:`_update_index_mappings`: the coverage check and the self-check judge it)."""
    from torch_pruning.dependency import index_mapping as im

    gf = node.grad_fn
    ins = tuple(int(s) for s in getattr(gf, "_saved_self_sym_sizes", ()) or ())
    out = out_shape(gf, 0)
    if len(ins) != 5 or out is None or len(out) != 5:
        im.update_expand_index_mapping(dg, node)
        return
    grown = [d for d in range(5) if ins[d] != int(out[d])]
    if grown != [2]:
        return  # not a repeat of heads: channels stay where they are
    im.update_expand_index_mapping(dg, node)
    for other in [node] + node.inputs:
        for dep in other.dependencies:
            for m in dep.index_mapping:
                if isinstance(m, im._GQAIndexMapping) and (m.repeat < 1 or m.head_dim < 1):
                    raise ValueError(f"an expand of {ins} to {tuple(out)} has no valid repeat of heads")


@contextlib.contextmanager
def _tolerant_index_mapping():
    """Inside ``build_dependency``, torch-pruning's index-mapping pass runs node by node (see
    :func:`_update_index_mappings`); the library's function is restored afterwards."""
    from torch_pruning.dependency import index_mapping as im

    original = im.update_index_mapping
    im.update_index_mapping = _update_index_mappings
    try:
        yield
    finally:
        im.update_index_mapping = original


def _build_dependency_graph(skeleton: nn.Module, meta_inputs):
    outputs: dict = {}  # output-heads attention -> the grad_fn of its output (see _cut_output_heads)
    hooks = [
        m.register_forward_hook(
            lambda _m, _i, out, n=n: outputs.__setitem__(n, getattr(out, "grad_fn", None))
        )
        for n, m in skeleton.named_modules()
        if output_heads_layout(m) is not None
    ]
    with (
        torch.enable_grad(),
        warnings.catch_warnings(),
        _tolerant_index_mapping(),
        functional_linears_as_modules(skeleton),
        recurrent_as_one_operation(skeleton),
    ):
        warnings.simplefilter("ignore")
        try:
            dg = tp.DependencyGraph().build_dependency(
                skeleton,
                example_inputs=meta_inputs,
                verbose=False,
                customized_pruners=customized_pruners(skeleton),
            )
        except FusionError:
            raise
        except Exception as exc:  # noqa: BLE001 - turn tracer failures into a clear refusal
            raise FusionError(
                f"cannot trace {type(skeleton).__name__} with torch-pruning: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            for h in hooks:
                h.remove()
    _channel_axis_of_feature_maps(dg)
    _cut_output_heads(dg, skeleton, outputs)
    for node, operands in transform_operands(dg):
        _cut_edges(node, operands)
    return dg


def _channel_axis_of_feature_maps(dg) -> None:
    """A parameter outside any layer shaped like a feature map, (1, C, H, W) (PiT's and other convolutional
    position embeddings, added to an NCHW feature map), holds channels along dim 1; torch-pruning takes the
    last dimension of size > 1 for every such parameter, the map's width, which no channel group can claim."""
    for node in dg.module2node.values():
        p = node.module
        if isinstance(p, nn.Parameter) and p.dim() == 4 and p.shape[0] == 1 and p.shape[1] > 1:
            if not _channels_last_parameter(dg, node):
                node.pruning_dim = 1


def _channels_last_parameter(dg, node) -> bool:
    """Whether a parameter (1, A, B, C) is met by a feature tensor whose channels are its last axis (NesT's
    position embedding (1, blocks, positions, C), added to the tokens of its image blocks): the nearest layer
    around the operation that reads it has C channels and not A. Unknown or ambiguous: False."""
    p = node.module
    seen, frontier = {id(node)}, list(node.outputs)
    for _ in range(8):  # a few parameter-free operations away (the blockify reshapes of NesT)
        nxt = []
        for other in frontier:
            if id(other) in seen:
                continue
            seen.add(id(other))
            if isinstance(other.module, nn.Module) and not isinstance(other.module, nn.Parameter):
                pruner = dg.get_pruner_of_module(other.module)
                channels = pruner.get_out_channels(other.module) if pruner is not None else None
                if isinstance(channels, int) and channels > 1:
                    return channels == p.shape[-1] != p.shape[1]
            nxt += other.inputs + other.outputs
        frontier = nxt
    return False


def _trace(model: nn.Module, example_inputs, output_layers: list[str] | None) -> ChannelGraph:
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            raise FusionError(
                f"cannot fuse module {name!r} ({type(mod).__name__}): nn.MultiheadAttention is not supported"
            )
        reason = recurrent_refusal(name, mod) if isinstance(mod, nn.RNNBase) else None
        if reason:
            raise FusionError(reason)
    skeleton = meta_copy(model).eval()
    bilinear_transforms_as_blocks(skeleton)
    meta_inputs = map_inputs(example_inputs, lambda t: torch.empty_like(t, device="meta"))
    if output_layers is None:
        output_layers = find_output_layers(skeleton)
    modules = dict(skeleton.named_modules())
    for name in output_layers:
        if name not in modules:
            raise FusionError(f"output layer {name!r} is not a module of {type(model).__name__}")
    ignored = [modules[n] for n in output_layers]
    dg = _build_dependency_graph(skeleton, meta_inputs)
    head_orders = _attention_orders(dg, skeleton)
    try:
        try:
            tp_groups = list(_all_groups(dg, ignored, ROOT_TYPES))
        except _ExplodedGroup:
            # channels mapped onto spatial positions inside an attention: walk again with the graph cut there
            dg = _build_dependency_graph(skeleton, meta_inputs)
            _cut_attention_internals(dg, skeleton)
            tp_groups = list(_all_groups(dg, ignored, ROOT_TYPES))
    except FusionError:
        raise
    except Exception as exc:  # noqa: BLE001 - a tracer failure is a refusal, not a crash
        raise FusionError(
            f"cannot trace the channel groups of {type(model).__name__}: {type(exc).__name__}: {exc}"
        ) from exc

    module_names = {m: n for n, m in skeleton.named_modules()}
    param_names = {p: n for n, p in skeleton.named_parameters()}

    # per tp group: (root name, n_root_channels, [(SlotSpec, layer, positions[C, r])], [(link, conv_pos[C, r])],
    # the part of each root channel (coupled parts, see _equal_parts) or None)
    raw = []
    attention = {
        f"{n}.{attr}"
        for n, mod in skeleton.named_modules()
        if (layout := attention_layout(mod)) is not None
        for attr, _ in layout[2]
    } | {
        f"{n}.{path}"
        for n, mod in skeleton.named_modules()
        if (major := head_major_layout(mod)) is not None
        for path in _head_major_row_layers(mod, major[3]).values()
    }
    paired = []  # groups whose root channels meet across equal parts (gated MLPs, split attention): coupled units
    pinned = []  # channels mixed with each other in any other pattern: (description, their tensor dims)
    for n_root, items, mixed in tp_groups:
        root_name = module_names.get(items[0].dep.target.module, "?")
        # attention: q and k meet per head, handled by _attention_heads
        meetings = _meetings(mixed, module_names) if mixed and root_name not in attention else None
        roots = _equal_parts(n_root, meetings[0]) if meetings is not None else None
        slots, links, spans = _item_slots(
            items, n_root, module_names, param_names, coupled=meetings is not None
        )
        if meetings is not None and roots is None:
            pinned.append(
                (
                    f"the {n_root} channels of the group rooted at {root_name!r} are mixed with each other at "
                    f"{meetings[1]!r} (an operation across the channel axis, e.g. ECA's 1-D convolution over channels)",
                    {(spec.tensor, spec.dim) for spec, _, _ in slots},
                )
            )
        elif meetings is not None and links:
            # split attention: the coupled parts are blocks of a grouped convolution, units are made with its blocks
            raw.append((root_name, n_root, slots, links, torch.arange(n_root) // roots.shape[0]))
        elif meetings is not None:
            paired.append(_coupled_units(root_name, roots, slots))
        elif slots or links:
            # roots reaching different parts of one layer's channels are not interchangeable either
            reach = torch.cat([_reach(items, n_root)] + [s[:, None] for s in spans], 1)
            raw.extend(_split_by_reach((root_name, n_root, slots, links, None), reach))
    raw, paired, pinned, pinned_dims = _pin_joined(raw, paired, pinned)
    # products over channels outside the attentions recognised by layout (whose heads keep members apart) and
    # outside pinned channels (averaged, so one member's worth)
    pinned_layers = {tensor.rsplit(".", 1)[0] for tensor, d in pinned_dims if d == 0}
    contracted = _contracted_layers(
        getattr(dg, "fusion_contractions", []), module_names, attention, pinned_layers
    )

    groups = _head_major_heads(skeleton, _attention_heads(skeleton, _merge_units(raw) + paired, head_orders))
    groups = _output_heads(skeleton, groups, _output_slots(dg, skeleton, module_names, param_names))
    groups = _outside_query_heads(skeleton, groups)
    shapes = {n: tuple(t.shape) for n, t in full_state(skeleton).items()}
    graph = ChannelGraph(groups=groups, output_layers=list(output_layers), shapes=shapes, pinned=pinned)
    graph.contracted_channels = contracted
    try:
        _check_coverage(graph)
    except FusionError as exc:
        raise FusionError(_outside_queries_reason(skeleton, graph, exc) or str(exc)) from None
    interleaved = _interleaved_dims(graph)
    if interleaved:
        groups = _one_slot_per_segment(groups, interleaved)
        graph = ChannelGraph(groups=groups, output_layers=list(output_layers), shapes=shapes, pinned=pinned)
        graph.contracted_channels = contracted
        interleaved = _interleaved_dims(graph)
        if interleaved:
            tensor, d = sorted(interleaved)[0]
            layers = sorted({graph._slot(r).layer for r in graph.tensor_dims[tensor][d]})
            raise FusionError(
                f"the channel groups on {tensor!r} (dimension {d}, layers {layers}) interleave: a group's "
                "channels are not one run of positions between the others', which assembly cannot rebuild; "
                "fusion refused"
            )
    return graph


def _item_slots(
    items, n_root: int, module_names: dict, param_names: dict, coupled: bool = False
) -> tuple[list, list, list]:
    """The tensor slots ``(SlotSpec, layer, positions[n_root, r])``, grouped-convolution links ``(link,
    positions[n_root, r])`` and spans (per slot that holds a part of its layer's channels, e.g. one direction of
    a recurrent layer: how many positions each root reaches) of a walk's items (see
    :func:`fusion.layers.item_slots`); operation nodes of the tracer hold no tensor. A grouped convolution is
    reached once per root, except by ``coupled`` roots (split attention's parts are its blocks)."""
    slots, links, spans = [], [], []
    for item in items:
        target = item.dep.target
        mod = target.module
        name = param_names.get(mod) if isinstance(mod, nn.Parameter) else module_names.get(mod)
        if name is None:
            continue  # an operation node of the tracer, not a model tensor
        specs, link = item_slots(mod, name, item.dep.handler, getattr(target, "pruning_dim", -1))
        if not specs and link is None:
            continue
        by_root = _positions_by_root(item.idxs, item.root_idxs, n_root, name)
        for spec in specs:
            slots.append((spec, name, spec.positions(by_root)))
            if spec.count:  # a part of the layer's channels (one direction of a recurrent layer)
                spans.append((slots[-1][2] >= 0).sum(1))
        if link is not None:
            if by_root.shape[1] != 1 and not coupled:
                raise FusionError(f"grouped convolution {name!r} is reached twice by one channel group")
            links.append((link, by_root))
    return slots, links, spans


def _pin_joined(raw, paired, pinned):
    """Pinned channels keep their place in every tensor dimension they occupy, so a group that shares such a
    dimension (another root reached them again, e.g. ECA's one-channel convolution walked back to the
    channels it gates) cannot move either: it is pinned too, until no group shares a pinned dimension.
    Returns the remaining raw and coupled groups, the pinned descriptions and the pinned tensor dimensions."""
    dims = set().union(*(d for _, d in pinned)) if pinned else set()
    notes = [text for text, _ in pinned]
    changed = bool(dims)
    while changed:
        changed = False
        for kept in (raw, paired):
            for g in list(kept):
                if isinstance(g, ChannelGroup):
                    name, g_dims = g.name, {(s.tensor, s.dim) for s in g.slots}
                else:
                    name, g_dims = g[0], {(spec.tensor, spec.dim) for spec, _, _ in g[2]}
                shared = sorted(g_dims & dims)
                if shared:
                    kept.remove(g)
                    dims |= g_dims
                    tensor, d = shared[0]
                    notes.append(
                        f"the group rooted at {name!r} shares pinned channels ({tensor!r}, dimension {d})"
                    )
                    changed = True
    return raw, paired, notes, dims


def _meetings(mixed, module_names: dict) -> tuple[list[tuple[int, int]], str]:
    """The pairs of root channels of one group that meet, and where they meet: a model layer when one is
    among the nodes, else the tracer's operation type."""
    named = [module_names[n.module] for n, _, _ in mixed if n.module in module_names]
    where = named[0] if named else type(mixed[0][0].module).__name__
    return [(int(a), int(b)) for _, a, b in mixed], where


def _equal_parts(n_root: int, pairs) -> torch.Tensor | None:
    """The units of a group whose root channels meet (connected components of ``pairs``) as ``roots[U, k]``,
    when the channel axis is k equal parts whose i-th channels meet, i.e. unit i is the roots
    ``i, i + U, ..., i + (k-1) U`` for U >= 2 units: a gated MLP (timm's GluMlp: fc1 -> chunk(2) -> a * b,
    unit i = rows (i, H + i)), a softmax over the k paths of selective-kernel / split attention (a view
    ``(B, k, C)``). None for any other pattern: channels mixed with each other (ECA's 1-D convolution across
    channels joins every channel into one unit), which no permutation may move."""
    parent = list(range(n_root))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    comps: dict[int, list[int]] = {}
    for r in range(n_root):
        comps.setdefault(find(r), []).append(r)
    units = sorted(comps.values())
    n_units, k = len(units), len(units[0])
    if n_units < 2 or n_root != k * n_units:  # components of unequal sizes are no such layout
        return None
    roots = torch.arange(n_root).reshape(k, n_units).T
    return roots if units == roots.tolist() else None


def _coupled_units(root_name: str, roots: torch.Tensor, slots) -> ChannelGroup:
    """One group whose units are root channels coupled across k equal parts (``roots[U, k]``, see
    :func:`_equal_parts`), each unit's channels in root order along the repeat axis of every slot. The repeat
    axis keeps that layout when units are selected: a new model's rows are the kept units' first parts, then
    their second parts..., so its chunk or view still pairs them. Every unit must also have the same shape in
    every tensor (be reached at the same repeats): otherwise the parts have fixed sizes (a split into unequal
    parts) that selecting units would break; refused by name."""
    n_units, k = roots.shape
    where = f"the channels of the group rooted at {root_name!r} are coupled across {k} equal parts"
    out = []
    for spec, name, by_root in slots:
        pos = by_root[roots]  # [n_units, k, R]
        pos = pos.reshape(n_units, 1, -1)
        valid = pos >= 0
        if not torch.equal(valid, valid[:1].expand_as(valid)):
            raise FusionError(
                f"{where}, but {name!r} is reached by some of the coupled units only (a split into parts of fixed "
                "sizes): selecting units would change those sizes; fusion refused"
            )
        out.append(slot_of(spec, name, pos))
    return ChannelGroup(root_name, n_units, out, unit_kind="coupled channels")


def _interleaved_dims(graph: ChannelGraph) -> set:
    """Tensor dimensions shared by several segments (slots, and repeats within a slot) that are not each one
    run of positions laid out in the order ``assemble`` writes them (slot by slot, sorted by first position;
    within a slot repeat by repeat): keeping every unit would not put each segment back where the model's
    concatenation puts it. The order of units inside a segment is free (a group moves as a whole)."""
    bad = set()
    for tensor, dims in graph.tensor_dims.items():
        for d, refs in dims.items():
            pieces = []
            for ref in refs:
                pos = graph._slot(ref).positions
                pieces += [pos[:, :, r] for r in range(pos.shape[2])]
            if len(pieces) < 2:
                continue
            start = 0
            for piece in pieces:
                piece = piece[piece >= 0]
                if piece.numel() == 0:
                    continue
                if int(piece.min()) != start or int(piece.max()) != start + piece.numel() - 1:
                    bad.add((tensor, d))
                    break
                start += piece.numel()
    return bad


def _one_slot_per_segment(groups: list[ChannelGroup], dims: set) -> list[ChannelGroup]:
    """Split the slots on ``dims`` that hold several repeats of a channel (the same channels concatenated
    twice, DLA's aggregation nodes) into one slot per repeat, so that each is one segment of the tensor and
    segments of other groups can sit between them (``assemble`` orders a dimension's slots by position)."""
    out = []
    for g in groups:
        slots = []
        for s in g.slots:
            if (s.tensor, s.dim) in dims and s.positions.shape[2] > 1:
                for r in range(s.positions.shape[2]):
                    piece = s.positions[:, :, r : r + 1]
                    if bool((piece >= 0).any()):
                        slots.append(dataclasses.replace(s, positions=piece))
            else:
                slots.append(s)
        out.append(ChannelGroup(g.name, g.n_units, slots, unit_kind=g.unit_kind))
    return out


_MAX_INDICES = 2_000_000  # channel indices one group may reach (a real group reaches a few thousand)


class _ExplodedGroup(FusionError):
    """The refusal of a group whose walk exploded (see :class:`_Explosion`); :func:`_trace` walks again with the
    graph cut inside attentions (:func:`_cut_attention_internals`) before giving it."""


class _Explosion(Exception):
    def __init__(self, node, seen: dict | None = None):
        self.node = node
        # the modules and operations the walk had reached (to name an attention it went through)
        self.reached = [entry[0].target.module for entry in (seen or {}).values()]


class _Item:
    """One item of a channel group: a dependency (its target node and handler) and the channels it touches,
    each with the root channel it comes from."""

    __slots__ = ("dep", "idxs", "root_idxs")

    def __init__(self, dep, idxs, root_idxs):
        self.dep, self.idxs, self.root_idxs = dep, idxs, root_idxs


def _pruning_group(dg, module: nn.Module, fn, channels) -> tuple[list[_Item], list]:
    """torch-pruning's ``get_pruning_group`` as a closure over single channels.

    torch-pruning re-walks a dependency whenever it arrives with a different *list* of indices (and compares
    lists of thousands of indices to find out), which is quadratic and worse on wide residual streams with
    many paths (ECA, reshapes): minutes per group. Here every (node, handler, channel, root channel) is
    visited once; index mappings are element-wise, so mapping only the new channels gives the same closure.
    Returns ``(items, mixed)``: unlike torch-pruning, which silently keeps the first root of a channel reached
    from two root channels, such a meeting is recorded in ``mixed`` (the nodes where it happens), and the
    caller refuses the group by name unless the meetings are element-wise pairs (``(node, root a, root b)``)."""
    from torch_pruning import _helpers
    from torch_pruning.dependency.dependency import Dependency
    from torch_pruning.pruner import function as tpf

    if (
        isinstance(module, tp.ops.TORCH_CONV)
        and module.groups == module.out_channels
        and module.out_channels > 1
    ):
        fn = tpf.prune_depthwise_conv_out_channels
    root = dg.module2node[module]
    root_dep = Dependency(fn, fn, source=root, target=root)
    # root channel k of the group is the module's output channel channels[k]
    start = [_helpers._HybridIndex(idx=c, root_idx=k) for k, c in enumerate(channels)]
    # per (target node, handler): the dependency, the root channel of each index reached, indices in order
    mixed: list = []
    budget, work = _MAX_INDICES, 10 * _MAX_INDICES
    seen: dict = {(id(root), fn): (root_dep, {i.idx: i.root_idx for i in start}, list(start))}
    stack = [(root_dep, start)]
    while stack:
        dep, idxs = stack.pop()
        node, handler = dep.target, dep.handler
        for new_dep in node.dependencies:
            if not new_dep.is_triggered_by(handler):
                continue
            new = idxs
            for mapping in new_dep.index_mapping:
                if mapping is not None:
                    if (
                        not getattr(mapping, "reverse", True)
                        and len(new) * getattr(mapping, "_stride", 1) > work
                    ):
                        # a flatten would expand past the budget at once
                        raise _Explosion(new_dep.target, seen)
                    new = mapping(new)
            if not new:
                continue
            work -= len(new)
            if work < 0:  # indices mapped, also those already seen: a walk can re-map huge lists forever
                raise _Explosion(new_dep.target, seen)
            key = (id(new_dep.target), new_dep.handler)
            entry = seen.get(key)
            if entry is None:
                entry = seen[key] = (new_dep, {}, [])
            fresh = []
            for i in new:
                r = entry[1].get(i.idx)
                if r is None:
                    entry[1][i.idx] = i.root_idx
                    fresh.append(i)
                elif r != i.root_idx:
                    # two root channels meet in one channel: they are not independent (a reshape that moves the
                    # channel axis, e.g. ECA's 1-D convolution across channels). Not propagated further (that is
                    # what made torch-pruning's walk explode); refused by the caller with the node's name
                    mixed.append((new_dep.target, r, i.root_idx))
            if not fresh:
                continue
            entry[2].extend(fresh)
            stack.append((new_dep, fresh))
            budget -= len(fresh)
            if budget < 0:
                worst = max(seen.values(), key=lambda e: len(e[2]))[0].target
                raise _Explosion(worst, seen)
    ignored_params = getattr(dg, "ignored_params", [])
    items = []
    for dep, _, idxs in seen.values():
        if isinstance(dep.target.module, nn.Parameter) and any(
            dep.target.module is p for p in ignored_params
        ):
            continue
        items.append(_Item(dep, [i.idx for i in idxs], [i.root_idx for i in idxs]))
    return items, mixed


def _all_groups(dg, ignored_layers, root_types):
    """torch-pruning's ``get_all_groups`` on :func:`_pruning_group` (same roots, same order)."""
    _update_index_mappings(dg)
    _vector_reshapes_keep_channels(dg)
    axes = _reshapes_follow_channel_axis(dg)
    _channels_as_matrices(dg)
    _remap_split_concat_slice(dg, axes)
    ignored = {id(m) for m in list(ignored_layers) + list(dg.IGNORED_LAYERS_IN_TRACING)}
    channel_fastest_merges(dg)  # (..., P, C) -> (..., P * C): channel c at p * C + c
    ignored |= label_axes(dg)  # Linears over positions (token mixing): their outputs root no group
    covered: dict = {}  # id(module) -> its output channels some group already holds
    # roots with one output channel last: such a "channel" may be a sequence position (ECA's 1-D convolution
    # over the channel axis, rooted first, would hold the channels it gates as repeats of its one channel
    # instead of finding them mixed with each other)
    single = {
        id(m)
        for m, p in ((m, dg.get_pruner_of_module(m)) for m in dg.module2node)
        if p is not None and isinstance(m, tuple(root_types)) and p.get_out_channels(m) == 1
    }
    roots = sorted(dg.module2node.keys(), key=lambda m: id(m) in single)  # stable: torch-pruning's order
    for m in roots:
        if id(m) in ignored or not isinstance(m, tuple(root_types)):
            continue
        pruner = dg.get_pruner_of_module(m)
        n_out = None if pruner is None else pruner.get_out_channels(m)
        if n_out is None:
            continue
        # a group reached only some of this module's channels (e.g. one chunk of a split of its output): the
        # others root a group of their own
        done = covered.get(id(m), set())
        channels = [c for c in range(n_out) if c not in done]
        if not channels:
            continue
        try:
            items, mixed = _pruning_group(dg, m, pruner.prune_out_channels, channels)
        except _Explosion as exc:
            names = {mod: n for n, mod in dg.model.named_modules()}
            where = names.get(exc.node.module) or type(exc.node.module).__name__
            reached = [names[mod] for mod in exc.reached if mod in names]
            root = names.get(m, "")
            reason = _unknown_attention_reason(dg.model, root, reached) or _shared_attention_layer_reason(
                dg.model, root, reached
            )
            if reason:
                raise _ExplodedGroup(reason) from None
            raise _ExplodedGroup(
                f"the channel group rooted at {root or '?'!r} reaches over {_MAX_INDICES:,} channel indices "
                f"(most at {where!r}): torch-pruning maps channels through a reshape of spatial positions "
                "(e.g. attention over flattened positions) as if they were channels; fusion refused"
            ) from None
        prunable = True
        for item in items:
            if dg.is_out_channel_pruning_fn(item.dep.handler):
                covered.setdefault(id(item.dep.target.module), set()).update(item.idxs)
                if id(item.dep.target.module) in ignored:
                    prunable = False
        if prunable:
            yield len(channels), items, mixed


def _channels_as_matrices(dg) -> None:
    """Refuse a model where a layer's pooled output channels, viewed as ``(parts..., rows, columns)``, are
    multiplied as matrices (see :func:`_pooled_split`), e.g. ``(groups, block, block)`` matrices multiplying the
    rows of the feature map: those channels are matrix entries over spatial positions, not channels. (timm's
    BilinearAttnTransform, BAT, does this and is traced by its own knowledge, see
    :func:`fusion.layers.bilinear_transforms_as_blocks`.)"""
    names = {m: n for n, m in dg.model.named_modules()}
    for node in getattr(dg, "fusion_matrices", []):
        out = tuple(int(n) for n in out_shape(node.grad_fn, 0))
        layer = _layer_before(node, names) or "?"
        raise FusionError(
            f"the output channels of {layer!r} are viewed as {out[1:]} and multiplied as matrices with a feature "
            "map (a transform over its spatial positions): they are matrix entries, not channels, which fusion "
            "does not support; fusion refused"
        )


def _matrix_products(node, depth: int = 40) -> set:
    """The matrix products (node ids) that read ``node``'s output through operations only (not past a layer)."""
    seen, found, todo = set(), set(), [(node, 0)]
    while todo:
        n, d = todo.pop()
        if id(n) in seen or d > depth:
            continue
        seen.add(id(n))
        if n.grad_fn is not None and type(n.grad_fn).__name__.startswith(("BmmBackward", "MmBackward")):
            found.add(id(n))
            continue
        todo.extend((o, d + 1) for o in n.outputs if type(o.module).__module__ == tp.ops.__name__)
    return found


def _layer_before(node, names: dict, depth: int = 10) -> str | None:
    """The nearest model layer upstream of ``node`` through operations."""
    todo = [(i, 0) for i in node.inputs]
    while todo:
        n, d = todo.pop(0)
        if n.module in names:
            return names[n.module]
        if d < depth:
            todo.extend((i, d + 1) for i in n.inputs)
    return None


class _RangeMap:
    """A channel index mapping along one edge of the graph: ``select`` keeps the indices in
    ``range(start, stop, step)`` and renumbers them from 0 (a split chunk, a slice); otherwise it places index i
    at ``start + i * step`` (an input's segment of a concatenation, or the inverse of a selection)."""

    __slots__ = ("start", "stop", "step", "select")

    def __init__(self, start: int, stop: int, step: int, select: bool):
        self.start, self.stop, self.step, self.select = start, stop, step, select

    def inverse(self) -> _RangeMap:
        return _RangeMap(self.start, self.stop, self.step, not self.select)

    def __call__(self, idxs):
        from torch_pruning import _helpers

        a, b, k = self.start, self.stop, self.step
        if self.select:
            return [
                _helpers._HybridIndex(idx=(i.idx - a) // k, root_idx=i.root_idx)
                for i in idxs
                if a <= i.idx < b and (i.idx - a) % k == 0
            ]
        return [_helpers._HybridIndex(idx=a + i.idx * k, root_idx=i.root_idx) for i in idxs]

    def __repr__(self) -> str:
        return f"_RangeMap({'select' if self.select else 'place'} {self.start}:{self.stop}:{self.step})"


def _channel_dim(ndim: int) -> int | None:
    """The channel axis of a feature tensor as torch-pruning's layers see it: NC, NCHW (NCDHW), and the last
    axis of token tensors (B, N, C)."""
    if ndim < 2:
        return None
    return 2 if ndim == 3 else 1


def _norm_dim(dim: int, ndim: int) -> int:
    """A dimension autograd saved, as a non-negative axis (a negative one is saved as its unsigned 64-bit
    value: -1 reads 2**64 - 1)."""
    if dim >= 1 << 63:
        dim -= 1 << 64
    return dim % ndim


def _node_maps(node, nr_or_k: int, side: str, axes: dict | None = None):
    """This node's own channel mapping for one of its edges, as a ``_RangeMap`` from its side of the edge
    outwards (``side="out"``: output ``nr`` of a split, from the split's input channels to the chunk's;
    ``side="in"``: argument ``k`` of a concatenation or the input of a slice, from the edge's channels to the
    node's). ``None``: identity (the operation is not along the channel axis, or not a split/cat/slice).
    Raises ``LookupError`` when the node is one of these but its sizes cannot be read."""
    gf = node.grad_fn
    kind = node.type
    if kind == tp.ops.OPTYPE.SPLIT and side == "out":
        shapes = [out_shape(gf, i) for i in range(len(gf._input_metadata))]
        full = tuple(getattr(gf, "_saved_self_sym_sizes", ()))
        if not full or any(s is None for s in shapes):
            raise LookupError
        d = _norm_dim(gf._saved_dim, len(full))
        if d != _axis_at(node, len(full), axes, True):
            return None
        offsets = [0]
        for s in shapes:
            offsets.append(offsets[-1] + s[d])
        return _RangeMap(offsets[nr_or_k], offsets[nr_or_k + 1], 1, True)
    if kind == tp.ops.OPTYPE.CONCAT and side == "in":
        out = out_shape(gf, 0)
        if out is None:
            raise LookupError
        d = _norm_dim(gf._saved_dim, len(out))
        if d != _axis_at(node, len(out), axes, False):
            return None
        sizes = []
        for f, nr in gf.next_functions:
            s = None
            if f is not None:
                v = getattr(f, "variable", None)  # a leaf: its own shape
                s = tuple(v.shape) if v is not None else out_shape(f, nr)
            sizes.append(None if s is None else s[d])
        if sizes.count(None) > 1:
            raise LookupError
        if None in sizes:  # one argument without autograd history (a constant): the rest of the output
            sizes[sizes.index(None)] = out[d] - sum(s for s in sizes if s is not None)
        start = sum(sizes[:nr_or_k])
        return _RangeMap(start, start + sizes[nr_or_k], 1, False)
    if kind == tp.ops.OPTYPE.SLICE and side == "in":
        full = tuple(getattr(gf, "_saved_self_sym_sizes", ()))
        if not full:
            raise LookupError
        d = _norm_dim(gf._saved_dim, len(full))
        if d != _axis_at(node, len(full), axes, True):
            return None
        size = full[d]
        start, end, step = gf._saved_start, gf._saved_end, gf._saved_step
        start = 0 if start is None else (start + size if start < 0 else start)
        end = size if end is None else (end + size if end < 0 else end)
        start, end = max(0, min(start, size)), max(0, min(end, size))
        return _RangeMap(start, end, step, True)
    return None


def _axis_at(node, ndim: int, axes: dict | None, of_input: bool) -> int | None:
    """The channel axis of a split's or slice's input (``of_input``) or of a concatenation's output: the one
    :func:`_channel_axes` tracked (MambaOut splits ``(B, H, W, C)`` along its last axis), else torch-pruning's
    convention."""
    src = node.inputs[0] if of_input and node.inputs else node
    a = axes.get(id(src)) if axes else None
    return a if a is not None else _channel_dim(ndim)


def _vector_reshapes_keep_channels(dg) -> None:
    """A reshape of a 1-D vector that only adds axes of size 1 (a layer scale ``gamma.reshape(1, -1, 1, 1)``,
    a per-channel bias ``view(1, C, 1)``) keeps every channel where it is. torch-pruning guesses the
    channel counts on both sides by walking the graph and can install a flatten mapping there (InceptionNeXt:
    stride 4, each channel claimed four times); the sizes autograd recorded decide instead."""
    from torch_pruning.dependency import index_mapping as im

    for node in dg.module2node.values():
        if node.type != tp.ops.OPTYPE.RESHAPE or node.grad_fn is None:
            continue
        ins = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
        out = out_shape(node.grad_fn, 0)
        if ins is None or out is None:
            continue
        # only a 1-D vector: (1, C, 1, 1) -> (1, 1, C) may move channels onto a sequence axis (ECA's Conv1d
        # across channels, where a batch of one hides the difference)
        if len(ins) != 1 or [int(s) for s in out if s != 1] != [int(ins[0])]:
            continue
        deps = list(node.dependencies) + [
            d for other in node.inputs + node.outputs for d in other.dependencies if d.target is node
        ]
        for dep in deps:
            dep.index_mapping = [
                None if isinstance(m, im._FlattenIndexMapping) else m for m in dep.index_mapping
            ]


# ---------------------------------------------------------------------------- reshapes along the channel axis
class _AxisMap:
    """A channel index mapping through a reshape, from the shapes autograd recorded: a ``small`` axis of
    ``size`` channels lies inside a ``big`` axis (the same run of memory), where channel i sits at
    ``o * size * r + i * r + j`` for ``o < outer`` (the big axis holds ``outer`` segments of the small one,
    the channel axis the fastest-varying part: Swin's patch merging, four segments of C) and ``j < r`` (each
    channel a block of ``r`` positions: a flatten of (C, H, W) before a Linear). ``expand`` maps small -> big,
    otherwise big -> small (a channel axis split into (k, C), selective kernel's paths: i -> i mod C)."""

    __slots__ = ("size", "r", "outer", "expand", "reverse", "_stride")

    def __init__(self, size: int, r: int, outer: int, expand: bool):
        self.size, self.r, self.outer, self.expand = size, r, outer, expand
        # read by the walk's explosion guard, as torch-pruning's flatten mapping is
        self.reverse, self._stride = not expand, r * outer

    def inverse(self) -> _AxisMap:
        return _AxisMap(self.size, self.r, self.outer, not self.expand)

    def __call__(self, idxs):
        from torch_pruning import _helpers

        n, r = self.size, self.r
        if self.expand:
            return [
                _helpers._HybridIndex(idx=o * n * r + i.idx * r + j, root_idx=i.root_idx)
                for i in idxs
                for o in range(self.outer)
                for j in range(r)
            ]
        out, seen = [], set()
        for i in idxs:
            key = ((i.idx // r) % n, i.root_idx)
            if key not in seen:
                seen.add(key)
                out.append(_helpers._HybridIndex(idx=key[0], root_idx=i.root_idx))
        return out

    def __repr__(self) -> str:
        return f"_AxisMap({'expand' if self.expand else 'collapse'} {self.size} x{self.r} in {self.outer})"


def _inner_sizes(shape) -> list[int]:
    """Per axis, how many elements one step along it skips in a contiguous tensor of ``shape``."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= int(n)
    return out[::-1]


def _nesting(small_shape, a: int, big_shape, b: int) -> tuple[int, int] | None:
    """``(r, outer)`` when axis ``a`` of ``small_shape`` lies inside axis ``b`` of ``big_shape`` (the same
    elements, views of one contiguous buffer), see :class:`_AxisMap`; else None."""
    s_a, s_b = _inner_sizes(small_shape)[a], _inner_sizes(big_shape)[b]
    end_a, end_b = s_a * int(small_shape[a]), s_b * int(big_shape[b])
    if s_b > s_a or end_a > end_b or s_a % s_b or end_b % end_a:
        return None
    return s_a // s_b, end_b // end_a


def _reshape_axis(in_shape, axis: int, out_shape) -> tuple[int, _AxisMap | None] | None:
    """Where a reshape puts the channel ``axis`` of ``in_shape``: ``(output axis, forward mapping)`` (None:
    identity), when the channel axis lies inside one axis of the output other than the batch axis; else None
    (it is split, or merged into the batch)."""
    if int(in_shape[axis]) == 1:  # one channel: where an axis of size 1 keeps its place, index 0 stays 0
        lead = _prod(in_shape[:axis])
        for b in range(1, len(out_shape)):
            if int(out_shape[b]) == 1 and _prod(out_shape[:b]) == lead:
                return b, None
        return None
    for b in range(len(out_shape)):
        if b == 0 and axis != 0:
            continue  # channels merged into the batch axis: no channel axis of the output holds them
        nest = _nesting(in_shape, axis, out_shape, b)
        if nest is not None:
            r, outer = nest
            same = r == 1 and outer == 1
            return b, None if same else _AxisMap(int(in_shape[axis]), r, outer, True)
    return _pooled_split(in_shape, axis, out_shape)


def _pooled_split(in_shape, axis: int, out_shape) -> tuple[int, _AxisMap] | None:
    """A pooled feature map (B, C, 1, 1) viewed as ``(parts, channels)``: the attention weights over the paths
    of selective kernel and split attention (ResNeSt's ``(B, radix * C, 1, 1) -> (B, cardinality, radix, C /
    cardinality)``, softmaxed over the radix). The channels are the fastest-varying part (the last axis of
    size > 1 inside the channel axis) and channel i of every part is the same channel: ``i -> i mod C``, so
    the parts' i-th channels meet (coupled units). Where such a view is multiplied as matrices instead, it is
    refused (:func:`_channels_as_matrices`)."""
    if axis != 1 or len(in_shape) < 3 or any(int(n) != 1 for n in in_shape[2:]):
        return None
    for b in range(len(out_shape) - 1, 0, -1):
        if int(out_shape[b]) == 1:
            continue
        nest = _nesting(out_shape, b, in_shape, axis)
        if nest is None:
            return None
        r, outer = nest
        return b, _AxisMap(int(out_shape[b]), r, outer, False)
    return None


def _prod(sizes) -> int:
    out = 1
    for n in sizes:
        out *= int(n)
    return out


def _grad_fn_inputs(gf, node_of: dict) -> list:
    """``(node, output_nr, shape)`` of each argument autograd recorded for ``gf`` (node None: a leaf or a
    constant)."""
    out = []
    for f, nr in getattr(gf, "next_functions", ()):
        if f is None:
            out.append((None, nr, None))
            continue
        v = getattr(f, "variable", None)
        shape = tuple(v.shape) if v is not None else out_shape(f, nr)
        out.append((node_of.get(f), nr, shape))
    return out


def _channel_axes(dg) -> dict:
    """The channel axis of every node's output tensor (``id(node)`` -> axis, None when unknown), propagated
    forward from the layers through the operations autograd recorded: a Linear's channels are its output's
    last axis, a convolution's and a batch norm's axis 1; a layer whose output is shaped like its input
    (LayerNorm in either layout, activations) keeps its input's; ``permute``, ``transpose``, ``unsqueeze``,
    ``stack``, reductions and reshapes move it where they put it; an operation of several inputs takes the
    axis they agree on. torch-pruning itself assumes dim 1 of 4-D tensors and the last axis of 3-D ones."""
    nodes = list(dg.module2node.values())
    node_of = {n.grad_fn: n for n in nodes if n.grad_fn is not None}
    axes: dict = {}
    # iterative post-order over inputs (graphs are thousands of nodes deep), each node expanded once; a cycle
    # (a module called twice is one node) leaves the input still open unknown
    opened: set = set()
    for start in nodes:
        stack = [(start, False)]
        while stack:
            node, ready = stack.pop()
            if not ready:
                if id(node) in opened:
                    continue
                opened.add(id(node))
                stack.append((node, True))
                stack.extend((i, False) for i in node.inputs if id(i) not in opened)
                continue
            try:
                axes[id(node)] = _axis_of(node, axes, node_of)
            except (AttributeError, TypeError, ValueError, IndexError, RuntimeError):
                axes[id(node)] = None  # an unreadable record: unknown, torch-pruning's mapping stays
    return axes


def _axis_of(node, axes: dict, node_of: dict) -> int | None:
    gf, mod = node.grad_fn, node.module
    out = out_shape(gf, 0) if gf is not None else None
    if out is None:
        return None
    nd = len(out)
    if isinstance(mod, nn.Module) and type(mod).__module__ != tp.ops.__name__:  # a layer, not an operation
        if isinstance(mod, (nn.Linear, nn.RNNBase)):
            return nd - 1
        if isinstance(mod, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
            return 1 if nd >= 2 else None
        if len(node.inputs) == 1:
            src = node.inputs[0]
            shape = out_shape(src.grad_fn, 0) if src.grad_fn is not None else None
            if shape is not None and tuple(shape) == tuple(out):
                return axes.get(id(src))
        # otherwise the operation that made its output decides (timm's LayerNorm2d: permute, norm, permute back)
    if isinstance(mod, nn.Parameter):
        return 0 if mod.dim() == 1 else None
    args = _grad_fn_inputs(gf, node_of)
    known = [(axes.get(id(n)), shape) for n, _, shape in args if n is not None and shape is not None]
    known = [(a, shape) for a, shape in known if a is not None]
    kind = type(gf).__name__
    if not known:
        return None
    if kind.startswith("PermuteBackward"):
        dims = [_norm_dim(d, nd) for d in gf._saved_dims]
        return dims.index(known[0][0])
    if kind.startswith("TransposeBackward"):
        d0, d1 = _norm_dim(gf._saved_dim0, nd), _norm_dim(gf._saved_dim1, nd)
        a = known[0][0]
        return d1 if a == d0 else d0 if a == d1 else a
    if node.type == tp.ops.OPTYPE.RESHAPE:
        a, shape = known[0]
        found = _reshape_axis(shape, a, out)
        return None if found is None else found[0]
    if kind.startswith(("UnsqueezeBackward", "StackBackward")):
        d = _norm_dim(gf._saved_dim, nd)
        a = known[0][0]
        return a + 1 if d <= a else a
    if kind.startswith(("BmmBackward", "MmBackward")):
        first, second = args[0][0], args[1][0] if len(args) > 1 else None
        a0 = axes.get(id(first)) if first is not None else None
        a1 = axes.get(id(second)) if second is not None else None
        found = {a for a in (a0 if a0 == nd - 2 else None, a1 if a1 == nd - 1 else None) if a is not None}
        return found.pop() if len(found) == 1 else None
    if hasattr(gf, "_saved_keepdim") and hasattr(gf, "_saved_dim"):  # a reduction over some axes
        a, shape = known[0]
        dims = gf._saved_dim
        dims = {_norm_dim(d, len(shape)) for d in (dims if isinstance(dims, tuple) else (dims,))}
        if a in dims:
            return None
        return a if gf._saved_keepdim else a - sum(d < a for d in dims)
    same = {a for a, shape in known if len(shape) == nd}
    if len(same) == 1:
        return same.pop()
    if not same and len(known) == 1:  # squeeze / unsqueeze of axes of size 1
        a, shape = known[0]
        keep = [i for i, n in enumerate(shape) if n != 1]
        if a in keep and [shape[i] for i in keep] == [n for n in out if n != 1]:
            return [i for i, n in enumerate(out) if n != 1][keep.index(a)]
    return None


def _reshapes_follow_channel_axis(dg) -> dict:
    """Re-derive the channel mapping of every reshape (``view``, ``reshape``, ``flatten``) from the shapes
    autograd recorded and the channel axis of its input (:func:`_channel_axes`).

    torch-pruning guesses a reshape's mapping from channel counts it infers by walking the graph, and only for
    1-D and 4-D inputs: a flatten of stride ``out // in`` (channel i -> ``i * k ... i * k + k - 1``) or
    nothing. That is right for a flatten of (C, H, W) before a Linear, and wrong when the channel axis keeps
    its place (a global-context block's ``(B, C, H, W) -> (B, C, H * W)``: the ratio of H * W it guessed
    expands every channel to millions of indices), when it becomes the fastest-varying part of a merged axis
    (Swin's patch merging, ``(B, H/2, W/2, 2, 2, C) -> (B, H/2, W/2, 4C)``: four segments of the same C
    channels, where nothing was mapped) or when it is split into (paths, channels) (selective kernel's
    ``(B, 2C, 1, 1) -> (B, 2, C, 1, 1)``: channel i and i + C meet, guessed as i and i + 1). Here the
    channel axis's place in memory decides (:class:`_AxisMap`). A channel axis split over several output axes
    is re-mapped only where torch-pruning installed a flatten (whose ratio names the channel part); where the
    input's channel axis is unknown, torch-pruning's mapping stays and the coverage check and the self-check
    judge it."""
    from torch_pruning.dependency import index_mapping as im

    axes = _channel_axes(dg)
    dg.fusion_matrices = []
    for node in list(dg.module2node.values()):
        gf = node.grad_fn
        if node.type != tp.ops.OPTYPE.RESHAPE or gf is None or len(node.inputs) != 1:
            continue
        src = node.inputs[0]
        a = axes.get(id(src))
        ins = getattr(gf, "_saved_self_sym_sizes", None)
        out = out_shape(gf, 0)
        if a is None or ins is None or out is None:
            continue
        ins = tuple(int(n) for n in ins)
        if a >= len(ins):
            continue
        edges = [d for d in src.dependencies if d.target is node]
        backs = [d for d in node.dependencies if d.target is src]
        outs = [d for d in node.dependencies if d.target is not src] + [
            d for o in node.outputs for d in o.dependencies if d.target is node
        ]
        flats = [
            m for d in edges + backs + outs for m in d.index_mapping if isinstance(m, im._FlattenIndexMapping)
        ]
        found = _reshape_axis(ins, a, out)
        if found is not None and found[1] is not None and not found[1].expand and _matrix_products(node):
            dg.fusion_matrices.append(node)  # a pooled view multiplied as matrices: refused
            continue
        if found is not None and _read_across(node, found[0], len(out)):
            continue  # channels become a layer's sequence (ECA): torch-pruning's mapping names the layer mixing them
        if found is not None:
            fwd = found[1]
        else:
            if not flats:
                continue
            # split: the output axis inside the channel axis whose size torch-pruning's ratio names
            width = ins[a] // flats[0]._stride
            cands = [b for b in range(len(out)) if int(out[b]) == width and _nesting(out, b, ins, a)]
            if len(cands) != 1:
                continue
            r, outer = _nesting(out, cands[0], ins, a)
            fwd = _AxisMap(width, r, outer, False)
        for d in edges + backs + outs:
            d.index_mapping = [None if isinstance(m, im._FlattenIndexMapping) else m for m in d.index_mapping]
        if fwd is None:
            continue
        # after a producer's own mapping on the way in (a split's chunk), before it on the way back
        for d in edges:
            d.index_mapping = _padded([m for m in d.index_mapping if m is not None] + [fwd])
        for d in backs:
            d.index_mapping = _padded([fwd.inverse()] + [m for m in d.index_mapping if m is not None])
    _matmul_operands(dg, axes)
    return axes


def _contracted_layers(nodes, module_names: dict, attention: set, pinned: set = frozenset()) -> str | None:
    """The layers whose channels products sum over (``q @ k`` of a single-head attention whose q and k carry
    the channels, iFormer's), named by the nearest layer upstream of each operand, or None. Such channels are a
    symmetry of each member (the self-check passes), but in the concatenation of several members the product
    also sums over the other members' channels, so NT at sparsity 0 is not their ensemble (as with a LayerNorm
    across channels); kept on the graph as ``graph.contracted_channels``. Products of ``pinned`` layers (whose
    output channels are pinned: averaged, never concatenated) are not counted."""
    inside = tuple(f"{a.rsplit('.', 1)[0]}." for a in attention)  # the recognised attention modules
    found = []
    for node in nodes:
        names = []
        for src in node.inputs[:2]:
            seen, todo = set(), [src]
            while todo:
                n = todo.pop(0)
                if id(n) in seen:
                    continue
                seen.add(id(n))
                if n.module in module_names:
                    names.append(module_names[n.module])
                    break
                todo.extend(n.inputs)
        if any(n in attention or n.startswith(inside) for n in names) or (names and set(names) <= pinned):
            continue
        pair = " x ".join(repr(n) for n in names)
        if pair and pair not in found:
            found.append(pair)
    return "; ".join(found) or None


def _matmul_operands(dg, axes: dict) -> None:
    """A matrix product ``a @ b`` keeps the channels of ``a``'s rows (axis -2) and of ``b``'s columns (axis
    -1); torch-pruning takes it for an element-wise operation, so the indices of the other operand flow into
    the product as if they were the same channels (a global-context block's attention over positions
    ``x (B, C, HW) @ softmax(conv(x)) (B, HW, 1)``: the positions of the one-channel attention map were
    mapped onto the context's channels, and back, until millions of indices). Where one operand's channel
    axis is known to survive, the edges of an operand whose channel axis does not are cut: its channels are
    not the product's. An operand whose channels are in fact summed over (a contraction across channels) is
    then a coupling the trace misses, which the self-check refuses by name."""
    nodes = list(dg.module2node.values())
    node_of = {n.grad_fn: n for n in nodes if n.grad_fn is not None}
    dg.fusion_contractions = []  # products summing over the channel axis of both operands (see _trace)
    for node in nodes:
        gf = node.grad_fn
        if gf is None or not type(gf).__name__.startswith(("BmmBackward", "MmBackward")):
            continue
        out = out_shape(gf, 0)
        args = _grad_fn_inputs(gf, node_of)
        if out is None or len(args) != 2 or any(n is None for n, _, _ in args):
            continue
        nd = len(out)
        if axes.get(id(args[0][0])) == nd - 1 and axes.get(id(args[1][0])) == nd - 2:
            dg.fusion_contractions.append(node)
        keeps = [axes.get(id(n)) == nd - 2 + k for k, (n, _, _) in enumerate(args)]
        if not any(keeps):
            continue
        for (src, _, _), keep in zip(args, keeps):
            if keep:
                continue
            for d in [d for d in src.dependencies if d.target is node] + [
                d for d in node.dependencies if d.target is src
            ]:
                d.index_mapping = [_RangeMap(0, 0, 1, True), None]


def _read_across(node, axis: int, ndim: int) -> bool:
    """A layer reads the reshape's output with another axis as its channels than ``axis`` (ECA's 1-D
    convolution along the channels of ``(B, 1, C)``)."""
    for o in node.outputs:
        m = o.module
        if isinstance(m, nn.Linear) and axis != ndim - 1:
            return True
        if isinstance(m, nn.modules.conv._ConvNd) and axis != 1:
            return True
    return False


def _padded(maps: list) -> list:
    return maps + [None] * (2 - len(maps))


_OWN_MAPS = (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SLICE)


def _remap_split_concat_slice(dg, axes: dict | None = None) -> None:
    """Re-derive the channel index mappings of every edge at a split (``split``, ``chunk``), a concatenation or
    a slice (``x[:, a:b]``, ``narrow``) from autograd's own record of the forward pass.

    torch-pruning (1.6) gets them wrong in ways that left channels claimed twice or by no group: it numbers a
    split's chunks in the order its consumers were discovered, not the chunk order; it infers a concatenation's
    input sizes by walking the graph (a chunk taken straight from a split is given the split's size, and then
    no mapping is set at all); on an edge from a split straight into a concatenation it applies the two
    reverse mappings in the wrong order; and it maps splits and concatenations only along dim 1, not along the
    channel axis of token tensors (B, N, C). Here every edge is matched to the autograd input it is (its
    ``output_nr`` names the chunk), sizes come from the shapes autograd recorded, and the two mappings of an
    edge compose in order (forward: producer's, then consumer's; backward: the inverses, reversed). Mappings
    of other operations on the same edge (reshape, flatten, unbind, expand) are kept in their place. ``axes``
    (:func:`_channel_axes`) names the channel axis where it was tracked (an NHWC tensor's last axis)."""
    node_of = {node.grad_fn: node for node in dg.module2node.values() if node.grad_fn is not None}
    own = _tp_range_mappings()
    for node in list(dg.module2node.values()):
        gf = node.grad_fn
        if gf is None or not hasattr(gf, "next_functions"):
            continue
        entries = []  # (input node, output_nr, argument position)
        for k, (f, nr) in enumerate(gf.next_functions):
            if f is not None and f in node_of:
                entries.append((node_of[f], nr, k))
        if len(entries) != len(node.inputs) or not all(e[0] is n for e, n in zip(entries, node.inputs)):
            continue  # a reused module (several autograd records in one node): torch-pruning's mappings stay
        if node.type not in _OWN_MAPS and not any(p.type in _OWN_MAPS for p, _, _ in entries):
            continue
        back = node.dependencies[: len(node.inputs)]
        occurrence: dict = {}
        for i, (producer, nr, k) in enumerate(entries):
            if producer.type not in _OWN_MAPS and node.type not in _OWN_MAPS:
                continue
            j = occurrence.get(id(producer), 0)
            occurrence[id(producer)] = j + 1
            fwd = [d for d in producer.dependencies if d.target is node]
            fwd = fwd[j] if j < len(fwd) else None
            rev = back[i] if back[i].target is producer else None
            if fwd is None or rev is None:
                continue
            try:
                p_out = _node_maps(producer, nr, "out", axes)
                c_in = _node_maps(node, k, "in", axes)
            except LookupError:
                continue  # sizes unknown: torch-pruning's mapping stays (the coverage check judges it)
            # the other operation's mapping (reshape, flatten, unbind, expand) of an edge belongs to its node that
            # is not a split/cat/slice
            f_other = [m for m in fwd.index_mapping if m is not None and not isinstance(m, own)]
            r_other = [m for m in rev.index_mapping if m is not None and not isinstance(m, own)]
            p_own, c_own = producer.type in _OWN_MAPS, node.type in _OWN_MAPS
            f_list = ([p_out] if p_own else f_other) + ([c_in] if c_own else f_other)
            r_list = ([c_in and c_in.inverse()] if c_own else r_other) + (
                [p_out and p_out.inverse()] if p_own else r_other
            )
            f_list = [m for m in f_list if m is not None]
            r_list = [m for m in r_list if m is not None]
            fwd.index_mapping = f_list + [None] * (2 - len(f_list))
            rev.index_mapping = r_list + [None] * (2 - len(r_list))


def _tp_range_mappings():
    from torch_pruning.dependency import index_mapping as im

    return im._SplitIndexMapping, im._ConcatIndexMapping, im._SliceIndexMapping


def _positions_by_root(idxs, root_idxs, n_root: int, name: str) -> torch.Tensor:
    """``out[r]``: the sorted, distinct positions along the item's dimension that root channel r maps to
    (-1 pads rows with fewer). Vectorised: thousands of channels per item are common."""
    idx = torch.tensor([int(i) for i in idxs], dtype=torch.long)
    root = torch.tensor([-1 if r is None else int(r) for r in root_idxs], dtype=torch.long)
    if idx.numel() != root.numel() or ((root < 0) | (root >= n_root) | (idx < 0)).any():
        raise FusionError(f"torch-pruning gave an invalid channel index mapping for {name!r}")
    if idx.numel() == 0:
        return torch.full((n_root, 0), -1, dtype=torch.long)
    span = int(idx.max()) + 1
    pairs = torch.unique(root * span + idx)  # sorted by root, then position; duplicates dropped
    r, pos = pairs // span, pairs % span
    counts = torch.bincount(r, minlength=n_root)
    column = torch.arange(pairs.numel()) - (torch.cumsum(counts, 0) - counts)[r]
    out = torch.full((n_root, int(counts.max())), -1, dtype=torch.long)
    out[r, column] = pos
    return out


def _reach(items, n_root: int) -> torch.Tensor:
    """``out[r, i]``: how many indices of item i (a tensor or an operation node of the walk) root channel r
    reaches."""
    if not items:
        return torch.zeros((n_root, 0), dtype=torch.long)
    return torch.stack(
        [torch.bincount(torch.tensor(item.root_idxs, dtype=torch.long), minlength=n_root) for item in items],
        1,
    )


def _split_by_reach(group, reach: torch.Tensor) -> list:
    """Split a traced group into the classes of root channels that reach the same nodes equally often.

    A split (``x.split``, ``chunk``, ``x[:, :k]``) sends the root's channels down different paths: CSP's two
    halves, FasterNet's partial convolution, InceptionNeXt's four branches, DPN's dual path, a GLU's two
    halves through different activations. One closure holds them all (they meet again at the concatenation),
    but a channel of one chunk cannot take the place of a channel of another: the split boundary does not
    move with them, and the chunks' paths differ (other layers, other operations). Root channels are
    interchangeable only if they reach the same nodes of the graph (``reach``: parameter-free operations
    included) the same number of times, so each class of those becomes its own group (same root name);
    slots and grouped-convolution links a class does not reach are dropped from it. A group whose channels
    all take the same paths comes back as it is.
    """
    root, n_root, slots, links, _ = group
    if n_root == 0 or reach.shape[1] == 0:
        return [group]
    kinds, cls = torch.unique(reach, dim=0, return_inverse=True)
    if kinds.shape[0] == 1:
        return [group]
    first = torch.full((kinds.shape[0],), n_root, dtype=torch.long).scatter_reduce(
        0, cls, torch.arange(n_root), reduce="amin"
    )
    out = []
    for c in torch.argsort(first).tolist():  # classes in the order of their first root channel
        rows = (cls == c).nonzero().squeeze(1)
        sub_slots = []
        for spec, name, pos in slots:
            width = int((pos[rows] >= 0).sum(1).max())
            if width:
                sub_slots.append((spec, name, pos[rows, :width]))
        sub_links = [(link, conv_pos[rows]) for link, conv_pos in links if bool((conv_pos[rows] >= 0).all())]
        out.append((root, rows.numel(), sub_slots, sub_links, None))
    return out


def _merge_units(raw) -> list[ChannelGroup]:
    """Turn torch-pruning groups into unit groups.

    A grouped convolution only connects block k of its input channels to block k of its output channels, so
    channels tied by such blocks must move together: the units are the connected components of the relation
    "in the same block of some grouped convolution" (a block of the input side being joined to the same block
    of the output side). Plain groups keep one channel per unit.

    A group coupled across k equal parts (split attention: ``parts``, see :func:`_equal_parts`) whose parts
    are blocks of a grouped convolution (ResNeSt's radix blocks) joins its parts' i-th channels into one unit
    too, and gives each block of the convolution its part, which the group on the other side of the
    convolution takes. Each unit then keeps its channels part by part along the repeat axis, so a new model
    has every kept unit's part 0, then every kept unit's part 1... (the layout of the radix view).
    """
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a, b):
        parent[find(a)] = find(b)

    order_key: dict[
        int, torch.Tensor
    ] = {}  # within a unit, channels keep the order a grouped conv reads them in
    linked = set()
    coupled: dict = {}  # grouped convolutions whose blocks hold coupled parts -> (blocks, parts, group's root)
    for gi, (root, n_root, _slots, links, parts) in enumerate(raw):
        if parts is not None:
            n_units = n_root // (int(parts.max()) + 1)
            order_key[gi] = torch.arange(n_root)  # the coupled layout is the root layer's order
            for r in range(n_root):
                union(("ch", gi, r), ("ch", gi, r % n_units))
        for link, conv_pos in links:
            link: GroupedConvLink
            linked.add(gi)
            for r, row in enumerate(conv_pos.tolist()):
                for pos in row:
                    if pos >= 0:
                        union(("ch", gi, r), ("block", link.layer, pos // link.block))
            conv_pos = conv_pos[:, 0]
            if parts is not None:
                coupled[link.layer] = (link.groups, int(parts.max()) + 1, root)
                continue
            if link.side == IN:
                if gi in order_key and not torch.equal(order_key[gi], conv_pos):
                    raise FusionError(
                        f"the channels of group {root!r} are read in different orders by two grouped "
                        f"convolutions (one is {link.layer!r}); fusion does not support this"
                    )
                order_key[gi] = conv_pos
            elif gi not in order_key:
                order_key[gi] = conv_pos

    # a block's part: its rank among the blocks of its convolution in the same unit (the radix view is part-major)
    block_part: dict = {}
    for layer, (n_blocks, k, root) in coupled.items():
        seen: dict = {}
        for b in range(n_blocks):
            comp = find(("block", layer, b))
            block_part[(layer, b)] = seen[comp] = seen.get(comp, -1) + 1
        if any(n != k - 1 for n in seen.values()):
            # (ResNeSt with cardinality > 1: fc2's blocks are the cardinal groups, each holding every radix part)
            raise FusionError(
                f"the channels of the group rooted at {root!r} are coupled across {k} equal parts, but the blocks "
                f"of grouped convolution {layer!r} are not one part each: a fused model could not keep each "
                "member's parts in their blocks; fusion refused"
            )
    groups = []
    group_units: dict[int, list] = {}
    touching: dict = {}  # component -> groups with channels in it
    for gi in range(len(raw)):
        if gi not in linked:
            _, n_root, slots, _, _ = raw[gi]
            groups.append(
                ChannelGroup(raw[gi][0], n_root, [slot_of(s, n, pos[:, None, :]) for s, n, pos in slots])
            )
            continue
        group_units[gi] = [find(("ch", gi, r)) for r in range(raw[gi][1])]
        for comp in set(group_units[gi]):
            touching.setdefault(comp, []).append(gi)
    # groups that share a component move together: one cluster, one unit group
    for gis in touching.values():
        for gi in gis[1:]:
            union(("group", gi), ("group", gis[0]))
    clusters: dict = {}
    for gi, units in group_units.items():
        clusters.setdefault(find(("group", gi)), []).append((gi, units))

    for members in clusters.values():
        comp_ids = sorted({u for _, units in members for u in units}, key=str)
        index = {c: i for i, c in enumerate(comp_ids)}
        n_units = len(comp_ids)
        slots = []
        for gi, units in members:
            root, n_root, gslots, links, parts = raw[gi]
            if parts is None:
                parts = _parts_of_blocks(root, n_root, links, block_part)
            k = int(parts.max()) + 1
            unit = torch.tensor([index[u] for u in units])
            counts = torch.bincount(unit * k + parts, minlength=n_units * k)
            if counts.ne(counts[0]).any() or n_root % (n_units * k):
                raise FusionError(
                    f"the channels of group {root!r} do not split evenly into convolution blocks"
                )
            rank = torch.argsort(torch.argsort(order_key[gi]))
            order = torch.argsort((unit * k + parts) * (n_root + 1) + rank, stable=True)
            m = n_root // (n_units * k)
            for spec, name, pos in gslots:
                pos = pos[order].reshape(n_units, k, m, pos.shape[1]).transpose(1, 2)
                slots.append(slot_of(spec, name, pos.reshape(n_units, m, -1)))
        groups.append(ChannelGroup(raw[members[0][0]][0], n_units, slots, unit_kind="conv-block"))
    return groups


def _parts_of_blocks(root: str, n_root: int, links, block_part: dict) -> torch.Tensor:
    """The coupled part of each channel of a group, from the blocks of grouped convolutions its channels are
    in (``block_part``, see :func:`_merge_units`); 0 where no block holds a part."""
    parts = torch.full((n_root,), -1, dtype=torch.long)
    for link, conv_pos in links:
        for r, pos in enumerate(conv_pos[:, 0].tolist()):
            part = block_part.get((link.layer, pos // link.block))
            if part is not None:
                if int(parts[r]) not in (-1, part):
                    raise FusionError(f"the channels of {root!r} hold different parts of a split attention")
                parts[r] = part
    return parts.clamp(min=0)


def _check_coverage(graph: ChannelGraph) -> None:
    for tensor, dims in graph.tensor_dims.items():
        shape = graph.shapes.get(tensor)
        if shape is None:
            raise FusionError(f"traced tensor {tensor!r} is not a parameter or buffer of the model")
        for d, refs in dims.items():
            pos = torch.cat([graph._slot(r).positions.reshape(-1) for r in refs])
            pos = pos[pos >= 0].sort().values
            if pos.numel() != shape[d] or not torch.equal(pos, torch.arange(shape[d])):
                layers = sorted({graph._slot(r).layer for r in refs})
                raise FusionError(
                    f"channel tracing is inconsistent for {tensor!r} (dimension {d} of size {shape[d]}, layers "
                    f"{layers}): some channels are claimed twice or by no group; fusion refused"
                )
    for name in graph.output_layers:
        for tensor, dims in graph.tensor_dims.items():
            if tensor.startswith(name + ".") and any(
                graph._slot(r).role == OUT for refs in dims.values() for r in refs
            ):
                raise FusionError(
                    f"output layer {name!r} produces traced channels; it cannot be an output layer"
                )


def _output_slots(dg, skeleton: nn.Module, module_names: dict, param_names: dict) -> dict:
    """Per attention :func:`output_heads_layout` recognises, the slots of the tensors its output channels reach
    (the walk from its output node, as for a layer's output channels: the norm after it, the columns of the
    next layer...): ``{attention: [(SlotSpec, layer, positions[channels, r])]}``."""
    modules = dict(skeleton.named_modules())
    out = {}
    for name, node in getattr(dg, "fusion_attention_outputs", {}).items():
        heads, dv, _ = output_heads_layout(modules[name])
        pruner = dg.get_pruner_of_module(node.module)
        if pruner is None:
            raise FusionError(
                f"attention {name!r}: torch-pruning has no rule for the operation making its output; fusion refused"
            )
        items, mixed = _pruning_group(dg, node.module, pruner.prune_out_channels, list(range(heads * dv)))
        slots, links, _ = _item_slots(items, heads * dv, module_names, param_names)
        if mixed or links:
            raise FusionError(
                f"attention {name!r}: the channels of its output are mixed with each other or read by a grouped "
                "convolution after it; fusion refused"
            )
        out[name] = slots
    return out
