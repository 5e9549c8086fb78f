"""Training recipes: schedules equal their closed forms, crop_flip only moves pixels, low precision still
learns, and the member cache key follows exactly the fields that change a member's weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.config import load_config
from bench.members import member_key
from bench.recipes import Execution, Recipe, crop_flip, lr_at_epoch
from bench.train import train_epoch

STEPS = 7


def _lrs_per_epoch(recipe: Recipe) -> list[float]:
    """The learning rate of the first step of every epoch, by actually stepping the scheduler."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = recipe.make_optimizer([p])
    sched = recipe.make_scheduler(opt, STEPS)
    out = []
    for _ in range(recipe.epochs):
        out.append(opt.param_groups[0]["lr"])
        for _ in range(STEPS):
            opt.step()
            if sched is not None:
                sched.step()
    return out


@pytest.mark.parametrize(
    "recipe",
    [
        Recipe(epochs=5, lr=0.1),
        Recipe(epochs=6, lr=0.1, schedule="cosine"),
        Recipe(epochs=8, lr=0.1, schedule="multistep", milestones=(3, 6), gamma=0.2),
        Recipe(epochs=6, lr=0.1, schedule="cosine", warmup_epochs=2),
        Recipe(epochs=6, lr=0.1, schedule="multistep", milestones=(4,), warmup_epochs=1),
        Recipe(epochs=4, lr=0.1, warmup_epochs=2),
    ],
)
def test_schedule_matches_its_closed_form(recipe):
    got = _lrs_per_epoch(recipe)
    want = [lr_at_epoch(recipe, e, STEPS) for e in range(recipe.epochs)]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    if recipe.schedule == "multistep" and not recipe.warmup_epochs:
        assert got == pytest.approx([0.1] * 3 + [0.02] * 3 + [0.004] * 2)


def test_onecycle_rises_then_falls_below_its_start():
    lrs = _lrs_per_epoch(Recipe(epochs=10, lr=0.1, schedule="onecycle"))
    peak = max(range(10), key=lambda e: lrs[e])
    assert 0 < peak < 9 and lrs[-1] < lrs[0] < lrs[peak] <= 0.1 + 1e-9


def test_crop_flip_only_shifts_and_flips_each_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 10, 12, generator=gen) + 0.5  # strictly positive: padding (0) is recognisable
    y = crop_flip(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape
    pad = 4
    flips = 0
    for i in range(len(x)):
        padded = F.pad(x[i], (pad, pad, pad, pad))
        matches = [
            (dy, dx, f)
            for f in (False, True)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(
                y[i],
                (padded[:, dy : dy + 10, dx : dx + 12]).flip(-1)
                if f
                else padded[:, dy : dy + 10, dx : dx + 12],
            )
        ]
        assert matches, f"image {i} is not a shifted (and possibly flipped) copy of its input"
        flips += matches[0][2]
    assert 4 < flips < 28, "about half of the images are flipped"
    signals = torch.rand(8, 1, 40) + 0.5
    shifted = crop_flip(signals, torch.Generator().manual_seed(2))
    for i in range(8):
        padded = F.pad(signals[i], (pad, pad))
        assert any(torch.equal(shifted[i], padded[:, d : d + 40]) for d in range(2 * pad + 1))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_low_precision_training_lowers_the_loss(precision, one_thread):
    from bench.data import TensorSplit

    torch.manual_seed(0)
    x = torch.randn(256, 20)
    y = (x[:, :5].sum(1) > 0).long()
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    recipe = Recipe(epochs=1, lr=0.1, batch_size=32)
    execution = Execution(precision=precision)
    opt = recipe.make_optimizer(model.parameters())
    gen = torch.Generator().manual_seed(0)
    losses = [
        train_epoch(model, TensorSplit(x, y), opt, 32, gen, recipe=recipe, execution=execution)
        for _ in range(6)
    ]
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a cast


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("setting", [{"precision": "fp16"}, {"precision": "bf16", "channels_last": True}])
def test_cuda_execution_paths_learn(setting):
    from bench.data import TensorSplit

    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(256, 3, 8, 8, device=dev)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 2),
    ).to(dev)  # fmt: skip
    recipe = Recipe(epochs=1, lr=0.1, batch_size=32)
    execution = Execution(**setting)
    opt = recipe.make_optimizer(model.parameters())
    trained, scaler = execution.prepare(model), execution.grad_scaler(dev)
    gen = torch.Generator().manual_seed(0)
    split = TensorSplit(x, y)
    losses = [
        train_epoch(
            model, split, opt, 32, gen, recipe=recipe, execution=execution, scaler=scaler, trained=trained
        )
        for _ in range(6)
    ]
    assert losses[-1] < losses[0]


def test_cache_key_follows_the_fields_that_change_weights():
    base = load_config(None)
    key = member_key(base, 1)
    changes_weights = [
        "members.schedule=cosine", "members.nesterov=true", "members.label_smoothing=0.1",
        "members.augment=crop_flip", "members.warmup_epochs=1", "precision=bf16", "members.lr=0.1",
    ]  # fmt: skip
    for override in changes_weights:
        assert member_key(load_config(None, [override]), 1) != key, override
    for override in [
        "channels_last=true",
        "compile=true",
        "finetune.schedule=cosine",
        "finetune.augment=crop_flip",
    ]:
        assert member_key(load_config(None, [override]), 1) == key, override
