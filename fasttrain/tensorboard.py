"""`--tensorboard`: the run's numbers, first batch and recipe as TensorBoard event files in RUN/tensorboard.

Receives numbers the loop and the session have already read on the host; computes nothing and never
reads the device inside an epoch. `SummaryWriter` writes the event files on its own thread; each call
here builds a small protobuf on the training thread (tens of microseconds), a few per log interval
and per epoch. The x-axis is the run's global optimizer step, origin + (epoch - 1) * steps_per_epoch
+ step, where origin is 0 unless a resume changed the steps per epoch (a new batch or data with
--allow-changes; checkpoints store the global step), so a resumed run continues the same curves in
the same folder (`purge_step` hides what a stopped process logged past the checkpoint it resumed
from).
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator

import torch

from fasttrain.errors import UserError

FOLDER = "tensorboard"
PREVIEW_IMAGES = 32  # images of the first training batch in the grid: 4 rows of 8, at most


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter; a one-line UserError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UserError(f"--tensorboard: cannot import torch.utils.tensorboard ({exc}); install it with "
                        f"pip install tensorboard, or run without --tensorboard") from None
    return SummaryWriter


# per epoch: metrics.jsonl's field -> tag
EPOCH_TAGS = {"train_loss": "train/loss", "train_acc": "train/top1", "val_loss": "val/loss", "val_acc": "val/top1",
              "val_top5": "val/top5", "images_per_sec": "throughput/images_per_sec",
              "data_wait_fraction": "throughput/data_wait_fraction"}
# per log interval: what the loop reads at that step anyway (the loss is the epoch's running mean)
STEP_TAGS = {"loss": "train_step/loss", "images_per_sec": "train_step/images_per_sec", "lr": "train_step/lr"}


class TensorBoardLog:
    """Event files for one process of one run (the main rank's).

    steps_per_epoch and origin fix the global step of epoch e's step k: origin + (e - 1) *
    steps_per_epoch + k; start_step is the global step training starts from (0 for a new run),
    logged events at or past it from an earlier process are superseded. lr_of() gives the learning
    rate of the next step (the optimizer's Python float: no device read).
    """

    def __init__(self, run_path, steps_per_epoch: int, start_step: int = 0, lr_of=lambda: None, origin: int = 0):
        writer_class = summary_writer_class()
        self.path = run_path / FOLDER
        self.steps_per_epoch, self.start_step, self.lr_of = steps_per_epoch, start_step, lr_of
        self.origin = origin
        self.base = 0  # global step before the current epoch's first step
        # a resumed run hides what a stopped process logged after its checkpoint; a new run in a folder
        # that kept a never-checkpointed run's events hides all of them (purge at step 0)
        self.writer = writer_class(str(self.path), purge_step=start_step + 1 if start_step else 0)
        self.first_batch: torch.Tensor | None = None
        self.mean = self.std = None

    # ---- the step observer (fit's observer_for) -----------------------------------------------

    def epoch_base(self, epoch: int) -> int:
        """The global step before `epoch`'s first step."""
        return self.origin + (epoch - 1) * self.steps_per_epoch

    def start_epoch(self, epoch: int) -> "TensorBoardLog":
        self.base = self.epoch_base(epoch)
        return self

    def step(self, done: int, loss: float | None = None, images_per_sec: float | None = None) -> None:
        if loss is None:  # not a log interval: nothing was read from the device
            return
        at = self.base + done
        self.writer.add_scalar(STEP_TAGS["loss"], loss, at)
        if images_per_sec:
            self.writer.add_scalar(STEP_TAGS["images_per_sec"], images_per_sec, at)
        lr = self.lr_of()
        if lr is not None:
            self.writer.add_scalar(STEP_TAGS["lr"], lr, at)

    # ---- per epoch, once per run ----------------------------------------------------------------

    def end_epoch(self, row: dict) -> None:
        """metrics.jsonl's row: its numbers at the epoch's last step; its lr (the rate the epoch began
        with) at the epoch's first."""
        epoch = row["epoch"]
        at = self.epoch_base(epoch) + self.steps_per_epoch
        for field, tag in EPOCH_TAGS.items():
            if row.get(field) is not None:
                self.writer.add_scalar(tag, row[field], at)
        self.writer.add_scalar("lr", row["lr"], self.epoch_base(epoch))
        self.write_first_batch()

    def recipe(self, recipe: dict, command: str, described: dict) -> None:
        """The recipe as a Markdown table, the command line and what the run trains on, as text."""
        table = ["| field | value |", "|---|---|"]
        table += [f"| {k} | {json.dumps(v)} |" for k, v in recipe.items()]
        self.writer.add_text("recipe", "\n".join(table), self.start_step)
        self.writer.add_text("command", f"    {command}", self.start_step)  # indented: a Markdown code block
        self.writer.add_text("run", "\n".join(f"- {k}: {v}" for k, v in described.items()), self.start_step)

    def tap(self, loader, mean: Iterable[float], std: Iterable[float]) -> "FirstBatch":
        """The training loader for fit: the same batches, a copy of the first one's first images kept."""
        self.mean, self.std = tuple(mean), tuple(std)
        return FirstBatch(loader, self)

    def write_first_batch(self) -> None:
        """The kept images, de-normalised, as one grid (at the step training started from); once.
        Called between epochs (or at a saved stop), where reading the device costs the loop nothing."""
        if self.first_batch is None:
            return
        from torchvision.utils import make_grid

        images, self.first_batch = self.first_batch.float().cpu(), None
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        grid = make_grid((images * std + mean).clamp(0, 1), nrow=8, padding=2)
        self.writer.add_image("train/first_batch", grid, self.start_step, dataformats="CHW")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class FirstBatch:
    """A training loader that yields the same batches, keeping a copy of the first batch's first
    PREVIEW_IMAGES images on the device (a copy: DALI reuses its output buffers). A clone on the
    device queues a copy kernel and does not wait for it; the host reads it between epochs."""

    def __init__(self, loader, log: TensorBoardLog):
        self.loader, self.log, self.taken = loader, log, False

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):  # prefetch_batches and anything else the loop asks the loader
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        return batches if self.taken else self._first(batches)

    def _first(self, batches: Iterator) -> Iterator:
        try:
            images, labels = next(batches)
        except StopIteration:
            return
        self.taken = True
        self.log.first_batch = images[:PREVIEW_IMAGES].detach().clone()
        yield images, labels
        yield from batches
