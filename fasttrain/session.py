"""One training run from start (or resume) to finish: wires data, model, loop and outputs together."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import random
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fasttrain import device as dev
from fasttrain import distributed
from fasttrain.data import build_loaders, cap, open_dataset, synthetic_dataset
from fasttrain.data.synthetic import SYNTHETIC_SIZES
from fasttrain.data.index import shown, verify
from fasttrain.errors import RunError, UserError
from fasttrain.models import DEFAULT_CLASSES, build_model, trainable_parameters
from fasttrain.outputs import RunDir, RunWriter, load_checkpoint
from fasttrain.progress import SilentReporter, make_reporter
from fasttrain.recipes import Recipe, override, recipe_from_dict
from fasttrain.train import (EpochRecord, ForwardLoss, Interrupted, NonFiniteLoss, TrainStep, fit, make_optimizer,
                             make_scheduler)


SHOW_SKIPPED = 5  # damaged files named on screen; all of them go to skipped.txt
TIME_PARTS = ("startup_s", "compile_s", "train_s", "eval_s", "outputs_s", "other_s")
# categories of left-out files that --strict refuses (fasttrain/data/index.py names them)
DAMAGE = ("damaged", "empty", "unreadable", "too large")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".ppm", ".pgm")
STOP_CHECK = 20   # under torchrun, ranks agree on a requested stop every this many steps


def _rng_state() -> dict:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss)}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "dali": version("nvidia-dali-cuda130") or version("nvidia-dali-cuda120"),
            "cuda": torch.version.cuda}


def _tuple_state(obj):
    """Python's random state as nested tuples, which torch.load(weights_only=True) accepts."""
    return tuple(_tuple_state(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


class TrainingSession:
    def __init__(self, args: argparse.Namespace, recipe: Recipe, overrides: dict, argv: list[str]):
        self.args, self.argv, self.versions = args, list(argv), versions()
        self.command = shlex.join(["python", "-m", "fasttrain", *argv])
        self.overrides, self.notes, self.skipped = overrides, [], []
        self.reporter, self.stop_signal, self.writer = None, None, None
        self.clock_start = process_start_time()
        self.clock = dict.fromkeys(TIME_PARTS, 0.0)
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
        self.run_dir = RunDir(out)
        if not args.resume and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and self.run_dir.last.exists():
            args.resume = True  # torchrun --max-restarts restarted the job: continue it rather than refuse
        distributed.on_main(self.dist, lambda: self.run_dir.prepare(resume=args.resume), self.device)
        self.checkpoint = load_checkpoint(self.run_dir.last) if args.resume else None
        if self.checkpoint is not None:
            # the checkpoint's recipe, with the flags given on this command line on top
            recipe = override(recipe_from_dict(self.checkpoint["recipe"]), overrides)
        self.recipe = recipe
        self.amp = recipe.amp if recipe.amp is not None else self.device.type == "cuda"
        self.compile = recipe.compile if recipe.compile is not None else self.device.type == "cuda"
        self.precision = dev.choose_precision(self.device, self.amp)
        seed_everything(args.seed)

    # ---- setup ---------------------------------------------------------------------------

    def _dataset(self):
        args, recipe = self.args, self.recipe
        if args.synthetic:
            n_train, n_val = SYNTHETIC_SIZES[args.command]
            classes = args.num_classes or DEFAULT_CLASSES[args.command]
            data = synthetic_dataset(classes, recipe.image_size, n_train, n_val)
        else:
            # rank 0 first: a download happens once, then every other process reads the same files
            open_ = lambda: open_dataset(args.command, args.data, args.val_fraction,  # noqa: E731
                                         max_pixels=args.max_image_pixels)
            opened = distributed.on_main(self.dist, open_, self.device)
            data = opened if self.dist.is_main else open_()
            if args.num_classes is not None and args.num_classes != data.num_classes:
                raise UserError(f"--num-classes {args.num_classes}: the data set has {data.num_classes} classes")
        data = cap(data, args.train_limit, args.val_limit)
        self.notes += data.notes  # what opening the data decided: class folders with no val image, rescaled pixels
        if args.strict and data.kind == "folder":
            # rank 0 decodes first and remembers the verdicts; the other ranks then find them cached
            distributed.on_main(self.dist, lambda: self._strict(data), self.device)
            if not self.dist.is_main:
                self._strict(data)
        if self.checkpoint is not None and list(self.checkpoint["classes"]) != list(data.classes):
            raise UserError(f"{self.run_dir.last}: trained on {len(self.checkpoint['classes'])} classes that differ "
                            f"from the data's {data.num_classes}; resume with the same data set")
        return data

    def _strict(self, data) -> None:
        """--strict: any damaged file that would have been data, and any used file that does not decode
        fully, ends the run with exit 2. A README.txt beside the classes is not damage; a notes.jpg is."""
        damaged = [(p, detail) for p, category, detail in data.left_out
                   if category in DAMAGE or (category == "not an image" and p.suffix.lower() in IMAGE_SUFFIXES)]
        damaged += verify(list(data.train.files) + list(data.val.files), data.root, self.recipe.workers or None)
        if damaged:
            count = f"{len(damaged)} files cannot be used" if len(damaged) > 1 else "1 file cannot be used"
            raise UserError(f"--strict: {count}; first {shown(damaged[0][0])}: {damaged[0][1]} "
                            f"(fix or remove them, or drop --strict to leave them out)")

    def _record_left_out(self) -> None:
        """skipped.txt lists every file of the data folder that is not used, and why; the screen shows
        counts by reason and the first few names."""
        data = self.data
        if not self.dist.is_main or not (data.left_out or data.ignored):
            return
        with open(self.run_dir.path / "skipped.txt", "w", encoding="utf-8", errors="backslashreplace") as f:
            for path, category, detail in data.left_out:
                f.write(f"{shown(path)}\t{category}\t{detail}\n")
            for path, rule in data.ignored:
                f.write(f"{shown(path)}\tignored\t{rule}\n")
        counts = data.file_counts()
        parts = [f"{n} {why}" for why, n in counts["left_out"].items()]
        parts += [f"{n} ignored ({why})" for why, n in counts["ignored"].items()]
        self.notes.append(f"files not used: {', '.join(parts)}; every one listed in "
                          f"{shown(self.run_dir.path / 'skipped.txt')}")
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
        with open(self.run_dir.path / "skipped.txt", "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"{shown(path)}\tdamaged\t{reason}\n")
        if len(self.skipped) <= SHOW_SKIPPED:
            self._say(f"skipped {shown(path)}: {reason}")
        elif len(self.skipped) == SHOW_SKIPPED + 1:
            self._say(f"skipping more damaged files: all in {shown(self.run_dir.path / 'skipped.txt')}")

    def _say(self, text: str) -> None:
        if not self.dist.is_main:
            return
        if self.reporter is not None:
            self.reporter.print(f"note: {text}")
        else:
            print(f"note: {text}", flush=True)

    def _fit_batch_to_data(self) -> None:
        """A recipe's default batch larger than a small (capped) data set shrinks to fit, lr scaled alike.

        A batch size given on the command line is never changed: build_loaders refuses it instead.
        """
        n, batch = len(self.data.train), self.recipe.batch_size
        if self.overrides.get("batch_size") is not None or self.checkpoint is not None or n >= batch:
            return
        fitted = 1 << (n.bit_length() - 1)  # largest power of two that fits
        lr = self.recipe.lr * fitted / batch if self.overrides.get("lr") is None else self.recipe.lr
        self.recipe = dataclasses.replace(self.recipe, batch_size=fitted, lr=lr)
        self.notes.append(f"{n} training images: batch {batch} -> {fitted}, lr scaled to {lr:g}")

    def _model(self, num_classes: int) -> nn.Module:
        # a resumed run takes every weight from its checkpoint: nothing to download
        weights = "none" if self.checkpoint is not None else None
        model = build_model(self.args.command, num_classes, self.recipe, weights=weights)
        return dev.prepare_model(model, self.device, self.recipe.channels_last)

    # ---- the run ----------------------------------------------------------------------------

    def run(self) -> int:
        """Train to the end (0), or until a signal (130/143); raises UserError or RunError."""
        recipe, device = self.recipe, self.device
        dev.configure_backends(device)
        self.data = self._dataset()
        self._fit_batch_to_data()
        recipe = self.recipe
        from fasttrain.data.torch_loader import default_workers

        self.workers = recipe.workers if recipe.workers is not None else default_workers()
        ck = self.checkpoint
        start_epoch = ck["epoch"] + 1 if ck else 1
        start_step = ck.get("step", 0) if ck else 0
        self._record_left_out()
        self.loaders = build_loaders(self.data, recipe, device, self.workers, self.args.seed, start_epoch, start_step,
                                     shard_id=self.dist.rank, num_shards=self.dist.world_size, on_skip=self._skip)
        self.model = self._model(self.data.num_classes)
        # the recipe's lr is for its batch on one GPU; the global batch is world_size times that
        optimizer = make_optimizer(trainable_parameters(self.model),
                                   dataclasses.replace(recipe, lr=recipe.lr * self.dist.world_size),
                                   fused=device.type == "cuda")
        steps = len(self.loaders.train)
        scheduler = make_scheduler(optimizer, recipe, steps)
        scaler = self.precision.grad_scaler()
        self.rows, self.best_acc, self.compile_s = [], -1.0, 0.0
        if ck is not None:
            self.model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            scaler.load_state_dict(ck["scaler"])
            _set_rng_state(ck["rng"])
            self.best_acc = ck["best_val_acc"]
            self.compile_s = ck.get("compile_time_s", 0.0)
            self.rows = self.run_dir.keep_metrics_through(ck["epoch"])
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        parallel = self._parallel(self.model)
        compile_ = dev.compiler(self.compile, recipe.compile_mode)
        # the model and its loss are compiled as one graph for training; the model alone for evaluation
        forward_loss = ForwardLoss(parallel, loss_fn)
        step_fn = TrainStep(compile_(forward_loss) if compile_ else forward_loss, optimizer, scheduler, scaler,
                            self.precision)
        eval_model = compile_(parallel) if compile_ else parallel
        self.writer = RunWriter(self.run_dir) if self.dist.is_main else None

        self.reporter = make_reporter() if self.dist.is_main else SilentReporter()
        self._announce(start_epoch, start_step)
        self.started = time.perf_counter()
        self.clock["startup_s"] = time.time() - self.clock_start
        self.prior_time_s = ck.get("total_time_s", 0.0) if ck else 0.0
        self.status = "running"
        # fp16's GradScaler skips overflowing steps itself: only a long streak means divergence
        patience = 25 if self.precision.name == "fp16" else 1
        with self._signals():
            try:
                fit(step_fn, parallel, eval_model, self.loaders.train, self.loaders.val, self.precision, device,
                    recipe.epochs, start_epoch, start_step, compiled=self.compile,
                    observer_for=lambda epoch: self.reporter.start_epoch(epoch, recipe.epochs, steps),
                    on_epoch_end=self._epoch_end, should_stop=self._should_stop, nonfinite_patience=patience,
                    tally_compiler=compile_)
            except Interrupted as stop:
                return self._stopped(stop.epoch, stop.steps)
            except NonFiniteLoss as bad:
                self.status = "diverged"
                if self.dist.is_main:
                    self._write_summary()
                    self.writer.close()
                self.close()
                last = f"the last good checkpoint is {self.run_dir.last}" if self.run_dir.last.exists() else \
                    "no checkpoint was written yet"
                raise RunError(f"the training loss became NaN or infinite at epoch {bad.epoch}, step {bad.step}; "
                               f"{last}; lower --lr or use a wider precision (--no-amp)") from None
        if self.stop_signal is not None:  # asked to stop during evaluation: the epoch is saved
            return self._stopped(self.rows[-1]["epoch"] + 1 if self.rows else start_epoch, 0)
        self.status = "finished"
        if self.dist.is_main:
            started = time.perf_counter()
            last = self.rows[-1]["epoch"] if self.rows else start_epoch - 1
            if last != recipe.epochs:  # the end is always saved (_epoch_end saved the last epoch already)
                self.writer.checkpoint(self._checkpoint_state(last, 0), best=False)
            self.writer.flush()
            self.clock["outputs_s"] += time.perf_counter() - started
            self._write_summary()  # with the time the last writes took
            self.writer.close()
        self.close()
        if self.dist.is_main:
            self._farewell()
        return 0

    def _parallel(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel under torchrun (SyncBatchNorm first, with --sync-bn); the model itself otherwise."""
        if not self.dist.enabled:
            return model
        if self.args.sync_bn:
            if self.device.type != "cuda":
                raise UserError("--sync-bn needs CUDA: SyncBatchNorm has no CPU implementation")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _should_stop(self, step: int) -> bool:
        """A signal stops the run after the current step; under torchrun every rank agrees at the
        same step (one tiny collective every STOP_CHECK steps, not every step)."""
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
            print("\nstopping after this step and saving last.pt (press Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _stopped(self, epoch: int, steps: int) -> int:
        """Save the state after the last whole step of `epoch`, wait for every write, say how to resume."""
        self.status = "interrupted"
        self.close()
        if not self.dist.is_main:
            return 128 + (self.stop_signal or signal.SIGTERM)
        self.writer.checkpoint(self._checkpoint_state(epoch - 1, steps), best=False)
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
            p.print(f"note: {note}")
        if start_epoch > 1 or start_step:
            p.print(f"resuming {self.run_dir.path} at epoch {start_epoch}" + (f", step {start_step}" if start_step else ""))
        p.print(f"run folder: {self.run_dir.path}")

    def _epoch_end(self, record: EpochRecord) -> None:
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
            return
        started = time.perf_counter()
        self.reporter.end_epoch(row)
        # the writer thread does the writing; this thread only snapshots the checkpoint's tensors
        self.writer.submit(lambda: self.run_dir.append_metrics(row))
        every = self.args.save_every
        if (every and record.epoch % every == 0) or record.epoch == self.recipe.epochs:
            self.writer.checkpoint(self._checkpoint_state(record.epoch, 0), best=best)
        rows, title = list(self.rows), (f"{self.args.command}, recipe {self.recipe.name}, "
                                        f"{dev.device_name(self.device)}" +
                                        (f" x {self.dist.world_size}" if self.dist.enabled else ""))
        self.writer.submit(lambda: self.run_dir.plot_curves(rows, title, self.recipe.label_smoothing))
        self._write_summary()
        clock["outputs_s"] += time.perf_counter() - started

    def _checkpoint_state(self, epoch: int, step: int) -> dict:
        """Everything to continue exactly: `epoch` epochs finished, then `step` steps of the next."""
        rng = _rng_state()
        rng["python"] = _tuple_state(rng["python"])
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch, "step": step,
                "rng": rng, "recipe": dataclasses.asdict(self.recipe), "model_name": self.args.command,
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
        progress display, loaders starting each epoch, closing).
        """
        clock = dict(self.clock)
        clock["wall_s"] = time.time() - self.clock_start
        clock["other_s"] = clock["wall_s"] - sum(clock[k] for k in TIME_PARTS if k != "other_s")
        return {k: round(clock[k], 3) for k in ("wall_s", *TIME_PARTS)}

    def _write_summary(self) -> None:
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
        self.writer.submit(lambda: self.run_dir.write_summary(summary))

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
        if self.reporter is not None:
            self.reporter.close()
            self.reporter = None
        distributed.shutdown()


