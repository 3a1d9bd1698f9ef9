"""The training loop: one epoch, evaluation, and fit over epochs.

Loss and accuracy are summed on the device and read only at log intervals and epoch ends, so
the host never waits for the GPU inside an epoch. Training batches have a fixed shape; the last
evaluation batch is padded to that shape (padding never counted), so a compiled model meets
exactly two graphs: train and eval.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from fasttrain import distributed
from fasttrain.device import Precision, Stopwatch, synchronize
from fasttrain.recipes import Recipe


class StepObserver(Protocol):
    def step(self, done: int, loss: float | None = None, images_per_sec: float | None = None) -> None: ...


@dataclass
class EpochStats:
    loss: float
    acc: float
    images: int            # images in the timed steps
    seconds: float         # timed steps, device-synchronised at both ends
    data_wait_s: float     # host time spent waiting for the next batch
    compile_s: float = 0.0  # first (compiling) step, excluded from the timings above
    steps: int = 0          # optimizer steps of this epoch done by the end (counting from 0)
    start_step: int = 0     # where this pass began: > 0 when a run resumed mid-epoch
    interrupted: bool = False  # stopped early on request: the epoch is not finished

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0


def make_optimizer(params: Iterable[nn.Parameter], recipe: Recipe) -> torch.optim.SGD:
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                           weight_decay=recipe.weight_decay)


def lr_factor(step: int, recipe: Recipe, steps_per_epoch: int) -> float:
    """Multiplier of the peak lr at an optimizer step: linear warm-up, then constant or cosine to 0."""
    warmup = round(recipe.warmup_epochs * steps_per_epoch)
    total = recipe.epochs * steps_per_epoch
    if step < warmup:
        return recipe.warmup_start + (1 - recipe.warmup_start) * step / warmup
    if recipe.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, recipe, steps_per_epoch))


class NonFiniteLoss(Exception):
    """The training loss stayed NaN or infinite: the run cannot go on from these weights."""

    def __init__(self, epoch: int, step: int):
        super().__init__(f"epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, scheduler,
                    scaler: torch.amp.GradScaler, loss_fn: Callable, precision: Precision,
                    device: torch.device, observer: StepObserver | None = None, log_every: int = 20,
                    first_step_compiles: bool = False, epoch: int = 0, start_step: int = 0,
                    should_stop: Callable[[int], bool] = lambda step: False, nonfinite_patience: int = 1) -> EpochStats:
    """One pass over the loader (from `start_step` when resuming).

    Stops early, after a whole step, when should_stop(step) says so (stats.interrupted). Raises
    NonFiniteLoss when `nonfinite_patience` steps in a row had a NaN or infinite loss; with fp16
    the GradScaler skips such steps itself, so only a persistent streak stops the run. Both are
    read from the device at log intervals only. Under torchrun the epoch's totals are summed over
    ranks at its end (images/s is then the sum over ranks, timed by the slowest).
    """
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    bad_streak = torch.zeros((), device=device, dtype=torch.long)
    worst_streak = torch.zeros((), device=device, dtype=torch.long)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    seen, timed_images, wait, compile_s, interrupted = 0, 0, 0.0, 0.0, False
    step = start_step
    last_step = len(loader)  # the epoch's last step also gets a log line
    batches = iter(loader)
    synchronize(device)
    start = time.perf_counter()
    while True:
        compiling = first_step_compiles and step == start_step
        t = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        if not compiling:
            wait += time.perf_counter() - t
        with precision.autocast():
            logits = model(images)
            loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        n = labels.shape[0]
        finite = torch.isfinite(loss.detach())
        bad_streak = torch.where(finite, 0, bad_streak + 1)
        worst_streak = torch.maximum(worst_streak, bad_streak)
        first_bad = torch.where((first_bad < 0) & ~finite, step + 1, first_bad)
        loss_sum += torch.where(finite, loss.detach().float(), 0) * n
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += n
        step += 1
        if compiling:
            synchronize(device)
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
        else:
            timed_images += n
        stop = should_stop(step)
        if step % log_every == 0 or step == last_step or stop:
            if worst_streak.item() >= nonfinite_patience:
                raise NonFiniteLoss(epoch, int(first_bad.item()))
            if observer is not None:  # this process's numbers; images/s for all, as shards are equal
                elapsed = time.perf_counter() - start
                rate = timed_images * distributed.world_size() / elapsed if elapsed > 0 else None
                observer.step(step, (loss_sum / seen).item(), rate)
        elif observer is not None:
            observer.step(step)
        if stop:
            interrupted = True
            break
    synchronize(device)
    seconds = time.perf_counter() - start
    if worst_streak.item() >= nonfinite_patience:
        raise NonFiniteLoss(epoch, int(first_bad.item()))
    counts = torch.tensor([float(seen), float(timed_images)], device=device, dtype=torch.float64)
    totals = distributed.sum_(torch.cat([loss_sum.double().view(1), correct.double().view(1), counts])).tolist()
    seconds, wait, compile_s = distributed.max_(torch.tensor([seconds, wait, compile_s], device=device,
                                                             dtype=torch.float64)).tolist()
    loss_total, correct_total, seen, timed_images = totals
    return EpochStats(loss_total / max(seen, 1), correct_total / max(seen, 1), int(timed_images), seconds,
                      wait, compile_s, steps=step, start_step=start_step, interrupted=interrupted)


@dataclass
class EvalStats:
    loss: float
    acc: float
    top5: float
    images: int
    compile_s: float = 0.0


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: Precision, device: torch.device,
             batch_size: int, first_batch_compiles: bool = False) -> EvalStats:
    """Every sample exactly once; a short last batch is padded to `batch_size`, padding not counted."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    correct5 = torch.zeros((), device=device, dtype=torch.long)
    seen, compile_s = 0, 0.0
    for i, (images, labels) in enumerate(loader):
        n = labels.shape[0]
        if n < batch_size:
            pad = images.new_zeros((batch_size - n, *images.shape[1:]))
            images = torch.cat([images, pad]).contiguous(memory_format=_memory_format(images))
        timing = Stopwatch(device) if first_batch_compiles and i == 0 else contextlib.nullcontext()
        with timing as watch:
            with precision.autocast():
                logits = model(images)[:n].float()
        if watch is not None:
            compile_s = watch.seconds
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        k = min(5, logits.shape[1])
        correct5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum()
        seen += n
    loss_sum, correct, correct5, seen = distributed.sum_(torch.stack(
        [loss_sum.double(), correct.double(), correct5.double(), torch.tensor(float(seen), device=device)])).tolist()
    seen = max(seen, 1)
    return EvalStats(loss_sum / seen, correct / seen, correct5 / seen, int(seen), compile_s)


def _memory_format(images: torch.Tensor) -> torch.memory_format:
    if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


@dataclass
class EpochRecord:
    epoch: int
    train: EpochStats
    val: EvalStats
    lr: float


class Interrupted(Exception):
    """A stop was requested; the epoch in progress reached `steps` steps."""

    def __init__(self, epoch: int, steps: int):
        super().__init__(f"epoch {epoch}, step {steps}")
        self.epoch, self.steps = epoch, steps


def fit(model: nn.Module, train_loader, val_loader, optimizer, scheduler, scaler, loss_fn, precision: Precision,
        device: torch.device, epochs: int, start_epoch: int = 1, start_step: int = 0, compiled: bool = False,
        observer_for: Callable[[int], StepObserver | None] = lambda epoch: None,
        on_epoch_end: Callable[[EpochRecord], None] = lambda record: None,
        should_stop: Callable[[int], bool] = lambda step: False, nonfinite_patience: int = 1) -> list[EpochRecord]:
    """Train from `start_epoch` (at `start_step`) to `epochs` (1-based, inclusive); one record per epoch.

    Raises Interrupted when should_stop(step) turns true inside an epoch, after a whole step.
    """
    records = []
    eval_batch = getattr(val_loader, "batch_size", None) or 1
    for epoch in range(start_epoch, epochs + 1):
        first = compiled and epoch == start_epoch
        lr = optimizer.param_groups[0]["lr"]
        train = train_one_epoch(model, train_loader, optimizer, scheduler, scaler, loss_fn, precision, device,
                                observer_for(epoch), first_step_compiles=first, epoch=epoch,
                                start_step=start_step if epoch == start_epoch else 0, should_stop=should_stop,
                                nonfinite_patience=nonfinite_patience)
        if train.interrupted:
            raise Interrupted(epoch, train.steps)
        val = evaluate(model, val_loader, precision, device, eval_batch, first_batch_compiles=first)
        record = EpochRecord(epoch, train, val, lr)
        records.append(record)
        on_epoch_end(record)
    return records
