"""A run's folder: metrics.jsonl, summary.json, curves.png and checkpoints, all written safely.

Files that replace earlier versions (checkpoints, summary.json) are written to a temporary file,
fsynced and renamed, so a crash or a full disk leaves the previous version intact. `RunWriter`
does the writing on a background thread, so the training thread only takes a snapshot of the
state and goes on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from fasttrain.errors import UserError

RUN_FILES = ("metrics.jsonl", "last.pt", "summary.json")
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb", **open_args) -> None:
    """write(file) into a temporary sibling of path, fsync it, then rename it over path.

    open_args (encoding, errors, newline) go to the file's open() in text mode.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from the user's group
        with os.fdopen(fd, mode, **open_args) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def folders_to_make(path: Path) -> list[Path]:
    """The folders `path.mkdir(parents=True)` would create, deepest first."""
    return [p for p in [path, *path.parents] if not p.exists()]


def remove_if_empty(folders: list[Path]) -> None:
    """Remove these folders, deepest first, as long as they are empty: a failed step leaves nothing."""
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@contextlib.contextmanager
def _writing(what: str, where: Path):
    """A full disk or a vanished folder: one line for the user, the earlier version kept.

    torch.save reports a failed write as a RuntimeError from its zip writer ("unexpected pos"),
    not an OSError: that is a write failure too, named by the free space left.
    """
    try:
        yield
    except OSError as exc:
        raise UserError(f"cannot write {what} in {where} ({exc.strerror or exc}); the previous {what} is intact") \
            from None
    except RuntimeError as exc:
        if "inline_container" not in str(exc) and "unexpected pos" not in str(exc):
            raise
        try:
            free = shutil.disk_usage(where).free
            why = "No space left on device" if free < 64 * 2**20 else f"the write failed with {free / 2**30:.1f} GiB free"
        except OSError:
            why = "the write failed"
        raise UserError(f"cannot write {what} in {where} ({why}); the previous {what} is intact") from None


class RunDir:
    def __init__(self, path: Path):
        self.path = path
        self.metrics = path / "metrics.jsonl"
        self.summary = path / "summary.json"
        self.curves = path / "curves.png"
        self.last = path / "last.pt"
        self.best = path / "best.pt"
        self.skipped = path / "skipped.txt"
        self.made: list[Path] = []  # folders prepare() created, removed again if the run writes nothing

    def prepare(self, resume: bool) -> None:
        """Create the folder; refuse to overwrite a run unless it is being resumed."""
        if resume and not self.last.is_file():  # checked first: a mistyped --out leaves no folder behind
            if any((self.path / name).exists() for name in RUN_FILES):
                raise UserError(f"--resume: the run in {self.path} stopped before it saved a checkpoint, so it "
                                f"cannot be continued; start it again in another --out (or delete this folder)")
            raise UserError(f"--resume: no checkpoint {self.last}; start a new run without --resume")
        self.made = folders_to_make(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=self.path, prefix=".write-test-")
            probe.close()
        except OSError as exc:
            raise UserError(f"--out {self.path}: cannot write there ({exc.strerror})") from None
        if not resume and any((self.path / name).exists() for name in RUN_FILES):
            if not self.last.is_file():
                raise UserError(f"--out {self.path} holds a run that stopped before it saved a checkpoint; "
                                f"choose another --out (or delete that folder)")
            raise UserError(f"--out {self.path} holds a run already; pass --resume to continue it, "
                            f"or choose another --out")
        if resume:  # temporary files of a process that was killed while writing: never a valid file
            self.remove_temporary()

    def remove_temporary(self) -> None:
        """Delete temporary files of writes that will never finish (a killed process, a second Ctrl-C)."""
        for orphan in self.path.glob(".*.tmp"):
            orphan.unlink(missing_ok=True)

    def remove_if_unused(self) -> None:
        """A run that stopped before writing anything leaves no empty folder it created behind."""
        remove_if_empty(self.made)

    def write_skipped(self, left_out: list[tuple[Path, str, str]], ignored: list[tuple[Path, str]]) -> None:
        """skipped.txt: one line per file of the data folder not used, `path<TAB>category<TAB>why`
        (left out: damaged, not an image, held-out test split...; ignored: the rule that matched)."""
        from fasttrain.data.index import shown

        with open(self.skipped, "w", encoding="utf-8", errors="backslashreplace") as f:
            for path, category, detail in left_out:
                f.write(f"{shown(path)}\t{category}\t{detail}\n")
            for path, rule in ignored:
                f.write(f"{shown(path)}\tignored\t{rule}\n")

    def append_skipped(self, path: Path, reason: str) -> None:
        """A file a loader found undecodable mid-run joins skipped.txt as `damaged`."""
        from fasttrain.data.index import shown

        with open(self.skipped, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"{shown(path)}\tdamaged\t{reason}\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def keep_metrics_through(self, epoch: int) -> list[dict]:
        """On resume: drop rows of epochs after the checkpoint, so each epoch appears once."""
        rows = [row for row in self.read_metrics() if row["epoch"] <= epoch]
        with _writing("metrics.jsonl", self.path):
            atomic_write(self.metrics, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows)), "w")
        return rows

    def append_metrics(self, row: dict) -> None:
        with _writing("metrics.jsonl", self.path), open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        with _writing("summary.json", self.path):
            atomic_write(self.summary, lambda f: json.dump(summary, f, indent=2), "w")

    def save_checkpoint(self, state: dict, best: bool, saved: Callable[[], None] | None = None) -> None:
        """last.pt (and best.pt, a hard link to it, when `best`), atomically; saved() is called as soon
        as last.pt holds `state`. Raises UserError for a failed write, the previous file intact."""
        with _writing("checkpoint", self.path):
            atomic_write(self.last, lambda f: torch.save(state, f))
            if saved is not None:
                saved()
            if best:
                self._link_best()

    def _link_best(self) -> None:
        """best.pt becomes a second name of the last.pt just written: atomic, and no second write."""
        tmp = self.path / ".best.pt.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.last, tmp)
        except OSError:  # file systems without hard links
            shutil.copyfile(self.last, tmp)
        os.replace(tmp, self.best)

    def plot_curves(self, rows: list[dict], title: str, label_smoothing: float = 0.0) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in rows]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
        train_label = f"train (label smoothing {label_smoothing:g})" if label_smoothing else "train"
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o", label=train_label)
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], marker="o", label="validation")
        ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Training loss")
        ax_loss.legend()
        ax_acc.plot(epochs, [100 * r["val_acc"] for r in rows], marker="o", color="tab:green", label="validation")
        ax_acc.plot(epochs, [100 * r["train_acc"] for r in rows], marker=".", color="tab:gray", alpha=0.6,
                    label="train (augmented)")
        ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Validation accuracy")
        ax_acc.legend()
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        fig.suptitle(title)
        with _writing("curves.png", self.path):
            atomic_write(self.curves, lambda f: fig.savefig(f, dpi=120, format="png"))
        plt.close(fig)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable fasttrain checkpoint ({type(exc).__name__})") from None


def _without_frames(exc: BaseException) -> BaseException:
    """`exc` kept to be raised on the training thread, with no traceback in it or in the errors it
    was raised from: their frames would keep the job's closure (a snapshot of the whole training
    state) and, through it, the run alive. The writer thread's traceback stays readable as a note
    (UserError, one line for the user, gets none)."""
    if not isinstance(exc, UserError) and hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note("in fasttrain's writer thread:\n" + "".join(traceback.format_exception(exc)).rstrip())
    pending, seen = [exc], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        error.__traceback__ = None
        pending += [error.__cause__, error.__context__]
    return exc


class RunWriter:
    """Writes a run's outputs on one background thread, in the order they were asked for.

    The training thread hands over a job and goes on; it is blocked only (a) to snapshot a
    checkpoint's tensors (device to host, into buffers reused from one checkpoint to the next) and
    (b) when a checkpoint is asked for while the previous one is still being written: at most one
    is in flight, so snapshots never pile up in memory. `blocked_s` sums both. A job that failed is
    reported, as the UserError it raised, at the next call on the training thread (or at `close`).
    """

    def __init__(self, run_dir: RunDir):
        import queue
        import threading

        self.run_dir = run_dir
        self.blocked_s = 0.0
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._checkpoint_done = threading.Event()
        self._checkpoint_done.set()
        self._buffers: dict[str, torch.Tensor] = {}
        self._abandoned = False
        self._lock = threading.Lock()  # held while a job other than a checkpoint runs
        self.written: tuple[int, int] | None = None  # (epoch, step) of the last checkpoint completely written
        self._thread = threading.Thread(target=self._work, name="fasttrain-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job, done = self._jobs.get()
            if job is None:
                return
            try:
                if done is None:
                    with self._lock:  # checked inside: abandon() then waits for this job, or it never runs
                        if self._error is None and not self._abandoned:
                            job()
                elif self._error is None and not self._abandoned:
                    job()
            except BaseException as exc:  # reported on the training thread
                self._error = _without_frames(exc)
            finally:
                if done is not None:
                    done.set()
                job = done = None  # not held while waiting for the next: a snapshot's closure
                self._jobs.task_done()

    def _raise_failure(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            try:
                raise error
            finally:
                del error  # else this frame, in the error's traceback, holds the error: a cycle that
                # keeps the training frames (model, state) alive until a full garbage collection

    def submit(self, job: Callable[[], None]) -> None:
        """Run job() on the writer thread, after everything submitted before it."""
        self._raise_failure()
        self._jobs.put((job, None))

    def checkpoint(self, state: dict, best: bool) -> None:
        """Snapshot `state` now, write it as last.pt (and best.pt) in the background."""
        import time

        started = time.perf_counter()
        self._checkpoint_done.wait()  # at most one checkpoint in flight
        self._raise_failure()
        snapshot = self._snapshot(state)
        self.blocked_s += time.perf_counter() - started
        self._checkpoint_done.clear()
        def saved() -> None:  # last.pt holds this snapshot from now on
            self.written = (snapshot.get("epoch"), snapshot.get("step", 0))

        def write() -> None:
            self.run_dir.save_checkpoint(snapshot, best, saved=saved)

        self._jobs.put((write, self._checkpoint_done))

    def end_epoch(self, row: dict, rows: list[dict], title: str, label_smoothing: float, state: dict | None,
                  best: bool) -> None:
        """An epoch's outputs, in this order: its metrics line, the checkpoint (when `state` is
        given: snapshot now, written later), curves.png over `rows`. Only the snapshot blocks."""
        self.submit(lambda: self.run_dir.append_metrics(row))
        if state is not None:
            self.checkpoint(state, best=best)
        self.submit(lambda: self.run_dir.plot_curves(rows, title, label_smoothing))

    def _snapshot(self, state, prefix: str = ""):
        """A copy of every tensor in `state` on the host: the training thread may change the originals.

        Copies go into buffers kept from the last checkpoint (safe: the last write has finished
        before a snapshot starts), pinned for CUDA tensors (non-blocking copies, then one
        synchronize). Reusing host buffers spares the page faults of fresh allocations: for the
        seed CNN's 570 MB of weights and momentum that halves the snapshot on the CPU machine.
        """
        if isinstance(state, torch.Tensor):
            on_cuda = state.device.type == "cuda"
            buffer = self._buffers.get(prefix)
            if buffer is None or buffer.shape != state.shape or buffer.dtype != state.dtype:
                buffer = self._buffers[prefix] = torch.empty(state.shape, dtype=state.dtype, pin_memory=on_cuda)
            buffer.copy_(state.detach(), non_blocking=on_cuda)
            return buffer
        if isinstance(state, dict):
            out = {k: self._snapshot(v, f"{prefix}/{k}") for k, v in state.items()}
        elif isinstance(state, (list, tuple)):
            out = type(state)(self._snapshot(v, f"{prefix}/{i}") for i, v in enumerate(state))
        else:
            return state
        if not prefix and torch.cuda.is_available() and any(b.is_pinned() for b in self._buffers.values()):
            torch.cuda.synchronize()  # the pinned copies are complete before the writer reads them
        return out

    @property
    def writing(self) -> bool:
        """A checkpoint write is in progress."""
        return not self._checkpoint_done.is_set()

    def abandon(self) -> None:
        """Run no job not started yet (the process is stopping at once); wait for a small job in
        progress (metrics, plot, summary: never a checkpoint) so a file written next is not
        replaced by it. A checkpoint being written is left to its temporary file."""
        self._abandoned = True
        with self._lock:
            pass

    def flush(self) -> None:
        """Wait for every job so far; raise the first failure."""
        import time

        started = time.perf_counter()
        self._jobs.join()
        self.blocked_s += time.perf_counter() - started
        self._raise_failure()

    def close(self) -> None:
        """Finish every job and stop the thread; raises a failure not reported yet."""
        if self._thread.is_alive():
            self._jobs.join()
            self._jobs.put((None, None))
            self._thread.join()
        self._raise_failure()

    def release(self) -> None:
        """The run is over, however it ended: stop the thread after what is queued (the jobs of an
        abandoned writer are skipped) and drop the host copies of the last checkpoint, as large as
        its state. A write in progress keeps its own snapshot until it ends; program.run still sees
        its thread alive and exits at once."""
        if self._thread.is_alive():
            self._jobs.put((None, None))
        self._buffers.clear()
