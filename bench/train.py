"""Training, evaluation and fine-tuning loops.

Progress: a tqdm bar on a terminal; in CI logs (stderr not a TTY) one short line per epoch at most every
few seconds, so logs stay readable and the loop pays no per-batch cost.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from bench.data import DataBundle, LoaderSplit, TensorSplit
from bench.recipes import Execution, Recipe, crop_flip

Split = TensorSplit | LoaderSplit


class Progress:
    """Epoch progress: tqdm on a TTY, else a line every ``every_s`` seconds (and the last epoch)."""

    def __init__(self, total: int, desc: str, *, every_s: float = 5.0, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.every_s = total, desc, every_s
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        if self.tty and total > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True)
        self._last = time.monotonic()

    def update(self, epoch: int, **info: float) -> None:
        text = " ".join(f"{k}={v:.4f}" for k, v in info.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s or epoch == self.total:
            self._last = now
            print(f"[fusebench] {self.desc}: epoch {epoch}/{self.total} {text}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on ``split``."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for x, y in split.batches(batch_size):
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    model.train(was_training)
    return correct / max(n, 1), loss_sum / max(n, 1)


def train_epoch(
    model: nn.Module,
    split: Split,
    opt: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    *,
    recipe: Recipe | None = None,
    scheduler=None,
    execution: Execution | None = None,
    scaler=None,
    trained: nn.Module | None = None,
) -> float:
    """One epoch; returns the mean training loss. With a teacher: KL(student || teacher) at T, times T^2.

    ``recipe``: label smoothing and augmentation; ``scheduler`` is stepped after every optimizer step;
    ``execution``: autocast precision (``scaler``: the fp16 GradScaler); ``trained``: the module to call
    (a compiled / channels-last wrapper of ``model``)."""
    model.train()
    net = trained if trained is not None else model
    device = _device_of(model)
    smoothing = recipe.label_smoothing if recipe is not None else 0.0
    augment = recipe is not None and recipe.augment == "crop_flip"
    autocast = execution.autocast(device) if execution is not None else contextlib.nullcontext()
    total, n = torch.zeros((), device=device), 0
    for x, y in split.batches(batch_size, shuffle=True, generator=generator):
        if augment:
            x = crop_flip(x, generator)
        with autocast:
            out = net(x)
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(x)
                loss = F.kl_div(
                    F.log_softmax(out.float() / temperature, dim=1),
                    F.log_softmax(t_out.float() / temperature, dim=1),
                    reduction="batchmean",
                    log_target=True,
                ) * (temperature**2)
            else:
                loss = F.cross_entropy(out.float(), y, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.detach() * len(y)  # no per-batch host sync
        n += len(y)
    return float(total) / max(n, 1)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def train_model(
    model: nn.Module,
    data: DataBundle,
    recipe: Recipe,
    *,
    seed: int,
    execution: Execution | None = None,
    desc: str = "train",
) -> float:
    """Train from scratch (member recipe) in place. Shuffling and augmentation are seeded so a member is
    reproducible. Returns the training throughput in images per second (0.0 for 0 epochs)."""
    gen = torch.Generator().manual_seed(seed)
    opt = recipe.make_optimizer(model.parameters())
    scheduler = recipe.make_scheduler(opt, _steps_per_epoch(data, recipe))
    execution = execution or Execution()
    trained, scaler = execution.prepare(model), execution.grad_scaler(_device_of(model))
    progress = Progress(recipe.epochs, desc)
    seconds = 0.0
    try:
        for epoch in range(1, recipe.epochs + 1):
            start = _sync_clock(model)
            loss = train_epoch(
                model, data.train, opt, recipe.batch_size, gen,
                recipe=recipe, scheduler=scheduler, execution=execution, scaler=scaler, trained=trained,
            )  # fmt: skip
            seconds += _sync_clock(model) - start
            progress.update(epoch, loss=loss)
    finally:
        progress.close()
    model.eval()
    return recipe.epochs * len(data.train) / seconds if seconds > 0 else 0.0


def _steps_per_epoch(data: DataBundle, recipe: Recipe) -> int:
    return max(1, -(-len(data.train) // recipe.batch_size))


def _sync_clock(model: nn.Module) -> float:
    """perf_counter after the model's device has finished its queued work (CUDA is asynchronous)."""
    device = _device_of(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class FinetuneResult:
    """Per-epoch curves; index 0 is before any fine-tuning (right after fusion)."""

    test_acc: list[float] = field(default_factory=list)
    val_acc: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)  # from epoch 1
    best_epoch: int = 0
    seconds: float = 0.0  # wall time of the whole fine-tune, per-epoch evaluation included
    images_per_s: float = 0.0  # training throughput (training steps only, synchronized on CUDA)

    @property
    def final_acc(self) -> float:
        return self.test_acc[-1]


def finetune(
    model: nn.Module,
    data: DataBundle,
    recipe: Recipe,
    *,
    seed: int,
    execution: Execution | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    epoch_callback: Callable[[int, float], None] | None = None,
    epoch_hook: Callable[[int, FinetuneResult], None] | None = None,
    desc: str = "finetune",
) -> FinetuneResult:
    """Fine-tune in place for ``recipe.epochs`` (0 allowed), evaluating val and test after every epoch.

    The model is selected by validation accuracy (``best_epoch``; ties go to the earlier epoch) and the
    test accuracy at that epoch is reported; the model itself ends in its final state.
    ``epoch_hook(epoch, result)`` (logging) runs for epoch 0 and after every epoch, before
    ``epoch_callback(epoch, val_acc)`` (which may raise to stop, e.g. an Optuna pruner).
    """
    start = time.perf_counter()
    res = FinetuneResult()
    val, _ = evaluate(model, data.val)
    test, _ = evaluate(model, data.test)
    res.val_acc.append(val)
    res.test_acc.append(test)
    if epoch_hook is not None:
        epoch_hook(0, res)
    epochs = recipe.epochs
    if epochs > 0:
        gen = torch.Generator().manual_seed(seed)
        opt = recipe.make_optimizer(model.parameters())
        scheduler = recipe.make_scheduler(opt, _steps_per_epoch(data, recipe))
        execution = execution or Execution()
        trained, scaler = execution.prepare(model), execution.grad_scaler(_device_of(model))
        if teacher is not None:
            teacher.eval()
        progress = Progress(epochs, desc)
        train_seconds = 0.0
        try:
            for epoch in range(1, epochs + 1):
                tick = _sync_clock(model)
                loss = train_epoch(
                    model, data.train, opt, recipe.batch_size, gen, teacher, temperature,
                    recipe=recipe, scheduler=scheduler, execution=execution, scaler=scaler, trained=trained,
                )  # fmt: skip
                train_seconds += _sync_clock(model) - tick
                res.images_per_s = epoch * len(data.train) / train_seconds if train_seconds > 0 else 0.0
                val, _ = evaluate(model, data.val)
                test, _ = evaluate(model, data.test)
                res.train_loss.append(loss)
                res.val_acc.append(val)
                res.test_acc.append(test)
                if val > res.val_acc[res.best_epoch]:
                    res.best_epoch = epoch
                progress.update(epoch, loss=loss, val_acc=val)
                if epoch_hook is not None:
                    epoch_hook(epoch, res)
                if epoch_callback is not None:
                    epoch_callback(epoch, val)
        finally:
            progress.close()
    model.eval()
    res.seconds = time.perf_counter() - start
    return res
