"""Linear mode connectivity: accuracy and loss along the straight line between two (aligned) members.

The field's standard diagnostic for alignment methods (Frankle et al. 2020; Entezari et al. 2022; Git
Re-Basin; REPAIR): if member B, permuted into member A's frame, is linearly connected to A, the midpoint is
as good as the endpoints. The *barrier* is the worst shortfall along the path below the straight line
between the endpoints' values: for accuracy ``max_a [(1-a) acc(0) + a acc(1) - acc(a)]``, for loss
``max_a [loss(a) - ((1-a) loss(0) + a loss(1))]`` (0 when the path never falls below that line).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class LinearPath:
    alphas: list[float]
    acc: list[float]
    loss: list[float]

    @property
    def barrier_acc(self) -> float:
        a0, a1 = self.acc[0], self.acc[-1]
        return max(0.0, *((1 - a) * a0 + a * a1 - v for a, v in zip(self.alphas, self.acc)))

    @property
    def barrier_loss(self) -> float:
        l0, l1 = self.loss[0], self.loss[-1]
        return max(0.0, *(v - ((1 - a) * l0 + a * l1) for a, v in zip(self.alphas, self.loss)))


def linear_path(
    model_a: nn.Module,
    model_b: nn.Module,
    evaluate_fn: Callable[[nn.Module], tuple[float, float]],
    alphas: Sequence[float] = ALPHAS,
    transform: Callable[[nn.Module], nn.Module] | None = None,
) -> LinearPath:
    """Evaluate ``(1 - a) * A + a * B`` at every ``a``; ``evaluate_fn(model) -> (accuracy, loss)``;
    ``transform`` (e.g. a statistics repair) is applied to every interior point (the endpoints are the
    members themselves, evaluated as they are)."""
    import fusion

    alphas = [float(a) for a in alphas]
    if not alphas or alphas[0] != 0.0 or alphas[-1] != 1.0 or sorted(alphas) != alphas:
        raise ValueError(f"alphas must rise from 0 to 1, got {alphas}")
    accs, losses = [], []
    for a in alphas:
        if a == 0.0:
            model = model_a
        elif a == 1.0:
            model = model_b
        else:
            model = fusion.interpolate(model_a, model_b, a)
            if transform is not None:
                model = transform(model)
        acc, loss = evaluate_fn(model)
        accs.append(float(acc))
        losses.append(float(loss))
    return LinearPath(alphas, accs, losses)
