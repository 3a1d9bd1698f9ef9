"""The recipes' augmentation as torchvision transforms, and the normalisation statistics.

These are the reference semantics: the DALI pipelines must match them (same crop families,
same flip rate, same mean/std), so every op here is named and documented.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from fasttrain.data.datasets import ArraySplit, DataSet, FileSplit
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


def load_rgb(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def dataset_mean_std(split: ArraySplit | FileSplit, image_size: int) -> tuple[tuple, tuple]:
    """Per-channel mean and std of the training images, in [0, 1] units."""
    if isinstance(split, ArraySplit):
        pixels = split.images.reshape(-1, 3)
    else:
        pick = np.random.default_rng(0).permutation(len(split))[:STATS_SAMPLE]
        fit = v2.Compose(_fit(image_size))
        pixels = np.concatenate([np.asarray(fit(load_rgb(split.files[i]))).reshape(-1, 3) for i in sorted(pick)])
    pixels = pixels.astype(np.float64) / 255.0
    mean, std = pixels.mean(0), pixels.std(0)
    return tuple(float(m) for m in mean), tuple(float(max(s, 1e-3)) for s in std)


def normalisation(recipe: Recipe, data: DataSet) -> tuple[tuple, tuple]:
    if recipe.normalize == "imagenet" or data.kind == "synthetic":
        return IMAGENET_MEAN, IMAGENET_STD
    return dataset_mean_std(data.train, recipe.image_size)
