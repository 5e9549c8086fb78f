"""Training recipes: one dataclass shared by member training, fine-tuning and profiling.

A recipe is what the member-training and fine-tune sections of the config say about *how* to train: the
optimizer (SGD with optional Nesterov momentum, Adam, AdamW), the learning-rate schedule (constant, cosine,
multistep, one-cycle; optional linear warm-up), label smoothing and on-device augmentation. The schedule is
built from ``torch.optim.lr_scheduler`` classes and stepped once per optimizer step; epoch boundaries of
``multistep`` milestones and warm-up are converted to steps, so the learning rate at the start of epoch e
is the textbook value for that epoch.

Augmentation ``crop_flip`` (random crop with zero padding, horizontal flip; the CIFAR recipe of every
fusion paper) runs on whole batches on the device: one gather, no per-image Python loop. On 1-D signals it
is a random shift only (a flipped signal is not the same class in general).

Precision (``fp32 | bf16 | fp16``), channels-last memory format and ``torch.compile`` are top-level config
keys, not part of a recipe: they change speed, not what is learned (up to rounding), but they are part of
the member cache key because rounding changes the weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

CROP_PADDING = 4  # the allowed schedules, optimizers, augmentations, precisions: bench.config.SCHEMA


@dataclass(frozen=True)
class Recipe:
    epochs: int
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    nesterov: bool = False
    schedule: str = "constant"
    milestones: tuple[int, ...] = field(default_factory=tuple)
    gamma: float = 0.1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    augment: str = "none"

    @classmethod
    def from_section(cls, section: dict, batch_size: int | None = None) -> Recipe:
        """From a ``members`` or ``finetune`` config section (the fine-tune takes the members' batch size)."""
        return cls(
            epochs=section["epochs"],
            optimizer=section["optimizer"],
            lr=section["lr"],
            momentum=section["momentum"],
            weight_decay=section["weight_decay"],
            batch_size=batch_size if batch_size is not None else section["batch_size"],
            nesterov=section.get("nesterov", False),
            schedule=section.get("schedule", "constant"),
            milestones=tuple(section.get("milestones", ())),
            gamma=section.get("gamma", 0.1),
            warmup_epochs=section.get("warmup_epochs", 0),
            label_smoothing=section.get("label_smoothing", 0.0),
            augment=section.get("augment", "none"),
        )

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params,
                lr=self.lr,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
                nesterov=self.nesterov and self.momentum > 0,
            )
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.optimizer!r}")

    def make_scheduler(self, opt: torch.optim.Optimizer, steps_per_epoch: int):
        """A per-step scheduler (or None for a constant rate without warm-up)."""
        from torch.optim import lr_scheduler as ls

        total = max(1, self.epochs * steps_per_epoch)
        warm = min(self.warmup_epochs * steps_per_epoch, total - 1) if self.warmup_epochs else 0
        if self.schedule == "onecycle":  # its own warm-up (pct_start) replaces warmup_epochs
            pct = warm / total if warm else 0.3
            return ls.OneCycleLR(opt, max_lr=self.lr, total_steps=total, pct_start=max(pct, 1e-3))
        main = None
        if self.schedule == "cosine":
            main = ls.CosineAnnealingLR(opt, T_max=max(1, total - warm))
        elif self.schedule == "multistep":
            main = ls.MultiStepLR(
                opt, milestones=[m * steps_per_epoch - warm for m in self.milestones], gamma=self.gamma
            )
        if not warm:
            return main
        warmup = ls.LinearLR(opt, start_factor=1.0 / (warm + 1), end_factor=1.0, total_iters=warm)
        if main is None:
            return warmup
        return ls.SequentialLR(opt, [warmup, main], milestones=[warm])


def lr_at_epoch(recipe: Recipe, epoch: int, steps_per_epoch: int) -> float:
    """The closed form of the schedule: the learning rate of the first step of ``epoch`` (0-based)."""
    import math

    step = epoch * steps_per_epoch
    total = max(1, recipe.epochs * steps_per_epoch)
    warm = min(recipe.warmup_epochs * steps_per_epoch, total - 1) if recipe.warmup_epochs else 0
    if warm and step < warm and recipe.schedule != "onecycle":
        return recipe.lr * (1.0 / (warm + 1) + (1 - 1.0 / (warm + 1)) * step / warm)
    if recipe.schedule == "cosine":
        t = step - warm
        return recipe.lr * (1 + math.cos(math.pi * t / max(1, total - warm))) / 2
    if recipe.schedule == "multistep":
        return recipe.lr * recipe.gamma ** sum(1 for m in recipe.milestones if epoch >= m)
    return recipe.lr


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, padding: int = CROP_PADDING):
    """Random crop (zero padding ``padding``) and horizontal flip of a whole batch, on its device.

    Images (B, C, H, W): each image shifted by its own (dy, dx) in [-padding, padding] and flipped with
    probability 1/2. Signals (B, C, L): shifted only."""
    b = x.shape[0]
    draw = dict(generator=generator, device="cpu")
    if x.dim() == 3:
        length = x.shape[-1]
        padded = F.pad(x, (padding, padding))
        dx = torch.randint(0, 2 * padding + 1, (b,), **draw).to(x.device)
        cols = dx[:, None] + torch.arange(length, device=x.device)
        return padded.gather(2, cols[:, None, :].expand(b, x.shape[1], length))
    if x.dim() != 4:
        raise ValueError(f"crop_flip takes (B, C, H, W) images or (B, C, L) signals, got {tuple(x.shape)}")
    _, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), **draw).to(x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), **draw).to(x.device)
    flip = (torch.rand(b, **draw) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


@dataclass(frozen=True)
class Execution:
    """How training runs: numeric precision (autocast), memory format, compilation."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def from_config(cls, cfg: dict, device: torch.device) -> Execution:
        cl = cfg.get("channels_last", "auto")
        channels_last = device.type == "cuda" if cl == "auto" else bool(cl)
        return cls(cfg.get("precision", "fp32"), channels_last, bool(cfg.get("compile", False)))

    def autocast(self, device: torch.device):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)

    def grad_scaler(self, device: torch.device):
        """A GradScaler for fp16 (its small range underflows gradients without one); None otherwise."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(device.type)

    def prepare(self, model: nn.Module) -> nn.Module:
        """The module to train: channels-last and/or compiled (the original keeps the weights)."""
        if self.channels_last and any(p.dim() == 4 for p in model.parameters()):
            model = model.to(memory_format=torch.channels_last)
        return torch.compile(model) if self.compile else model
