"""What a person watching a run sees: a rich progress bar and epoch table, or plain lines in logs.

Receives numbers, computes nothing.
"""

from __future__ import annotations

import sys

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

COLUMNS = [("epoch", "epoch"), ("train loss", "train_loss"), ("train acc", "train_acc"), ("val loss", "val_loss"),
           ("val acc", "val_acc"), ("img/s", "images_per_sec"), ("data wait", "data_wait_fraction"),
           ("time", "epoch_time_s"), ("lr", "lr")]


def _cell(key: str, value) -> str:
    if key in ("train_acc", "val_acc", "data_wait_fraction"):
        return f"{100 * value:.1f}%"
    if key in ("train_loss", "val_loss"):
        return f"{value:.4f}"
    if key == "images_per_sec":
        return f"{value:,.0f}"
    if key == "epoch_time_s":
        return f"{value:.1f}s"
    if key == "lr":
        return f"{value:.3g}"
    return str(value)


class PlainReporter:
    """One line per log interval and per epoch: for logs, CI and pipes."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout

    def print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> "PlainReporter":
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        return self

    def step(self, done: int, loss: float | None = None, images_per_sec: float | None = None) -> None:
        if loss is not None:
            rate = f" {images_per_sec:,.0f} img/s" if images_per_sec else ""
            self.print(f"epoch {self.epoch}/{self.epochs} step {done}/{self.steps} loss {loss:.4f}{rate}")

    def end_epoch(self, row: dict) -> None:
        self.print("  ".join(f"{title} {_cell(key, row[key])}" for title, key in COLUMNS))

    def close(self) -> None:
        pass


class SilentReporter:
    """Shows nothing: every torchrun process but rank 0."""

    def print(self, text: str) -> None:
        pass

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> "SilentReporter":
        return self

    def step(self, done: int, loss: float | None = None, images_per_sec: float | None = None) -> None:
        pass

    def end_epoch(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


class RichReporter:
    """A live epoch table above a per-epoch progress bar with images/s, loss and ETA."""

    def __init__(self, console: Console):
        self.console = console
        self.table = Table(*(title for title, _ in COLUMNS), title="epochs", title_justify="left")
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} img/s"), TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
        self.live = Live(Group(self.table, self.progress), console=console, refresh_per_second=4)
        self.live.start()
        self.task = None

    def print(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> "RichReporter":
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task("train", total=steps, epoch=f"{epoch}/{epochs}", rate="-", loss="-")
        return self

    def step(self, done: int, loss: float | None = None, images_per_sec: float | None = None) -> None:
        fields = {}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if images_per_sec:
            fields["rate"] = f"{images_per_sec:,.0f}"
        self.progress.update(self.task, completed=done, **fields)

    def end_epoch(self, row: dict) -> None:
        self.table.add_row(*(_cell(key, row[key]) for _, key in COLUMNS))

    def close(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        self.live.stop()


class Both:
    """One step observer that passes each call on to two (the display and the TensorBoard log)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def step(self, done: int, loss: float | None = None, images_per_sec: float | None = None) -> None:
        self.first.step(done, loss, images_per_sec)
        self.second.step(done, loss, images_per_sec)


def make_reporter():
    console = Console()
    return RichReporter(console) if console.is_terminal else PlainReporter()
