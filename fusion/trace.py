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
import warnings
from collections import OrderedDict
from collections.abc import Iterable

import torch
import torch.nn as nn
import torch_pruning as tp

from . import trace_cache
from .axes import channel_fastest_merges, functional_linears_as_modules, label_axes
from .errors import FusionError
from .groups import ChannelGraph, ChannelGroup, Slot, serial
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
    out = _out_shape(gf, 0)
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
        out.append(_slot(spec, name, pos))
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
                        slots.append(Slot(s.tensor, s.dim, s.role, s.kind, s.is_weight, s.layer, piece))
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


def _channels_as_matrices(dg) -> None:
    """Refuse a model where a layer's pooled output channels, viewed as ``(parts..., rows, columns)``, are
    multiplied as matrices (see :func:`_pooled_split`), e.g. ``(groups, block, block)`` matrices multiplying the
    rows of the feature map: those channels are matrix entries over spatial positions, not channels. (timm's
    BilinearAttnTransform, BAT, does this and is traced by its own knowledge, see
    :func:`fusion.layers.bilinear_transforms_as_blocks`.)"""
    names = {m: n for n, m in dg.model.named_modules()}
    for node in getattr(dg, "fusion_matrices", []):
        out = tuple(int(n) for n in _out_shape(node.grad_fn, 0))
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


def _out_shape(grad_fn, nr: int):
    meta = getattr(grad_fn, "_input_metadata", None)
    if meta is None or nr >= len(meta):
        return None
    return tuple(meta[nr].shape)


def _node_maps(node, nr_or_k: int, side: str, axes: dict | None = None):
    """This node's own channel mapping for one of its edges, as a ``_RangeMap`` from its side of the edge
    outwards (``side="out"``: output ``nr`` of a split, from the split's input channels to the chunk's;
    ``side="in"``: argument ``k`` of a concatenation or the input of a slice, from the edge's channels to the
    node's). ``None``: identity (the operation is not along the channel axis, or not a split/cat/slice).
    Raises ``LookupError`` when the node is one of these but its sizes cannot be read."""
    gf = node.grad_fn
    kind = node.type
    if kind == tp.ops.OPTYPE.SPLIT and side == "out":
        shapes = [_out_shape(gf, i) for i in range(len(gf._input_metadata))]
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
        out = _out_shape(gf, 0)
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
                s = tuple(v.shape) if v is not None else _out_shape(f, nr)
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
        out = _out_shape(node.grad_fn, 0)
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
        shape = tuple(v.shape) if v is not None else _out_shape(f, nr)
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
    out = _out_shape(gf, 0) if gf is not None else None
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
            shape = _out_shape(src.grad_fn, 0) if src.grad_fn is not None else None
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
        out = _out_shape(gf, 0)
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
        out = _out_shape(gf, 0)
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
                ChannelGroup(raw[gi][0], n_root, [_slot(s, n, pos[:, None, :]) for s, n, pos in slots])
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
                slots.append(_slot(spec, name, pos.reshape(n_units, m, -1)))
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
                out = _out_shape(gf, 0)
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
            slots += [
                Slot(n + s.tensor, s.dim, s.role, s.kind, s.is_weight, n + s.layer, s.positions)
                for s in own_group.slots
            ]
        seen = set()
        for s in extras:
            if (s.tensor, s.dim) not in seen:
                seen.add((s.tensor, s.dim))
                slots.append(
                    Slot(
                        s.tensor,
                        s.dim,
                        s.role,
                        s.kind,
                        s.is_weight,
                        s.layer,
                        torch.arange(heads)[:, None, None],
                    )
                )
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


def _slot(spec, layer: str, positions: torch.Tensor) -> Slot:
    return Slot(spec.tensor, spec.dim, spec.role, spec.kind, spec.is_weight, layer, positions)


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
            slots.append(_slot(spec, layer, by_root.reshape(heads, dv, -1)))
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
        slots = [_slot(s, s.layer, s.positions.reshape(heads, hd, -1)) for s in others] + list(own.values())
        groups[gi] = ChannelGroup(g.name, heads, slots, unit_kind="head")
        drop |= {
            other
            for other, og in enumerate(groups)
            if other != gi and og.slots and all((s.tensor, s.dim) in own for s in og.slots)
        }
    return [g for gi, g in enumerate(groups) if gi not in drop]
