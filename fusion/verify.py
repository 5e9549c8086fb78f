"""The permutation self-check that every trace passes before it is used: permuting every channel group at random
(through the same ``ChannelGraph.assemble`` that builds fused models) must leave the model's outputs unchanged
on the example inputs, in float64 to 1e-9 relative (a correct trace changes them only by reassociation; a
missed coupling with a small effect is not hidden by float32 rounding). If not, the group responsible is found
and named, and fusion is refused."""

from __future__ import annotations

import torch
import torch.nn as nn

from .errors import FusionError
from .groups import ChannelGraph
from .state import check_kernels, clear_tensor_caches, full_state, map_inputs, meta_copy

# A correctly traced permutation changes the function only by float reassociation: in float64 that is about
# 1e-13 of the output's scale, so 1e-9 leaves a wide margin and still catches couplings whose effect is small
# (ECA's 1-D convolution across channels of a freshly initialised model moved the float32 outputs by less
# than the 1e-4 that float32 needs).
TOL_FLOAT64 = 1e-9
TOL_FLOAT32 = 1e-4
# A badly conditioned model (a deep random net whose activations grow and cancel) amplifies float64 rounding
# past 1e-9 too. Its amplification is measured, not guessed: the float32 forward differs from the float64 one
# by about eps32 times it, so reassociation in float64 moves the output by about that difference times
# eps64 / eps32 (2e-9). The tolerance is the larger of TOL_FLOAT64 and NOISE_MARGIN times that estimate;
# a missed coupling moves the output by orders of magnitude more (a fraction of it, not 1e-7). Past
# MAX_NOISE_TOL the outputs are rounding noise (float32 is off by more than 50 times their scale) and nothing
# can be verified: refused.
NOISE_MARGIN = 1e3
MAX_NOISE_TOL = 1e-4
_EPS_RATIO = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps


@torch.no_grad()
def _outputs(skeleton: nn.Module, state: dict, inputs):
    clear_tensor_caches(skeleton)  # a cache filled under other weights would be stale
    with check_kernels():
        return torch.func.functional_call(skeleton, state, inputs, strict=False)


def _close(a, b, tol: float = TOL_FLOAT32, floor: float = 1.0) -> bool:
    """``b`` equals ``a`` up to ``tol`` times the largest magnitude of ``a`` (per output tensor), or times
    ``floor`` when that is larger."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return False
        if not a.numel():
            return True
        if not a.is_floating_point():
            return bool(torch.equal(a, b))
        if a.dtype not in (torch.float32, torch.float64):
            tol = max(tol, 2e-2)
        diff = float((a.double() - b.double()).abs().max())
        scale = max(floor, float(a.detach().abs().max()))
        return diff <= tol * scale if scale > 0 else diff == 0.0
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_close(x, y, tol, floor) for x, y in zip(a, b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k], tol, floor) for k in a)
    return True


def _rel_error(a, b) -> float:
    """The largest ``|a - b|`` relative to the largest magnitude of ``a``, over the float tensors of two
    outputs of the same structure."""
    pairs = []
    map_inputs(a, lambda t: pairs.append(t) if t.is_floating_point() else None)
    others = []
    map_inputs(b, lambda t: others.append(t) if t.is_floating_point() else None)
    worst = 0.0
    for x, y in zip(pairs, others):
        scale = float(x.detach().abs().max()) if x.numel() else 0.0
        if scale > 0:
            worst = max(worst, float((x.double() - y.double()).abs().max()) / scale)
    return worst


def _float64_attributes(skeleton: nn.Module) -> None:
    """Cast the plain float tensor attributes of a (meta-copied) skeleton to float64, in place: they compute
    like constants together with the state."""
    for module in skeleton.modules():
        for key, value in list(vars(module).items()):
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
                setattr(module, key, value.double())


def _all_float64(out) -> bool:
    found = []
    map_inputs(out, lambda t: found.append(t.dtype) if t.is_floating_point() else None)
    return all(d == torch.float64 for d in found)


def _to_float64(state: dict) -> dict:
    """``state`` with its float tensors in float64, always new tensors (a float64 member's own tensors must not
    be handed out: the self-check overwrites this copy with permuted states); the others as they are."""
    return {name: t.to(torch.float64, copy=True) if t.is_floating_point() else t for name, t in state.items()}


def _float64_reference(model: nn.Module, state: dict, inputs):
    """``(skeleton, inputs, reference outputs, state)`` in float64, or a reason why the model cannot run in it.
    The float64 copy of the state is returned to be overwritten by the permuted states (see ``assemble``'s
    ``into``)."""
    if not state or not any(t.is_floating_point() for t in state.values()):
        return None, "the model has no float tensors"
    skeleton = meta_copy(model).eval()
    _float64_attributes(skeleton)
    inputs64 = map_inputs(inputs, lambda t: t.double() if t.is_floating_point() else t)
    state64 = _to_float64(state)
    try:
        reference = _outputs(skeleton, state64, inputs64)
    except Exception as exc:  # noqa: BLE001 - e.g. a layer that casts to float32 inside its forward
        return None, f"it fails in float64 ({type(exc).__name__}: {str(exc)[:120]})"
    if not _all_float64(reference):
        return None, "its outputs are not float64 when its state and inputs are (it casts inside its forward)"
    reference = map_inputs(reference, torch.clone)  # an output may alias the state that is overwritten next
    return (skeleton, inputs64, reference, state64), None


def live_parameters(model: nn.Module, state: dict, generator: torch.Generator) -> dict:
    """``state`` with every all-zero float parameter replaced by random values drawn from ``generator`` (new
    tensors; ``state`` and the model are untouched), for the self-check, and for ``fusebench zoo``'s members.

    A fresh timm ResNet's last BatchNorm scale in every block is zero (zero_init_last), so the block's branch
    contributes nothing and a coupling missed inside it would pass the check; a zero bias hides nothing but
    costs nothing to fill. The trace is a property of the architecture, so the check may run at any weights:
    scales and biases get U(0.5, 1.5), matrices N(0, 1 / fan-in). Parameters are only tested with a full read
    when their first entries are zero (trained weights are not)."""
    out = state
    for name, _ in model.named_parameters():
        t = state.get(name)
        if t is None or not t.is_floating_point() or t.numel() == 0:
            continue
        flat = t.reshape(-1)
        if bool(flat[:64].any()) or bool(t.any()):
            continue
        if t.dim() >= 2:
            fill = torch.randn(t.shape, generator=generator) / max(1, t[0].numel()) ** 0.5
        else:
            fill = torch.rand(t.shape, generator=generator) + 0.5
        if out is state:
            out = dict(state)
        out[name] = fill.to(device=t.device, dtype=t.dtype)
    return out


def _moving_every_group(selection):
    """``selection`` with every group of two or more units that a random permutation left in place rolled by one
    instead: a group that does not move is not checked at all (two heads stay in place half the time), and the
    check is what catches a head layout read wrongly."""
    out = []
    for members, units in selection:
        if units.numel() > 1 and torch.equal(units, torch.arange(units.numel())):
            units = units.roll(1)
        out.append((members, units))
    return out


def verify_permutation_invariance(
    model: nn.Module, graph: ChannelGraph, example_inputs, *, seed: int = 0
) -> None:
    """Refuse a trace under which a random permutation of the groups changes the model's function.

    The check runs in float64 with a relative tolerance of :data:`TOL_FLOAT64` (state, plain tensor
    attributes and inputs cast; a float32 value is exact in float64, so a permuted state is gathered from
    the model's tensors straight into float64), so that a coupling with a small effect is not hidden by float32
    rounding. A model that cannot run in float64 is checked in its own precision at :data:`TOL_FLOAT32`; the
    reason is kept on the graph as ``graph.check_precision``.
    """
    state = live_parameters(model, full_state(model), torch.Generator().manual_seed(seed))
    device = next(iter(state.values())).device if state else torch.device("cpu")
    inputs = inputs32 = map_inputs(example_inputs, lambda t: t.to(device))
    ready, why = _float64_reference(model, state, inputs)
    if ready is not None:
        skeleton, inputs, reference, state64 = ready
        tol, floor = TOL_FLOAT64, 0.0  # relative to the output's own scale, however small
        graph.check_precision = "float64"

        def run(selection):
            permuted = graph.assemble([state], selection, dtype=torch.float64, into=state64)
            return _outputs(skeleton, permuted, inputs)
    else:
        skeleton = meta_copy(model).eval()
        try:
            reference = _outputs(skeleton, state, inputs)
        except Exception as exc:  # noqa: BLE001
            raise FusionError(f"the model fails on the example inputs: {type(exc).__name__}: {exc}") from exc
        tol, floor = TOL_FLOAT32, 1.0
        graph.check_precision = f"model precision, tolerance {tol:g}: {why}"

        def run(selection):
            return _outputs(skeleton, graph.assemble([state], selection), inputs)

    gen = torch.Generator().manual_seed(seed)
    permuted = _moving_every_group(graph.random_permutation(gen))
    out = run(permuted)
    if _close(reference, out, tol, floor):
        return
    if ready is not None:  # is the model's own rounding amplified past TOL_FLOAT64? (see NOISE_MARGIN)
        noise = _rel_error(reference, _outputs(meta_copy(model).eval(), state, inputs32))
        tol = max(tol, NOISE_MARGIN * noise * _EPS_RATIO)
        if tol > MAX_NOISE_TOL:
            raise FusionError(
                f"the model's outputs on the example inputs are rounding noise (float32 differs from float64 "
                f"by {noise:.1e} of their scale), so its channel groups cannot be verified; fusion refused "
                "(try the trained model or other example inputs)"
            )
        graph.check_precision = f"float64, tolerance {tol:.1e} (its float32 output is off by {noise:.1e})"
        if _close(reference, out, tol, floor):
            return
    # find the culprit: permute one group at a time
    identity = graph.identity_selection()
    for gi, g in enumerate(graph.groups):
        sel = list(identity)
        sel[gi] = permuted[gi]
        if not _close(reference, run(sel), tol, floor):
            raise FusionError(
                f"channel group rooted at {g.name!r} is not traced completely: permuting it changes the model's "
                "output, so some layer coupled to it was missed; fusion refused (its layers: "
                f"{', '.join(g.layers[:6])}{f' and {len(g.layers) - 6} more' if len(g.layers) > 6 else ''})"
            )
    raise FusionError("permuting the traced channel groups changes the model's output; fusion refused")
