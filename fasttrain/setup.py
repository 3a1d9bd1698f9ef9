"""Setting up a run: the data, loaders, model, optimizer and compiled step it trains with, built once.

`set_up` turns the command line, the recipe and (when resuming) the checkpoint into a `RunSetup`,
a plain object the loop (fasttrain/train.py) trains with and the run folder's writer
(fasttrain/outputs.py) describes. It decides nothing about time, signals or files of the run
folder; those belong to fasttrain/session.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from fasttrain import device as dev
from fasttrain import distributed
from fasttrain.data import build_loaders, cap, open_dataset, synthetic_dataset
from fasttrain.data.index import shown, verify
from fasttrain.data.loaders import Loaders
from fasttrain.data.splits import DataSet
from fasttrain.data.synthetic import SYNTHETIC_SIZES
from fasttrain.device import Precision
from fasttrain.errors import UserError
from fasttrain.models import DEFAULT_CLASSES, build_model, trainable_parameters
from fasttrain.recipes import Recipe, recipe_from_dict, value_text
from fasttrain.train import ForwardLoss, TrainStep, lr_factor, make_optimizer, make_scheduler

# categories of left-out files that --strict refuses (fasttrain/data/index.py names them)
DAMAGE = ("damaged", "empty", "unreadable", "too large")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".ppm", ".pgm")


@dataclass
class RunSetup:
    """What one process trains with. `model` is the network itself (its state_dict goes into
    checkpoints); `parallel` is what runs it (DistributedDataParallel under torchrun, else the
    same module); `step` and `eval_model` are the compiled (or eager) training step and
    evaluation forward. Training starts after `start_epoch - 1` whole epochs and `start_step`
    steps of the next one."""

    recipe: Recipe
    device: torch.device
    precision: Precision
    compiled: bool
    data: DataSet
    loaders: Loaders
    workers: int                 # DataLoader processes / DALI threads
    model: nn.Module
    parallel: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step: TrainStep
    eval_model: nn.Module
    compiler: Callable | None    # what compiled `step` and `eval_model`; None when eager
    start_epoch: int
    start_step: int
    notes: list[str]             # what setting up decided, for the user (batch fitted, class folders...)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one training epoch of this process (whole batches only)."""
        return len(self.loaders.train)


# ---- random state: saved in every checkpoint, restored on resume -------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python's, NumPy's, torch's and every CUDA device's generator state, in types that
    torch.load(weights_only=True) accepts (Python's state as nested tuples, NumPy's key as int64)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": _tuple_state(random.getstate()), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss)}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _tuple_state(obj):
    return tuple(_tuple_state(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


# ---- resuming: the same data, the same batch, unless the user says otherwise ------------------

# what a run was started on besides its recipe: saved in every checkpoint, restored on --resume
RUN_FIELDS = ("data", "synthetic", "num_classes", "train_limit", "val_limit", "val_fraction", "seed",
              "max_image_pixels", "strict", "sync_bn")
# recipe fields a resumed run may change freely: they change how fast it trains, not what
FREE_ON_RESUME = ("epochs", "workers", "compile", "compile_mode", "channels_last", "cache_augment")
# what a run records besides, restored on --resume unless given again: free to change, as it
# changes nothing the run trains
KEPT_ON_RESUME = ("tensorboard",)
FLAG = {"data": "--data", "synthetic": "--synthetic", "num_classes": "--num-classes", "train_limit": "--train-limit",
        "val_limit": "--val-limit", "val_fraction": "--val-fraction", "seed": "--seed",
        "max_image_pixels": "--max-image-pixels", "strict": "--strict", "sync_bn": "--sync-bn"}


def run_record(args: argparse.Namespace) -> dict:
    """The run fields of RUN_FIELDS as saved in a checkpoint; the data folder as an absolute path
    (the default root resolved), so a resume from another working directory reads the same files."""
    from fasttrain.data.datasets import default_root

    record = {k: getattr(args, k, None) for k in RUN_FIELDS}
    record.update({k: bool(getattr(args, k, False)) for k in KEPT_ON_RESUME})
    if not args.synthetic:
        record["data"] = str(Path(args.data if args.data is not None else default_root()).resolve())
    return record


def _flag(field: str) -> str:
    return FLAG.get(field, "--" + field.replace("_", "-"))


def scale_lr(recipe: Recipe, base_batch: int, base_lr: float) -> tuple[Recipe, str | None]:
    """The recipe's lr_scaling rule for a batch other than the one `base_lr` was tuned for: linear
    (Goyal et al. 2017, as the fast recipes were derived) gives lr = base_lr * batch / base_batch;
    none (the seed recipes: the report's values) keeps lr. Returns the recipe and a note; the
    caller skips this when --lr was given."""
    if recipe.batch_size == base_batch or recipe.lr_scaling == "none":
        return recipe, None
    lr = base_lr * recipe.batch_size / base_batch
    return (dataclasses.replace(recipe, lr=lr),
            f"batch {recipe.batch_size}: lr scaled to {lr:g} ({base_lr:g} x {recipe.batch_size}/{base_batch}, the "
            f"linear scaling rule; --lr sets it)")


def resume_settings(checkpoint: dict, args: argparse.Namespace, given: set[str], overrides: dict, where: Path,
                    command: str) -> tuple[Recipe, list[str]]:
    """What a resumed run trains with: the checkpoint's recipe and run fields, which `args` takes
    on (it is changed in place), with the flags given on this command line checked against them.

    given: the option names (argparse dests) present on the command line; overrides: the recipe
    fields those flags set (None where not given). A flag that would change the data, the batch or
    the optimisation is refused unless --allow-changes; --epochs may grow, --workers and compiling
    may change; --tensorboard is restored unless given again (--no-tensorboard turns it off).
    Returns the recipe and notes for the user. Raises UserError (one line) for a checkpoint of the
    other model, a finished run, fewer epochs than done, another recipe, a batch change in the
    middle of an epoch, and any refused change.
    """
    last = where / "last.pt"
    held = checkpoint.get("model_name") or checkpoint["recipe"].get("model", command)
    if held != command:
        raise UserError(f"{last} holds a {held} run, not {command}: resume it with "
                        f"python -m fasttrain {held} --out {where} --resume")
    saved = recipe_from_dict(checkpoint["recipe"])
    for field, flag in (("name", "recipe"), ("finetune", "finetune")):
        if flag in given and getattr(args, flag) != getattr(saved, field):
            raise UserError(f"--{flag} {value_text(getattr(args, flag))}: {last} was trained with "
                            f"{flag} {value_text(getattr(saved, field))}; a different recipe is a new run (another --out)")
    allow = getattr(args, "allow_changes", False)
    notes, changed = [], []
    record = checkpoint.get("run")
    for field in RUN_FIELDS if record is not None else ():
        before = record.get(field)
        if field not in given:
            setattr(args, field, Path(before) if field == "data" and before is not None else before)
            if field == "data" and before is not None and not Path(before).exists():
                raise UserError(f"--resume: the run's data folder {before} (saved in {last}) is gone; if it "
                                f"moved, pass --data NEW --allow-changes")
            continue
        now = getattr(args, field)
        if field == "data" and now is not None:
            now = str(Path(now).resolve())
        if now != before:
            changed.append(f"{_flag(field)} {value_text(now)} (was {value_text(before)})")
            if field == "data" and now is not None:
                args.data = Path(now)
    for field in KEPT_ON_RESUME:
        if field not in given:
            setattr(args, field, bool((record or {}).get(field, False)))  # before the field existed: off
    recipe = saved
    for field, value in overrides.items():
        if value is None or value == getattr(saved, field):
            continue
        if field not in FREE_ON_RESUME:
            changed.append(f"{_flag(field)} {value_text(value)} (was {value_text(getattr(saved, field))})")
        recipe = dataclasses.replace(recipe, **{field: value})
    if changed and not allow:
        raise UserError(f"--resume: {'; '.join(changed)} would change what this run trains on; "
                        f"drop {'it' if len(changed) == 1 else 'them'} to continue as it started, "
                        f"or pass --allow-changes")
    if changed:
        notes.append(f"resumed with changes: {'; '.join(changed)}")
    if "lr" not in given:
        recipe, note = scale_lr(recipe, saved.batch_size, saved.lr)
        notes += [note] if note else []
    done, step = checkpoint["epoch"], checkpoint.get("step", 0)
    if changed and step:
        raise UserError(f"{'; '.join(changed)}: {last} was saved in the middle of epoch {done + 1} (step {step} of "
                        f"batch {saved.batch_size}); changes can start only at an epoch boundary: resume without "
                        f"them")
    if recipe.epochs != saved.epochs and recipe.epochs > done:
        notes.append(f"--epochs {recipe.epochs} (was {saved.epochs}): the lr schedule now ends at epoch "
                     f"{recipe.epochs}")
    if recipe.epochs <= done:
        if "epochs" not in given:
            raise UserError(f"the run in {where} finished all {done} epochs; pass --epochs N (more than {done}) "
                            f"to train it further")
        raise UserError(f"--epochs {recipe.epochs}: the run in {where} has finished {done} epochs already; "
                        f"pass more than {done}")
    return recipe, notes


# ---- the pieces ------------------------------------------------------------------------------


def open_data(args: argparse.Namespace, recipe: Recipe, dist: distributed.Dist, device: torch.device,
              checkpoint: dict | None) -> DataSet:
    """The data set of this run, capped by --train-limit/--val-limit; --strict checked.

    Raises UserError for data that cannot be trained on: a class count other than --num-classes,
    damaged files under --strict, classes other than the resumed checkpoint's.
    """
    if args.synthetic:
        n_train, n_val = SYNTHETIC_SIZES[args.command]
        classes = args.num_classes or DEFAULT_CLASSES[args.command]
        data = synthetic_dataset(classes, recipe.image_size, n_train, n_val)
    else:
        # rank 0 first: a download happens once, then every other process reads the same files
        open_ = lambda: open_dataset(args.command, args.data, args.val_fraction,  # noqa: E731
                                     max_pixels=args.max_image_pixels, download=args.download)
        opened = distributed.on_main(dist, open_, device)
        data = opened if dist.is_main else open_()
        if args.num_classes is not None and args.num_classes != data.num_classes:
            raise UserError(f"--num-classes {args.num_classes}: the data set has {data.num_classes} classes")
    data = cap(data, args.train_limit, args.val_limit)
    if data.num_classes < 2:
        only = f" ({shown(data.classes[0])})" if data.classes else ""
        where = (f" (one folder per class under {shown(data.root)})" if data.kind == "folder" and data.root
                 else "")
        raise UserError(f"the data set has {data.num_classes} class{only}: a classifier needs at least 2{where}")
    if args.strict and data.kind == "folder":
        # rank 0 decodes first and remembers the verdicts; the other ranks then find them cached
        distributed.on_main(dist, lambda: check_strict(data, recipe), device)
        if not dist.is_main:
            check_strict(data, recipe)
    if checkpoint is not None and list(checkpoint["classes"]) != list(data.classes):
        raise UserError(f"the checkpoint was trained on {len(checkpoint['classes'])} classes that differ "
                        f"from the data's {data.num_classes}; resume with the same data set")
    return data


def check_strict(data: DataSet, recipe: Recipe) -> None:
    """--strict: any damaged file that would have been data, and any used file that does not decode
    fully, ends the run with exit 2 (UserError). A README.txt beside the classes is not damage; a
    notes.jpg is."""
    damaged = [(p, detail) for p, category, detail in data.left_out
               if category in DAMAGE or (category == "not an image" and p.suffix.lower() in IMAGE_SUFFIXES)]
    damaged += verify(list(data.train.files) + list(data.val.files), data.root, recipe.workers or None)
    if damaged:
        count = f"{len(damaged)} files cannot be used" if len(damaged) > 1 else "1 file cannot be used"
        raise UserError(f"--strict: {count}; first {shown(damaged[0][0])}: {damaged[0][1]} "
                        f"(fix or remove them, or drop --strict to leave them out)")


def fit_batch_to_data(recipe: Recipe, n_train: int, overrides: dict, resuming: bool) -> tuple[Recipe, str | None]:
    """A recipe's default batch larger than a small (capped) data set shrinks to the largest power
    of two that fits, lr scaled linearly with it (unless --lr was given); returns the recipe and a
    note. A batch size given on the command line is never changed: build_loaders refuses it instead."""
    batch = recipe.batch_size
    if overrides.get("batch_size") is not None or resuming or n_train >= batch:
        return recipe, None
    fitted = 1 << (n_train.bit_length() - 1)
    lr = recipe.lr * fitted / batch if overrides.get("lr") is None else recipe.lr
    return (dataclasses.replace(recipe, batch_size=fitted, lr=lr),
            f"{n_train} training images: batch {batch} -> {fitted}, lr scaled to {lr:g}")


def place_schedule(optimizer: torch.optim.Optimizer, scheduler, recipe: Recipe, steps_per_epoch: int, epoch: int,
                   step: int, world_size: int = 1) -> None:
    """Put a resumed run's lr schedule where the run is: `epoch` epochs done and `step` steps of the
    next, counted in steps of this run's batch and data (which --allow-changes may have changed at
    an epoch boundary), towards this recipe's peak lr and over its --epochs. The lr of the first
    step is set too: the checkpoint's holds the old schedule's value (for a finished cosine run, 0)."""
    done = steps_per_epoch * epoch + step
    peak = recipe.lr * world_size
    scheduler.last_epoch = done
    scheduler.base_lrs = [peak for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"] = peak
        group["lr"] = peak * lr_factor(done, recipe, steps_per_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def _parallel(model: nn.Module, dist: distributed.Dist, device: torch.device, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel under torchrun (SyncBatchNorm first, with --sync-bn); the model itself otherwise."""
    if not dist.enabled:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA: SyncBatchNorm has no CPU implementation")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def set_up(args: argparse.Namespace, recipe: Recipe, overrides: dict, checkpoint: dict | None,
           dist: distributed.Dist, device: torch.device,
           on_skip: Callable[[str, Path, str], None] | None = None,
           on_data: Callable[[DataSet], None] | None = None) -> RunSetup:
    """Build everything a run trains with, in order: data, batch fitted to it, loaders (with the
    mean/std pass), model, optimizer, schedule, scaler, then the compiled step; a checkpoint's
    states are loaded into them (its random state too, last, so a resumed run draws the same numbers).

    on_data(data) is called once the data set is known, before the loaders read any image;
    on_skip(split, path, reason) hears of every file found undecodable from then on.
    Raises UserError for input that cannot be trained on.
    """
    amp = recipe.amp if recipe.amp is not None else device.type == "cuda"
    compiled = recipe.compile if recipe.compile is not None else device.type == "cuda"
    precision = dev.choose_precision(device, amp)
    seed_everything(args.seed)
    dev.configure_backends(device)
    data = open_data(args, recipe, dist, device, checkpoint)
    notes = list(data.notes)  # what opening the data decided: class folders with no val image, rescaled pixels
    recipe, fitted = fit_batch_to_data(recipe, len(data.train), overrides, checkpoint is not None)
    notes += [fitted] if fitted else []
    if on_data is not None:
        on_data(data)
    if args.command == "resnet" and not recipe.finetune and recipe.weights == "none" and checkpoint is None:
        notes.append("warning: --weights none without --finetune trains only the head on a random, frozen "
                     "backbone, which cannot learn much; add --finetune to train every layer")
    from fasttrain.data.torch_loader import default_workers

    workers = recipe.workers if recipe.workers is not None else default_workers()
    start_epoch = checkpoint["epoch"] + 1 if checkpoint else 1
    start_step = checkpoint.get("step", 0) if checkpoint else 0
    loaders = build_loaders(data, recipe, device, workers, args.seed, start_epoch, start_step,
                            shard_id=dist.rank, num_shards=dist.world_size, on_skip=on_skip)
    # a resumed run takes every weight from its checkpoint: nothing to download
    model = build_model(args.command, data.num_classes, recipe, weights="none" if checkpoint else None)
    model = dev.prepare_model(model, device, recipe.channels_last)
    # the recipe's lr is for its batch on one GPU; the global batch is world_size times that
    optimizer = make_optimizer(trainable_parameters(model), dataclasses.replace(recipe, lr=recipe.lr * dist.world_size),
                               fused=device.type == "cuda")
    scheduler = make_scheduler(optimizer, recipe, len(loaders.train))
    scaler = precision.grad_scaler()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        place_schedule(optimizer, scheduler, recipe, len(loaders.train), checkpoint["epoch"],
                       checkpoint.get("step", 0), dist.world_size)
    parallel = _parallel(model, dist, device, args.sync_bn)
    compile_ = dev.compiler(compiled, recipe.compile_mode)
    # the model and its loss are compiled as one graph for training; the model alone for evaluation
    forward_loss = ForwardLoss(parallel, nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing))
    step = TrainStep(compile_(forward_loss) if compile_ else forward_loss, optimizer, scheduler, scaler, precision)
    eval_model = compile_(parallel) if compile_ else parallel
    return RunSetup(recipe=recipe, device=device, precision=precision, compiled=compiled, data=data, loaders=loaders,
                    workers=workers, model=model, parallel=parallel, optimizer=optimizer, scheduler=scheduler,
                    scaler=scaler, step=step, eval_model=eval_model, compiler=compile_, start_epoch=start_epoch,
                    start_step=start_step, notes=notes)
