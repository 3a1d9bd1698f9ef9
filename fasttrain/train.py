"""The training loop: one epoch, evaluation, and fit over epochs.

One training step (`TrainStep`) is the forward pass and loss (compiled together when compiling),
their backward pass, the optimizer step (fused SGD on CUDA) and the schedule, then the running
sums (`Tally`: loss, correct, the non-finite guard; one compiled kernel when compiling). Sums stay
on the device and are read only at log intervals and epoch ends, so the host never waits for the
GPU inside an epoch. Training batches have a fixed shape; the last evaluation batch is padded to
that shape (padding never counted), so compiled code meets the same graphs every epoch, and
`graphs_compiled` in each epoch's record shows it (Dynamo's own count).
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
    warmup_s: float = 0.0   # steps right after compiling, on batches the loader prefetched meanwhile: untimed
    steps: int = 0          # optimizer steps of this epoch done by the end (counting from 0)
    start_step: int = 0     # where this pass began: > 0 when a run resumed mid-epoch
    interrupted: bool = False  # stopped early on request: the epoch is not finished

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_s / self.seconds if self.seconds > 0 else 0.0


def make_optimizer(params: Iterable[nn.Parameter], recipe: Recipe, fused: bool = False) -> torch.optim.SGD:
    """The recipe's SGD. fused=True (for CUDA) updates every parameter in one kernel per step
    (PyTorch's fused SGD) and unscales fp16 gradients on the device, without a host sync."""
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov,
                           weight_decay=recipe.weight_decay, **({"fused": True} if fused else {}))


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process so far (torch._dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class ForwardLoss(nn.Module):
    """model(images) and the loss, as one module: compiled together, the loss joins the model's graph."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        return self.loss_fn(logits, labels), logits


class Tally:
    """Running sums of an epoch on the device: loss, correct predictions and the non-finite guard.

    update() is a handful of elementwise ops on 0-d tensors; compiled (`compile_with`), they become
    one kernel per step. Nothing is read on the host until `read`.
    """

    def __init__(self, device: torch.device, compile_with: Callable | None = None):
        zeros = lambda dtype: torch.zeros((), device=device, dtype=dtype)  # noqa: E731
        self.loss_sum, self.correct = zeros(torch.float32), zeros(torch.long)
        self.bad_streak, self.worst_streak, self.steps = zeros(torch.long), zeros(torch.long), zeros(torch.long)
        self.first_bad = torch.full((), -1, device=device, dtype=torch.long)
        self._update = compile_with(_tally) if compile_with is not None else _tally

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._update(loss.detach(), logits.detach(), labels, self.loss_sum, self.correct, self.bad_streak,
                     self.worst_streak, self.first_bad, self.steps)


def _tally(loss, logits, labels, loss_sum, correct, bad_streak, worst_streak, first_bad, steps) -> None:
    """In place: step count, streak of non-finite losses and its worst, the first bad step (1-based),
    the loss summed over finite steps (times the batch) and the correct predictions."""
    finite = torch.isfinite(loss)
    steps.add_(1)
    bad_streak.copy_(torch.where(finite, 0, bad_streak + 1))
    worst_streak.copy_(torch.maximum(worst_streak, bad_streak))
    first_bad.copy_(torch.where((first_bad < 0) & ~finite, steps, first_bad))
    loss_sum.add_(torch.where(finite, loss.float(), 0) * labels.shape[0])
    correct.add_((logits.argmax(1) == labels).sum())


class TrainStep:
    """One optimizer step on one batch: forward and loss, backward, optimizer, scheduler, tally.

    forward_loss: ForwardLoss (or its compiled form). The GradScaler is a no-op except with fp16;
    with a fused optimizer it unscales on the device. This is the step the trainer ships and the
    train-step benchmark times.
    """

    def __init__(self, forward_loss: Callable, optimizer: torch.optim.Optimizer, scheduler, scaler, precision):
        self.forward_loss, self.optimizer, self.scheduler = forward_loss, optimizer, scheduler
        self.scaler, self.precision = scaler, precision

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, tally: Tally) -> None:
        with self.precision.autocast():
            loss, logits = self.forward_loss(images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        tally.update(loss, logits, labels)


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


def train_one_epoch(step_fn: TrainStep, loader: Iterable, model: nn.Module, device: torch.device,
                    observer: StepObserver | None = None, log_every: int = 20, first_step_compiles: bool = False,
                    epoch: int = 0, start_step: int = 0, should_stop: Callable[[int], bool] = lambda step: False,
                    nonfinite_patience: int = 1, tally_compiler: Callable | None = None) -> EpochStats:
    """One pass over the loader (from `start_step` when resuming), one `step_fn` per batch.

    With first_step_compiles, the first step (where torch.compile compiles) is timed as compile_s,
    and the steps on batches the loader prefetched while it compiled (`loader.prefetch_batches`)
    as warmup_s: neither counts in the images/s, which would otherwise be inflated by a queue
    filled during compilation. Stops early, after a whole step, when should_stop(step) says so
    (stats.interrupted). Raises NonFiniteLoss when `nonfinite_patience` steps in a row had a NaN or
    infinite loss; with fp16 the GradScaler skips such steps itself, so only a persistent streak
    stops the run. Both are read from the device at log intervals only. Under torchrun the
    epoch's totals are summed over ranks at its end (images/s is then the sum over ranks, timed by
    the slowest).
    """
    model.train()
    tally = Tally(device, tally_compiler)
    seen, timed_images, wait, compile_s, warmup_s, interrupted = 0, 0, 0.0, 0.0, 0.0, False
    untimed = 1 + int(getattr(loader, "prefetch_batches", 0)) if first_step_compiles else 0
    step = start_step
    last_step = len(loader)  # the epoch's last step also gets a log line
    batches = iter(loader)
    synchronize(device)
    start = time.perf_counter()
    while True:
        timing = step >= start_step + untimed
        t = time.perf_counter()
        try:
            images, labels = next(batches)
        except StopIteration:
            break
        if timing:
            wait += time.perf_counter() - t
        step_fn(images, labels, tally)
        n = labels.shape[0]
        seen += n
        step += 1
        if step == start_step + 1 and untimed:  # the compiling step
            synchronize(device)
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
        elif step == start_step + untimed and untimed:  # the prefetched batches are used up: the clock starts
            synchronize(device)
            warmup_s = time.perf_counter() - start
            start = time.perf_counter()
        elif timing:
            timed_images += n
        stop = should_stop(step)
        if step % log_every == 0 or step == last_step or stop:
            if tally.worst_streak.item() >= nonfinite_patience:
                raise NonFiniteLoss(epoch, start_step + int(tally.first_bad.item()))
            if observer is not None:  # this process's numbers; images/s for all, as shards are equal
                elapsed = time.perf_counter() - start
                rate = timed_images * distributed.world_size() / elapsed if elapsed > 0 and timed_images else None
                observer.step(step, (tally.loss_sum / seen).item(), rate)
        elif observer is not None:
            observer.step(step)
        if stop:
            interrupted = True
            break
    synchronize(device)
    seconds = time.perf_counter() - start
    if untimed and not timed_images:  # an epoch too short to leave the warm-up: time what there was
        warmup_s, seconds = warmup_s + seconds, 0.0
    if tally.worst_streak.item() >= nonfinite_patience:
        raise NonFiniteLoss(epoch, start_step + int(tally.first_bad.item()))
    counts = torch.tensor([float(seen), float(timed_images)], device=device, dtype=torch.float64)
    totals = distributed.sum_(torch.cat([tally.loss_sum.double().view(1), tally.correct.double().view(1),
                                         counts])).tolist()
    seconds, wait, compile_s, warmup_s = distributed.max_(torch.tensor([seconds, wait, compile_s, warmup_s],
                                                                       device=device, dtype=torch.float64)).tolist()
    loss_total, correct_total, seen, timed_images = totals
    return EpochStats(loss_total / max(seen, 1), correct_total / max(seen, 1), int(timed_images), seconds,
                      wait, compile_s, warmup_s, steps=step, start_step=start_step, interrupted=interrupted)


@dataclass
class EvalStats:
    loss: float
    acc: float
    top5: float
    images: int
    compile_s: float = 0.0  # the first (compiling) batch
    seconds: float = 0.0    # the whole evaluation, compiling batch included, device-synchronised


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: Precision, device: torch.device,
             batch_size: int, first_batch_compiles: bool = False) -> EvalStats:
    """Every sample exactly once; a short last batch is padded to `batch_size`, padding not counted."""
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    correct5 = torch.zeros((), device=device, dtype=torch.long)
    seen, compile_s = 0, 0.0
    synchronize(device)
    started = time.perf_counter()
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
    synchronize(device)
    return EvalStats(loss_sum / seen, correct / seen, correct5 / seen, int(seen), compile_s,
                     time.perf_counter() - started)


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
    graphs_compiled: int = 0  # graphs Dynamo compiled during this epoch's training and evaluation


class Interrupted(Exception):
    """A stop was requested: training stops with `steps` steps of `epoch` done (0 when the stop came
    during the previous epoch's evaluation: `epoch - 1` whole epochs)."""

    def __init__(self, epoch: int, steps: int):
        super().__init__(f"epoch {epoch}, step {steps}")
        self.epoch, self.steps = epoch, steps


def fit(step_fn: TrainStep, model: nn.Module, eval_model: nn.Module, train_loader, val_loader,
        precision: Precision, device: torch.device, epochs: int, start_epoch: int = 1, start_step: int = 0,
        compiled: bool = False, observer_for: Callable[[int], StepObserver | None] = lambda epoch: None,
        on_epoch_end: Callable[[EpochRecord], None] = lambda record: None,
        should_stop: Callable[[int], bool] = lambda step: False, nonfinite_patience: int = 1,
        tally_compiler: Callable | None = None,
        on_evaluate: Callable[[], None] = lambda: None) -> list[EpochRecord]:
    """Train from `start_epoch` (at `start_step`) to `epochs` (1-based, inclusive); one record per epoch.

    step_fn trains `model` one batch at a time; eval_model (the model, compiled or not) evaluates.
    on_evaluate() is called as each evaluation begins. Raises Interrupted when
    should_stop(step) turns true inside an epoch, after a whole step (Interrupted(epoch, steps)), or
    during an epoch's evaluation and outputs, at the epoch's end (Interrupted(epoch + 1, 0)), unless
    it was the last.
    """
    records = []
    eval_batch = getattr(val_loader, "batch_size", None) or 1
    for epoch in range(start_epoch, epochs + 1):
        first = compiled and epoch == start_epoch
        lr = step_fn.optimizer.param_groups[0]["lr"]
        graphs = graphs_compiled()
        train = train_one_epoch(step_fn, train_loader, model, device, observer_for(epoch), first_step_compiles=first,
                                epoch=epoch, start_step=start_step if epoch == start_epoch else 0,
                                should_stop=should_stop, nonfinite_patience=nonfinite_patience,
                                tally_compiler=tally_compiler)
        if train.interrupted:
            raise Interrupted(epoch, train.steps)
        on_evaluate()
        val = evaluate(eval_model, val_loader, precision, device, eval_batch, first_batch_compiles=first)
        record = EpochRecord(epoch, train, val, float(lr), graphs_compiled() - graphs)
        records.append(record)
        on_epoch_end(record)
        if epoch < epochs and should_stop(0):  # asked during evaluation: stop at the boundary, not a step later
            raise Interrupted(epoch + 1, 0)
    return records
