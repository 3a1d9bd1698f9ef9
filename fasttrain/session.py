"""One training run from start (or resume) to finish: the run's identity, its clock, its signals.

Where things happen: `fasttrain.setup.set_up` builds the data, loaders, model, optimizer and the
compiled step; `fasttrain.train.fit` runs the epochs (a batch is made in the loaders, a step runs
in `TrainStep`); the run folder's `RunWriter` (fasttrain/outputs.py) writes checkpoints, metrics,
plots and summary.json on its own thread; `fasttrain.progress` prints. This module connects
them: it decides the run folder and the checkpoint to resume from, keeps the time accounts,
turns Ctrl-C/SIGTERM into a saved stop, and composes what each epoch's outputs say. With
--tensorboard, `fasttrain.tensorboard` gets the same numbers as the display, on the main rank.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fasttrain import device as dev
from fasttrain import distributed
from fasttrain.data.index import shown
from fasttrain.errors import RunError, UserError
from fasttrain.outputs import RunDir, RunWriter, load_checkpoint
from fasttrain.progress import Both, SilentReporter, make_reporter
from fasttrain.recipes import Recipe, get_recipe
from fasttrain.setup import RunSetup, resume_settings, rng_state, run_record, scale_lr, set_up
from fasttrain.train import EpochRecord, Interrupted, NonFiniteLoss, fit


SHOW_SKIPPED = 5  # damaged files named on screen; all of them go to skipped.txt
TIME_PARTS = ("startup_s", "compile_s", "train_s", "eval_s", "outputs_s", "other_s")
STOP_CHECK = 20   # under torchrun, ranks agree on a requested stop every this many steps


def process_start_time() -> float:
    """When this process started, as the OS records it (Unix time, seconds; 10 ms resolution on Linux).

    /proc/self/stat gives the start in clock ticks since boot and /proc/uptime the time since boot,
    so imports and everything before main() are counted. Elsewhere: when this module was imported.
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED


_IMPORTED = time.time()


def versions() -> dict:
    import torchvision

    from fasttrain import DALI_PACKAGES, installed_version

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "dali": installed_version(*DALI_PACKAGES),
            "cuda": torch.version.cuda}


def flags_given(argv: list[str]) -> set[str]:
    """The options present on a command line, as argparse dests (abbreviations and --flag=value
    included): argv parsed again with every default suppressed, so only what was typed remains."""
    from fasttrain.cli import build_parser

    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():  # noqa: SLF001 (argparse has no public walk)
        for action in sub._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


class TrainingSession:
    def __init__(self, args: argparse.Namespace, recipe: Recipe, overrides: dict, argv: list[str]):
        if args.tensorboard:  # refused before anything is read or created, on every rank alike
            from fasttrain.tensorboard import summary_writer_class
            summary_writer_class()
        self.args, self.argv, self.versions = args, list(argv), versions()
        self.command = shlex.join(["python", "-m", "fasttrain", *argv])
        self.overrides, self.notes, self.skipped = overrides, [], []
        self.reporter, self.stop_signal, self.writer, self.tensorboard = None, None, None, None
        self.clock_start = process_start_time()
        self.clock = dict.fromkeys(TIME_PARTS, 0.0)
        self.final_write_s = 0.0  # of outputs_s: the wait after training for the last writes
        self.graphs: list[int] = []  # graphs Dynamo compiled in each epoch of this process
        self.dist = distributed.from_env()
        self.device = distributed.local_device(self.dist, dev.resolve_device(args.device))
        distributed.init(self.dist, self.device)
        # every rank must agree on the run folder: rank 0 names it and prepares it
        out = args.out or Path("runs") / f"{args.command}-{time.strftime('%Y%m%d-%H%M%S')}"
        if self.dist.enabled and args.out is None:
            box = [str(out)]
            torch.distributed.broadcast_object_list(box, src=0)
            out = Path(box[0])
        if args.resume and args.out is None:
            raise UserError("--resume: name the run folder to continue with --out RUN")
        self.run_dir = RunDir(out)
        if not args.resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and self.run_dir.last.exists():
            args.resume = True  # torchrun --max-restarts restarted the job: continue it rather than refuse
        distributed.on_main(self.dist, lambda: self.run_dir.prepare(resume=args.resume), self.device)
        self.checkpoint = load_checkpoint(self.run_dir.last) if args.resume else None
        self.resumed = self.checkpoint is not None
        if self.checkpoint is not None:
            # the checkpoint's recipe and data; flags given again must agree (or --allow-changes)
            recipe, notes = resume_settings(self.checkpoint, args, flags_given(argv), overrides, self.run_dir.path,
                                            args.command)
            self.notes += notes
            if args.tensorboard:  # restored from the checkpoint: the package must still be there
                from fasttrain.tensorboard import summary_writer_class
                summary_writer_class()
        elif overrides.get("batch_size") is not None and overrides.get("lr") is None:
            # the recipe the flags were applied to (cli.base_recipe: a named recipe, or a recipe file)
            base = getattr(args, "recipe_base", None) or get_recipe(args.command, recipe.name, recipe.finetune)
            recipe, note = scale_lr(recipe, base.batch_size, base.lr)
            self.notes += [note] if note else []
        self.recipe = recipe
        self.setup: RunSetup | None = None
        self.status = "setting up"

    # ---- what setting up tells the user and the run folder -------------------------------------

    def _record_left_out(self, data) -> None:
        """skipped.txt lists every file of the data folder that is not used, and why; the screen shows
        counts by reason and the first few names."""
        if not self.dist.is_main or not (data.left_out or data.ignored):
            return
        self.run_dir.write_skipped(data.left_out, data.ignored)
        counts = data.file_counts()
        parts = [f"{n} {why}" for why, n in counts["left_out"].items()]
        parts += [f"{n} ignored ({why})" for why, n in counts["ignored"].items()]
        self.notes.append(f"files not used: {', '.join(parts)}; every one listed in "
                          f"{shown(self.run_dir.skipped)}")
        for path, _, detail in data.left_out[:SHOW_SKIPPED]:
            self.notes.append(f"left out {shown(path)}: {detail}")

    def _skip(self, split: str, path: Path, reason: str) -> None:
        """A file a loader found undecodable: left out from now on, named, and added to skipped.txt."""
        self.data.record_failure(split, path, reason)  # counted, unless build_loaders dropped it already
        if path in self.skipped:  # a loader may meet a file again: named once
            return
        self.skipped.append(path)
        if not self.dist.is_main:
            return
        self.run_dir.append_skipped(path, reason)
        if len(self.skipped) <= SHOW_SKIPPED:
            self._say(f"skipped {shown(path)}: {reason}")
        elif len(self.skipped) == SHOW_SKIPPED + 1:
            self._say(f"skipping more damaged files: all in {shown(self.run_dir.skipped)}")

    def _say(self, text: str) -> None:
        if not self.dist.is_main:
            return
        if self.reporter is not None:
            self.reporter.print(f"note: {text}")
        else:
            print(f"note: {text}", flush=True)

    def _data_known(self, data) -> None:
        self.data = data
        self._record_left_out(data)

    # ---- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        """Train to the end (0), or until a signal (130/143); raises UserError or RunError.

        A run that ends any other way (an error, a second Ctrl-C) leaves summary.json saying so:
        status "failed" or "stopped", never "running".
        """
        try:
            return self._run()
        except BaseException as exc:
            if self.status in ("running", "interrupted", "finished"):  # not "diverged": it said so already
                self._record_end("stopped" if isinstance(exc, KeyboardInterrupt) else "failed", exc)
            raise

    def _record_end(self, status: str, exc: BaseException) -> None:
        """summary.json written now, on this thread, with the status the run ended with."""
        if self.status == "running":  # ended inside an epoch: its time so far is not in any epoch record
            self._unfinished_epoch()
        self.status = status
        if not self.dist.is_main or self.writer is None:
            return
        self.writer.abandon()
        summary = self._summary()
        if status == "failed":
            summary["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        try:
            self.run_dir.write_summary(summary)
        except Exception:  # noqa: BLE001 - the error being reported matters more than the summary
            pass

    def stopped_at_once(self) -> str:
        """The true one-line account of a KeyboardInterrupt: a second Ctrl-C, or one before training."""
        last = self.run_dir.last
        if self.status == "setting up":
            kept = f"; {last} is unchanged" if self.resumed else "; nothing was trained or saved"
            return f"stopped while setting up{kept}"
        written = self.writer.written if self.writer is not None else None
        if written is not None:
            epoch, step = written
            at = f"epoch {epoch + 1}, step {step}" if step else f"the end of epoch {epoch}"
            dropped = " (a newer write in progress was abandoned)" if self.writer.writing else ""
            return f"stopped at once; {last} holds the state at {at}{dropped}"
        if self.resumed:
            return f"stopped at once; {last} still holds the state this run resumed from"
        return "stopped at once, before any checkpoint was written: nothing was saved"

    def _run(self) -> int:
        ck = self.checkpoint
        self.setup = setup = set_up(self.args, self.recipe, self.overrides, ck, self.dist, self.device,
                                    on_skip=self._skip, on_data=self._data_known)
        # the names the rest of this class (and its outputs) use
        self.recipe, self.data, self.loaders, self.model = setup.recipe, setup.data, setup.loaders, setup.model
        self.precision, self.compile, self.workers = setup.precision, setup.compiled, setup.workers
        self.notes = setup.notes + self.notes
        recipe, start_epoch, start_step = setup.recipe, setup.start_epoch, setup.start_step
        self.rows, self.best_acc, self.compile_s = [], -1.0, 0.0
        if ck is not None:
            self.best_acc = ck["best_val_acc"]
            self.compile_s = ck.get("compile_time_s", 0.0)
            self.rows = self.run_dir.keep_metrics_through(ck["epoch"])
        self.prior_time_s = ck.get("total_time_s", 0.0) if ck else 0.0
        # optimizer steps before epoch 1's first, counted so that (epoch - 1) * steps_per_epoch + step
        # + step_origin is the run's global step (TensorBoard's x-axis): 0 unless a resume changed the
        # batch or the data, which changes the steps per epoch (checkpoints before this have none)
        steps = setup.steps_per_epoch
        position = (start_epoch - 1) * steps + start_step
        self.step_origin = (ck.get("global_step", position) if ck else position) - position
        # its weights and optimizer state are in the model and optimizer now: 570 MB for the seed CNN
        self.checkpoint = ck = None
        self.writer = RunWriter(self.run_dir) if self.dist.is_main else None
        self.reporter = make_reporter() if self.dist.is_main else SilentReporter()
        train_loader = self._start_tensorboard() if self.args.tensorboard and self.dist.is_main else setup.loaders.train
        self._announce(start_epoch, start_step)
        self.started = self.epoch_mark = time.perf_counter()
        self.eval_mark: float | None = None  # when the current epoch's evaluation began
        self.outputs_mark: float | None = None  # when the current epoch's outputs began
        self.clock["startup_s"] = time.time() - self.clock_start
        self.status = "running"
        # fp16's GradScaler skips overflowing steps itself: only a long streak means divergence
        patience = 25 if self.precision.name == "fp16" else 1
        with self._signals():
            try:
                fit(setup.step, setup.parallel, setup.eval_model, train_loader, setup.loaders.val,
                    setup.precision, setup.device, recipe.epochs, start_epoch, start_step, compiled=setup.compiled,
                    observer_for=lambda epoch: self._observer(epoch, recipe.epochs, steps),
                    on_epoch_end=self._epoch_end, should_stop=self._should_stop, nonfinite_patience=patience,
                    tally_compiler=setup.compiler, on_evaluate=self._evaluating)
            except Interrupted as stop:
                return self._stopped(stop.epoch, stop.steps)
            except NonFiniteLoss as bad:
                self.status = "diverged"
                self._unfinished_epoch()
                if self.dist.is_main:
                    self.writer.flush()  # a checkpoint in flight is the last good one
                last = f"the last good checkpoint is {self.run_dir.last}" if self.run_dir.last.exists() else \
                    "no checkpoint was written yet"
                error = (f"the training loss became NaN or infinite at epoch {bad.epoch}, step {bad.step}; "
                         f"{last}; lower --lr or use a wider precision (--no-amp)")
                if self.dist.is_main:
                    summary = self._summary()
                    summary["error"] = error
                    self.writer.submit(lambda: self.run_dir.write_summary(summary))
                    self.writer.close()
                self.close()
                raise RunError(error) from None
        # fit returns only after the last epoch (a stop asked for earlier raised Interrupted)
        if self.stop_signal is not None and self.dist.is_main:
            print("the last epoch's training had ended when the stop was asked for: the run is complete",
                  file=sys.stderr)
        self.status = "finished"
        if self.dist.is_main:
            started = time.perf_counter()
            last = self.rows[-1]["epoch"] if self.rows else start_epoch - 1
            if last != recipe.epochs:  # the end is always saved (_epoch_end saved the last epoch already)
                self.writer.checkpoint(self._checkpoint_state(last, 0), best=False)
            self.writer.flush()
            self._close_tensorboard()
            self.clock["outputs_s"] += time.perf_counter() - started
            self.final_write_s = time.perf_counter() - started
            self._write_summary()  # with the time the last writes took
            self.writer.close()
        self.close()
        if self.dist.is_main:
            self._farewell()
        return 0

    def _start_tensorboard(self):
        """RUN/tensorboard's log, continuing at the global step this run starts from, with the recipe
        written; returns the training loader fit should use (the same batches, the first one kept)."""
        from fasttrain.tensorboard import TensorBoardLog

        setup, steps = self.setup, self.setup.steps_per_epoch
        optimizer = setup.optimizer
        self.tensorboard = log = TensorBoardLog(self.run_dir.path, steps,
                                                self.step_origin + (setup.start_epoch - 1) * steps + setup.start_step,
                                                lr_of=lambda: optimizer.param_groups[0]["lr"], origin=self.step_origin)
        log.recipe(dataclasses.asdict(self.recipe), self.command,
                   {"data": self.data.describe(), "device": dev.device_name(self.device),
                    "precision": self.precision.name, "compiled": self.compile, "loader": self.loaders.backend})
        return log.tap(setup.loaders.train, self.loaders.mean, self.loaders.std)

    def _observer(self, epoch: int, epochs: int, steps: int):
        shown = self.reporter.start_epoch(epoch, epochs, steps)
        return shown if self.tensorboard is None else Both(shown, self.tensorboard.start_epoch(epoch))

    def _close_tensorboard(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def _should_stop(self, step: int) -> bool:
        """A signal stops the run after the current step, or at the end of an epoch whose evaluation
        it came in (fit asks with step 0 then); under torchrun every rank agrees at the same step
        (one tiny collective every STOP_CHECK steps, not every step)."""
        if not self.dist.enabled:
            return self.stop_signal is not None
        return step % STOP_CHECK == 0 and distributed.any_(self.stop_signal is not None, self.device)

    def resume_command(self) -> str:
        """This run's own command line, pointed at its folder, with --resume."""
        argv = [a for a in self.argv if a != "--resume"]
        if "--out" not in argv and not any(a.startswith("--out=") for a in argv):
            argv += ["--out", str(self.run_dir.path)]
        return shlex.join(["python", "-m", "fasttrain", *argv, "--resume"])

    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM: finish the step, save, exit 130/143. A second one stops at once."""
        def handler(signum, frame):
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            print("\nstopping after this step or evaluation and saving last.pt (press Ctrl-C again to stop "
                  "at once)",
                  file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _evaluating(self) -> None:
        """fit's call as an epoch's evaluation begins: where its training time ends, should the run
        end before the epoch does."""
        self.eval_mark = time.perf_counter()

    def _unfinished_epoch(self) -> None:
        """A run stopped, failed or diverged inside an epoch: that epoch's steps so far count in
        train_s (its compiling step, if any, included), its evaluation so far in eval_s and its
        outputs so far in outputs_s, since no epoch record times them."""
        now = time.perf_counter()
        if self.outputs_mark is not None:  # ended while writing an epoch's outputs
            self.clock["outputs_s"] += now - self.outputs_mark
        elif self.eval_mark is not None:
            self.clock["train_s"] += self.eval_mark - self.epoch_mark
            self.clock["eval_s"] += now - self.eval_mark
        else:
            self.clock["train_s"] += now - self.epoch_mark
        self.epoch_mark, self.eval_mark, self.outputs_mark = now, None, None

    def _stopped(self, epoch: int, steps: int) -> int:
        """Save the state after the last whole step of `epoch`, wait for every write, say how to resume."""
        self.status = "interrupted"
        self._unfinished_epoch()
        if self.tensorboard is not None:
            self.tensorboard.write_first_batch()  # if no epoch ended: read between steps, training is over
        self.close()
        if not self.dist.is_main:
            return 128 + (self.stop_signal or signal.SIGTERM)
        started = time.perf_counter()
        self.writer.checkpoint(self._checkpoint_state(epoch - 1, steps), best=False)
        self.writer.flush()  # the checkpoint is on disk before the summary's clock stops
        self.clock["outputs_s"] += time.perf_counter() - started
        self.final_write_s = time.perf_counter() - started
        self._write_summary()
        self.writer.close()
        where = f"epoch {epoch}, step {steps}" if steps else f"the end of epoch {epoch - 1}"
        print(f"stopped at {where}; saved {self.run_dir.last}. Resume with: {self.resume_command()}", file=sys.stderr)
        return 128 + (self.stop_signal or signal.SIGTERM)

    def _announce(self, start_epoch: int, start_step: int) -> None:
        r, p = self.recipe, self.reporter
        p.print(f"fasttrain {self.args.command}, recipe {r.name}: {self.data.describe()}")
        p.print(f"device {dev.device_name(self.device)}, {self.precision.name}, "
                f"{'compiled' if self.compile else 'eager'}, {'channels_last' if r.channels_last else 'NCHW'}, "
                f"loader {self.loaders.backend}, batch {r.batch_size}, lr {r.lr:g}, {r.epochs} epochs")
        if self.dist.enabled:
            world = self.dist.world_size
            p.print(f"torchrun: {world} processes; batch {r.batch_size} per process, {r.batch_size * world} global; "
                    f"lr {r.lr:g} x {world} = {r.lr * world:g} (linear scaling with the global batch)"
                    + ("; SyncBatchNorm" if self.args.sync_bn else "; BatchNorm statistics per process"))
        for note in self.notes + self.loaders.notes:
            p.print(note if note.startswith("warning: ") else f"note: {note}")
        if start_epoch > 1 or start_step:
            p.print(f"resuming {self.run_dir.path} at epoch {start_epoch}" + (f", step {start_step}" if start_step else ""))
        p.print(f"run folder: {self.run_dir.path}")

    def _epoch_end(self, record: EpochRecord) -> None:
        # the epoch's time is in its record from here: an end inside this call must not count it again
        self.epoch_mark, self.eval_mark = time.perf_counter(), None
        t, v = record.train, record.val
        self.compile_s += t.compile_s + v.compile_s
        clock = self.clock
        clock["compile_s"] += t.compile_s + v.compile_s
        clock["train_s"] += t.seconds + t.warmup_s
        clock["eval_s"] += v.seconds - v.compile_s
        self.graphs.append(record.graphs_compiled)
        row = {"epoch": record.epoch, "train_loss": t.loss, "train_acc": t.acc, "val_loss": v.loss,
               "val_acc": v.acc, "val_top5": v.top5, "images_per_sec": t.images_per_sec,
               "data_wait_fraction": t.data_wait_fraction, "epoch_time_s": t.seconds, "train_images": t.images,
               "compile_time_s": t.compile_s + v.compile_s, "warmup_s": t.warmup_s, "eval_time_s": v.seconds,
               "graphs_compiled": record.graphs_compiled, "lr": record.lr}
        if t.start_step:
            row["resumed_at_step"] = t.start_step  # train_loss/acc cover the steps after the resume
        if not np.isfinite(t.loss):
            raise UserError(f"epoch {record.epoch}: training loss is {t.loss}; lower --lr or use --no-amp "
                            f"(last good checkpoint: {self.run_dir.last})")
        self.rows.append(row)
        best = v.acc > self.best_acc
        self.best_acc = max(self.best_acc, v.acc)
        if not self.dist.is_main:
            self.epoch_mark = time.perf_counter()
            return
        started = self.outputs_mark = time.perf_counter()
        self.reporter.end_epoch(row)
        if self.tensorboard is not None:
            self.tensorboard.end_epoch(row)
        every = self.args.save_every
        save = bool(every and record.epoch % every == 0) or record.epoch == self.recipe.epochs
        title = (f"{self.args.command}, recipe {self.recipe.name}, {dev.device_name(self.device)}" +
                 (f" x {self.dist.world_size}" if self.dist.enabled else ""))
        self.writer.end_epoch(row, list(self.rows), title, self.recipe.label_smoothing,
                              self._checkpoint_state(record.epoch, 0) if save else None, best=best)
        self._write_summary()
        clock["outputs_s"] += time.perf_counter() - started
        self.epoch_mark, self.outputs_mark = time.perf_counter(), None

    def _checkpoint_state(self, epoch: int, step: int) -> dict:
        """Everything to continue exactly: `epoch` epochs finished, then `step` steps of the next."""
        setup = self.setup
        return {"model": setup.model.state_dict(), "optimizer": setup.optimizer.state_dict(),
                "scheduler": setup.scheduler.state_dict(), "scaler": setup.scaler.state_dict(), "epoch": epoch,
                "step": step, "global_step": self.step_origin + epoch * setup.steps_per_epoch + step,
                "rng": rng_state(), "recipe": dataclasses.asdict(self.recipe), "model_name": self.args.command,
                "run": run_record(self.args),
                "classes": list(self.data.classes), "mean": list(self.loaders.mean), "std": list(self.loaders.std),
                "best_val_acc": self.best_acc, "compile_time_s": self.compile_s,
                "total_time_s": self.prior_time_s + time.perf_counter() - self.started}

    def _times(self) -> dict:
        """Where this process's wall clock went, in seconds: the parts add up to wall_s.

        wall_s runs from the process start as the OS records it; startup_s to the first training
        step (imports, data index, statistics, loaders, model); compile_s the compiling steps and
        batches; train_s the training steps (warm-up steps after compiling included); eval_s
        evaluation; outputs_s the time the training thread spent on checkpoints (their snapshot,
        or waiting for the previous one), metrics, plots and summaries; other_s the rest (the
        progress display, loaders starting each epoch, closing). Not a part: final_write_s, the
        share of outputs_s spent after training waiting for the last writes to reach the disk
        (the final checkpoint, fsynced): bound by the disk, where the rest is the training
        thread blocked between epochs.
        """
        clock = dict(self.clock)
        clock["wall_s"] = time.time() - self.clock_start
        clock["other_s"] = clock["wall_s"] - sum(clock[k] for k in TIME_PARTS if k != "other_s")
        clock["final_write_s"] = self.final_write_s
        return {k: round(clock[k], 3) for k in ("wall_s", *TIME_PARTS, "final_write_s")}

    def _write_summary(self) -> None:
        summary = self._summary()
        self.writer.submit(lambda: self.run_dir.write_summary(summary))

    def _summary(self) -> dict:
        rows = self.rows
        images = sum(r["train_images"] for r in rows)
        seconds = sum(r["epoch_time_s"] for r in rows)
        best = max(rows, key=lambda r: r["val_acc"]) if rows else None
        summary = ({
            "status": self.status, "model": self.args.command, "recipe": dataclasses.asdict(self.recipe),
            "command": self.command, "versions": self.versions, "device": dev.device_name(self.device),
            "precision": self.precision.name, "compiled": self.compile, "loader": self.loaders.backend,
            "workers": self.workers if self.loaders.backend == "torch" else None,
            "world_size": self.dist.world_size, "sync_bn": bool(self.args.sync_bn and self.dist.enabled),
            "data": {"description": self.data.describe(), "kind": self.data.kind, "layout": self.data.layout,
                     "train_images": len(self.data.train), "val_images": len(self.data.val),
                     "classes": self.data.num_classes, "mean": list(self.loaders.mean),
                     "std": list(self.loaders.std)},
            "epochs_completed": rows[-1]["epoch"] if rows else 0,
            "best_val_acc": best["val_acc"] if best else None, "best_epoch": best["epoch"] if best else None,
            "final_val_acc": rows[-1]["val_acc"] if rows else None,
            "final_val_top5": rows[-1]["val_top5"] if rows else None,
            "compile_time_s": self.compile_s, "train_time_s": seconds,
            "total_time_s": self.prior_time_s + time.perf_counter() - self.started,
            "mean_images_per_sec": images / seconds if seconds else None,
            "mean_data_wait_fraction": (sum(r["data_wait_fraction"] * r["epoch_time_s"] for r in rows) / seconds
                                        if seconds else None),
            "skipped_files": len(self.skipped), "files": self.data.file_counts(), "seed": self.args.seed,
            "time": self._times(), "save_every": self.args.save_every,
            "graphs_compiled": sum(self.graphs), "recompiles": sum(self.graphs[1:]) if self.compile else None,
            "determinism": self._determinism(),
        })
        return summary

    def _determinism(self) -> dict:
        """What a rerun with the same --seed reproduces, and what it does not."""
        same = ["model initialisation", "data order of every epoch", "DALI augmentation (seeded pipelines)",
                "DataLoader worker seeds"]
        if self.device.type == "cpu":
            return {"repeatable": True, "same_for_same_seed": same + ["losses, on the same machine and thread count"]}
        return {"repeatable": False, "same_for_same_seed": same,
                "not_bitwise": ["cuDNN autotuning (benchmark=True) picks kernels per run",
                                "atomic adds in convolution and index backward passes",
                                "torch.compile's generated kernels"],
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}

    def _farewell(self) -> None:
        last = self.rows[-1] if self.rows else None
        if last is None:
            return
        t = self._times()
        print(f"done: val acc {100 * last['val_acc']:.2f}% (best {100 * self.best_acc:.2f}%), "
              f"{last['images_per_sec']:,.0f} img/s in the last epoch; outputs in {self.run_dir.path}")
        print(f"time: {t['wall_s']:.1f}s wall = startup {t['startup_s']:.1f}s + compile {t['compile_s']:.1f}s + "
              f"train {t['train_s']:.1f}s + eval {t['eval_s']:.1f}s + outputs {t['outputs_s']:.1f}s + "
              f"other {t['other_s']:.1f}s")

    def close(self) -> None:
        """End the display, TensorBoard and torchrun's process group, and release the loaders'
        pipelines now: the program exits without a final garbage collection (fasttrain/program.py),
        so nothing that holds threads or device memory is left to it."""
        self._close_tensorboard()
        if self.reporter is not None:
            self.reporter.close()
            self.reporter = None
        if self.setup is not None:
            for loader in (self.setup.loaders.train, self.setup.loaders.val):
                getattr(loader, "close", lambda: None)()
        distributed.shutdown()

    def release(self) -> None:
        """Let go of the model, optimizer, loaders, data, the writer's host buffers and its thread,
        however the run ended. The session can outlive the run in a reference cycle (a traceback's
        frames, a bound method); without this, a caller of cli.main() in one process (the tests, a
        notebook) keeps every run's tensors, 1.3 GB for the seed CNN, until a full garbage
        collection, which a process with torch loaded runs rarely."""
        try:
            self.close()
        finally:
            self.setup = self.model = self.loaders = self.data = self.checkpoint = None
            if self.writer is not None:
                self.writer.release()


