"""A model's state and structure, as every part of fusion reads them: its full state (parameters and buffers), a
copy of its structure on the meta device (no memory; the members are never touched), and calls on inputs that
may be tensors or nested tuples, lists and dicts of them."""

from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.nn as nn

from .errors import FusionError


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """All parameters and buffers (persistent or not) by name, detached, without copying."""
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update({n: b.detach() for n, b in model.named_buffers() if b is not None})
    return state


def attribute_memo(model: nn.Module, tensor_fn) -> dict:
    """A ``copy.deepcopy`` memo for the tensors a model holds outside its parameters and buffers.

    Caches (a dict of tensors, e.g. timm's ``attention_bias_cache`` of LeViT / EfficientFormer) become empty
    dicts: a copy must not return a cached value computed from another model's weights, and a cached tensor
    with autograd history cannot be deep-copied at all. Other plain tensor attributes become
    ``tensor_fn(t.detach())``.
    """
    memo: dict = {}
    for module in model.modules():
        for value in _plain_attributes(module):
            if _is_tensor_cache(value):
                memo[id(value)] = {}
            elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                memo.setdefault(id(value), tensor_fn(value.detach()))
    return memo


def _plain_attributes(module: nn.Module):
    """The values of ``module``'s own attributes, not its parameters, buffers or submodules."""
    return [v for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")]


def _is_tensor_cache(value) -> bool:
    return (
        isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def clear_tensor_caches(model: nn.Module) -> None:
    """Empty every dict-of-tensors cache of ``model`` (see :func:`attribute_memo`)."""
    for module in model.modules():
        for value in _plain_attributes(module):
            if _is_tensor_cache(value):
                value.clear()


def meta_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose tensors live on the meta device (costs no memory)."""
    memo = attribute_memo(model, torch.clone)  # a plain tensor attribute computes like a constant: kept
    for t in list(model.parameters()) + [b for b in model.buffers() if b is not None]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = (
            nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        )
    return copy.deepcopy(model, memo)


def map_inputs(inputs, fn):
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(map_inputs(x, fn) for x in inputs)
    if isinstance(inputs, dict):
        return {k: map_inputs(v, fn) for k, v in inputs.items()}
    return inputs


def call(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


@contextlib.contextmanager
def check_kernels():
    """Kernels for fusion's own forward passes (a batch of one or two examples). On the CPU oneDNN reorders
    every convolution weight into its blocked layout on each call, which for two examples costs more than
    the convolution: timm vgg11, whose 7x7 head convolution holds 103 M weights, runs in 0.41 s instead of
    0.95 s without it. Same results up to rounding; the previous setting is restored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about TF32 on oneDNN whenever the flags are set
        with torch.backends.mkldnn.flags(enabled=False):
            yield


def infer_example_inputs(model: nn.Module):
    """Example inputs for a plain MLP (``nn.Sequential`` whose first parametric layer is Linear)."""
    if isinstance(model, nn.Sequential):
        for layer in model:
            if isinstance(layer, nn.Flatten):
                continue
            if isinstance(layer, nn.Linear):
                p = layer.weight
                return torch.randn(2, layer.in_features, device=p.device, dtype=p.dtype)
            break
    raise FusionError(
        f"example_inputs is required to trace a {type(model).__name__}: pass one batch shaped like the model's "
        "input, e.g. example_inputs=torch.randn(1, 3, 32, 32)"
    )
