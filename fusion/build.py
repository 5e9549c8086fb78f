"""Turning a new state into a module: a copy of the first member's structure holding the new tensors."""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict

import torch
import torch.nn as nn

from .attention import (
    _wrapped_pointwise,
    attention_layout,
    head_major_layout,
    output_heads_layout,
    outside_query_layout,
)
from .errors import FusionError
from .layers import resize_module
from .state import attribute_memo, call, check_kernels, full_state, map_inputs
from .trace import _fingerprint

# widths of all heads together that an attention keeps, and the attribute holding the per-head width each is a
# multiple of (None: the traced head width, the width of each head's values)
_ALL_HEADS_WIDTHS = {
    "attn_dim": None,
    "dim_out": None,
    "out_dim": None,
    "val_attn_dim": None,
    "dh": None,
    "dim_out_qk": "dim_head_qk",
    "dim_out_v": "dim_head_v",
}


def _head_widths(template: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Per attention fusion traces by heads (see ``trace.attention_layout``, ``trace.head_major_layout``,
    ``trace.outside_query_layout`` and ``trace.output_heads_layout``), the layer and dimension that hold ``heads * width`` channels and that width
    (``proj``'s columns per head; the last producer's rows per head where there is no ``proj``), read from the
    template before its tensors are replaced: the fused model keeps the width, its head count follows."""
    widths = {}
    for name, module in template.named_modules():
        layout = attention_layout(module)
        if layout is not None:
            widths[name] = ("proj", 1, layout[1])
        elif (major := head_major_layout(module)) is not None:
            widths[name] = (_wrapped_pointwise(module, "proj")[0], 1, major[2])  # each head's value width
        elif (outside := outside_query_layout(module)) is not None:
            widths[name] = ("proj", 1, outside[1])
        elif (out := output_heads_layout(module)) is not None:
            attr, rows = list(out[2].items())[-1]
            widths[name] = (attr, 0, int((rows >= 0).sum()) // out[0])
    return widths


def _follow_head_count(module: nn.Module, heads: int, width: int) -> None:
    """Make an attention module's bookkeeping follow its new head count ``heads`` (each ``width`` wide): the head
    count under the name it keeps it (``num_heads``, Hiera's ``heads``); the widths of all heads together that
    it keeps (``attn_dim``, Hiera's ``dim_out``, TinyViT's ``out_dim``, LeViT's ``val_attn_dim``,
    EfficientFormerV2's ``dh``; BoTNet's and HaloNet's ``dim_out_qk`` and ``dim_out_v``, multiples of
    ``dim_head_qk`` and ``dim_head_v``: their forwards reshape or split by them); and in its submodules (timm's
    relative position biases ``RelPosBias`` / ``RelPosMlp``) the head count and ``bias_shape = (window, window,
    num_heads)``. Anything left stale makes the fused model fail to run (refused)."""
    key = "num_heads" if hasattr(module, "num_heads") else "heads"
    old = getattr(module, key)
    setattr(module, key, heads)
    for attr, per_head in _ALL_HEADS_WIDTHS.items():
        w = width if per_head is None else getattr(module, per_head, None)
        if (
            isinstance(w, int)
            and isinstance(getattr(module, attr, None), int)
            and getattr(module, attr) == old * w
        ):
            setattr(module, attr, heads * w)
    for sub in list(module.modules())[1:]:
        for attr, value in list(vars(sub).items()):
            if attr in ("num_heads", "heads") and value == old:
                setattr(sub, attr, heads)
            elif attr == "bias_shape" and isinstance(value, tuple) and value and value[-1] == old:
                setattr(sub, attr, value[:-1] + (heads,))


def build_model(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``template``'s structure whose parameters and buffers are ``state`` (no extra copies)."""
    memo = attribute_memo(template, lambda t: t)
    for name, p in template.named_parameters():
        memo[id(p)] = nn.Parameter(state[name], requires_grad=p.requires_grad)
    for name, b in template.named_buffers():
        if b is not None:
            memo[id(b)] = state[name]
    widths = _head_widths(template)
    model = copy.deepcopy(template, memo)
    for name, module in model.named_modules():
        resize_module(module, name)
        if name in widths:  # the fused layer holds the kept heads, each as wide as before
            path, dim, width = widths[name]
            heads = module.get_submodule(path).weight.shape[dim] // width  # (the layer is resized later)
            _follow_head_count(module, heads, width)
    return model.eval()


# fingerprints of fused models that ran: whether a model runs is decided by its structure, its tensors' shapes
# and dtypes, its integer buffers (index tables) and the inputs' shapes, not by its float weights
_RAN: OrderedDict = OrderedDict()


def _run_key(model: nn.Module, example_inputs) -> tuple:
    integers = tuple(
        (name, hashlib.sha1(t.detach().cpu().numpy().tobytes()).hexdigest())
        for name, t in full_state(model).items()
        if not t.is_floating_point() and not t.is_complex() and t.numel() > 1
    )
    return _fingerprint(model, example_inputs, None), integers, str(next(model.parameters()).device)


@torch.no_grad()
def check_runs(model: nn.Module, example_inputs, like: nn.Module | None = None) -> None:
    """The fused model must run on the example inputs; a model that does not is never returned.

    A forward pass reads every weight (for timm vgg11 it is most of a fusion's time), so a model whose run
    key (see ``_RAN``) already ran in this process is not run again, nor one whose run key is that of ``like``
    (the member it was built from): the same structure, tensor shapes and types, index tables and device run
    through the member's own code path, so the fused model runs wherever the member does (only a model NT
    widens or narrows, or whose attributes fusion changed, has a key of its own and is run)."""
    if example_inputs is None:
        return
    key = _run_key(model, example_inputs)
    if key in _RAN or (like is not None and key == _run_key(like, example_inputs)):
        _RAN[key] = True
        _RAN.move_to_end(key)
        return
    device = next(model.parameters()).device
    try:
        with check_kernels():
            call(model.eval(), map_inputs(example_inputs, lambda t: t.to(device)))
    except Exception as exc:  # noqa: BLE001
        raise FusionError(f"the fused model does not run: {type(exc).__name__}: {exc}") from exc
    _RAN[key] = True
    while len(_RAN) > 64:
        _RAN.popitem(last=False)
