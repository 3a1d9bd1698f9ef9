"""Loaders that share one contract, built for a data set and a recipe.

Every loader is an iterable with `len()` that yields `(images, labels)` already on the training
device, images float32 NCHW (channels_last when asked) and normalised, labels int64. Training
loaders shuffle each epoch and drop the partial last batch; evaluation loaders yield every
sample exactly once. The training loop never knows which backend made a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from fasttrain.data.splits import DataSet
from fasttrain.data.synthetic import SyntheticLoader
from fasttrain.errors import UserError
from fasttrain.recipes import Recipe


@dataclass
class Loaders:
    train: Iterable
    val: Iterable
    backend: str          # which loader made the batches: torch, dali, dali-cpu, dali-cache (the cache
                          # through DALI's operators), device-cache (the cache, tensor ops), synthetic
    mean: tuple           # normalisation applied, [0, 1] units
    std: tuple
    notes: list = field(default_factory=list)  # decisions worth telling the user (cache, fallbacks)


def _torch_backend(data: DataSet, recipe: Recipe, device: torch.device, workers: int, seed: int, mean, std,
                   start_epoch: int = 1, start_step: int = 0, shard_id: int = 0, num_shards: int = 1,
                   on_skip=None) -> tuple[Iterable, Iterable, str, list[str]]:
    from fasttrain.data.torch_loader import torch_loader
    from fasttrain.data.transforms import eval_transform, train_transform

    files = data.kind == "folder"  # the DataLoader finds damaged files only mid-epoch: on_skip is the loaders'
    common = dict(batch_size=recipe.batch_size, device=device, workers=workers,
                  channels_last=recipe.channels_last, seed=seed, shard_id=shard_id, num_shards=num_shards)
    notes = [] if recipe.cache != "gpu" else ["--cache gpu applies to the DALI loader only; not used"]
    return (torch_loader(data.train, train_transform(recipe, mean, std, files), train=True, start_epoch=start_epoch,
                         start_step=start_step, **common),
            torch_loader(data.val, eval_transform(recipe, mean, std, files), train=False, **common), "torch", notes)


def _dali_backend(data: DataSet, recipe: Recipe, device: torch.device, workers: int, seed: int, mean, std,
                  start_epoch: int = 1, start_step: int = 0, shard_id: int = 0, num_shards: int = 1,
                  on_skip=None) -> tuple[Iterable, Iterable, str, list[str]]:
    from fasttrain.data.dali_loader import dali_loaders

    return dali_loaders(data, recipe, device, workers, seed, mean, std, shard_id=shard_id, num_shards=num_shards,
                        start_epoch=start_epoch, start_step=start_step, on_skip=on_skip, augment=recipe.cache_augment)


# name -> factory(data, recipe, device, workers, seed, mean, std, start_epoch, start_step, shard_id, num_shards,
#                 on_skip) -> (train, val, variant, notes)
BACKENDS: dict[str, Callable] = {"torch": _torch_backend, "dali": _dali_backend}


def default_backend() -> str:
    """DALI whenever it imports, else the DataLoader baseline."""
    from fasttrain.data.dali_loader import dali_available

    return "dali" if dali_available() else "torch"


def backend_names() -> list[str]:
    from fasttrain.recipes import LOADER_CHOICES

    assert set(LOADER_CHOICES) == {"auto", *BACKENDS}  # the command line's choices, known without importing torch
    return list(LOADER_CHOICES)


def build_loaders(data: DataSet, recipe: Recipe, device: torch.device, workers: int, seed: int,
                  start_epoch: int = 1, start_step: int = 0, shard_id: int = 0, num_shards: int = 1,
                  on_skip: Callable[[str, Path, str], None] | None = None) -> Loaders:
    """Training and evaluation loaders; training starts at (start_epoch, start_step) of the data order.

    With shards (one per torchrun process), each loader serves its own disjoint part of every
    epoch, all with the same number of training steps; evaluation parts together cover every
    sample once. on_skip(split, path, reason) hears of every file found undecodable: here (the
    mean/std pass, the DALI cache) and later mid-epoch (each loader's own `on_skip` list, filled
    here). Files found here are dropped from `data` with their labels; the loaders leave out the rest.
    """
    if len(data.train) // num_shards < recipe.batch_size:
        raise UserError(f"{len(data.train)} training images make no full batch of {recipe.batch_size}; "
                        f"lower --batch-size or raise --train-limit")
    if data.kind == "synthetic":
        from fasttrain.recipes import IMAGENET_MEAN, IMAGENET_STD
        make = lambda split, train: SyntheticLoader(split.shard(shard_id, num_shards, train), recipe.batch_size,  # noqa: E731
                                                    device, train, recipe.channels_last, start_step if train else 0)
        return Loaders(make(data.train, True), make(data.val, False), "synthetic", IMAGENET_MEAN, IMAGENET_STD)
    from fasttrain.data.transforms import normalisation

    name = default_backend() if recipe.loader == "auto" else recipe.loader
    mean, std, bad = normalisation(recipe, data)
    for path, reason in bad:
        data.drop([path], "damaged", reason)
        if on_skip is not None:
            on_skip("train", path, reason)
    train, val, variant, notes = BACKENDS[name](data, recipe, device, workers, seed, mean, std, start_epoch,
                                                start_step, shard_id, num_shards, on_skip)
    for split, loader in (("train", train), ("val", val)):
        if on_skip is not None and hasattr(loader, "on_skip") and name == "torch":
            loader.on_skip.append(lambda path, reason, split=split: on_skip(split, path, reason))
    return Loaders(train, val, variant, mean, std, notes)


def build_eval_loader(split, from_files: bool, recipe: Recipe, device: torch.device, workers: int, mean, std,
                      loader: str = "auto", on_skip: Callable[[Path, str], None] | None = None) -> tuple[Iterable, str]:
    """One evaluation loader (every sample once, in order) for predict and evaluate, and its backend.

    on_skip(path, reason) hears of every file that fails to decode; the loader leaves it out.
    """
    name = default_backend() if loader == "auto" else loader
    if name == "dali":
        from fasttrain.data.dali_loader import dali_loader, variant_name

        return (dali_loader(split, False, recipe, device, workers, 0, mean, std, on_skip=on_skip),
                variant_name(device, cache=False))
    from fasttrain.data.torch_loader import torch_loader
    from fasttrain.data.transforms import eval_transform

    eval_loader = torch_loader(split, eval_transform(recipe, mean, std, from_files), recipe.batch_size, device, False,
                               workers, recipe.channels_last, 0)
    if on_skip is not None:
        eval_loader.on_skip.append(on_skip)
    return eval_loader, "torch"

