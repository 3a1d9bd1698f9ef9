"""The recipes' augmentation as torchvision transforms, and the normalisation statistics.

These are the reference semantics: the DALI pipelines must match them (same crop families,
same flip rate, same mean/std), so every op here is named and documented.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from fasttrain.data.decode import decode_failure, open_rgb
from fasttrain.data.splits import ArraySplit, DataSet, FileSplit
from fasttrain.recipes import IMAGENET_MEAN, IMAGENET_STD, Recipe

STATS_SAMPLE = 512  # image-folder mean/std is estimated on this many training images


def _to_normalised_tensor(mean, std) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _fit(size: int) -> list:
    """Files of any size -> a size x size image, as the CNN's 32 px input needs."""
    return [v2.Resize(size), v2.CenterCrop(size)]


def train_transform(recipe: Recipe, mean, std, from_files: bool) -> v2.Compose:
    if recipe.model == "cnn":
        ops = _fit(recipe.image_size) if from_files else []
        # pad by zeros, then a random size x size window: the report's RandomCrop(32, padding=4)
        ops += [v2.RandomCrop(recipe.image_size, padding=recipe.crop_padding)]
    else:
        # area 0.08-1 of the image, aspect 3/4-4/3, resized to image_size (bilinear, antialiased)
        ops = [v2.RandomResizedCrop(recipe.image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))]
    ops += [v2.RandomHorizontalFlip(p=0.5)]
    return v2.Compose(ops + _to_normalised_tensor(mean, std))


def eval_transform(recipe: Recipe, mean, std, from_files: bool) -> v2.Compose:
    if recipe.model == "cnn":
        ops = _fit(recipe.image_size) if from_files else []
    else:
        ops = [v2.Resize(recipe.eval_resize), v2.CenterCrop(recipe.image_size)]
    return v2.Compose(ops + _to_normalised_tensor(mean, std))


def dataset_mean_std(split: ArraySplit | FileSplit, image_size: int) -> tuple[tuple, tuple, list[tuple[Path, str]]]:
    """Per-channel mean and std of the training images, in [0, 1] units, and the files that failed.

    Arrays: every pixel, summed in chunks of float64 (no full float copy of the data set). Files:
    STATS_SAMPLE images drawn at random, decoded by the shared decode policy and fitted to
    image_size; a file that fails to decode is returned as (path, reason) and left out of the
    statistics, for the caller to drop from the data set.
    """
    total, squares, count, bad = np.zeros(3), np.zeros(3), 0, []

    def add(pixels: np.ndarray) -> None:
        nonlocal total, squares, count
        pixels = pixels.reshape(-1, 3).astype(np.float64) / 255.0
        total += pixels.sum(0)
        squares += (pixels * pixels).sum(0)
        count += len(pixels)

    if isinstance(split, ArraySplit):
        for start in range(0, len(split), 4096):
            add(split.images[start:start + 4096])
    else:
        pick = np.random.default_rng(0).permutation(len(split))[:STATS_SAMPLE]
        fit = v2.Compose(_fit(image_size))
        for i in sorted(pick):
            try:
                image = open_rgb(split.files[i])
            except Exception as exc:
                bad.append((split.files[i], decode_failure(exc)))
                continue
            add(np.asarray(fit(image)))
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean * mean, 0))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std), bad


def normalisation(recipe: Recipe, data: DataSet) -> tuple[tuple, tuple, list[tuple[Path, str]]]:
    """The recipe's mean and std ([0, 1] units) and any file that failed to decode on the way."""
    if recipe.normalize == "imagenet" or data.kind == "synthetic":
        return IMAGENET_MEAN, IMAGENET_STD, []
    return dataset_mean_std(data.train, recipe.image_size)
