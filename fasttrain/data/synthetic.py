"""Random images and labels made on the device: runs and benchmarks with no data set at all."""

from __future__ import annotations

import numpy as np
import torch

from fasttrain.data.splits import DataSet


SYNTHETIC_SIZES = {"cnn": (50_000, 10_000), "resnet": (5_994, 5_794)}  # train/val: CIFAR-100's, CUB-200-2011's


class SyntheticSplit:
    """A split of `n` random samples; each batch is generated from its own seed on the device."""

    def __init__(self, n: int, num_classes: int, image_size: int, seed: int):
        self.n, self.num_classes, self.image_size, self.seed = n, num_classes, image_size, seed
        self.labels = np.random.default_rng(seed).integers(0, num_classes, n)

    def __len__(self) -> int:
        return self.n

    def take(self, index: np.ndarray) -> "SyntheticSplit":
        return SyntheticSplit(len(index), self.num_classes, self.image_size, self.seed)

    def shard(self, shard_id: int, num_shards: int, train: bool) -> "SyntheticSplit":
        """This process's own samples: an equal share when training, a near-equal one for evaluation."""
        if num_shards == 1:
            return self
        n = self.n // num_shards if train else len(np.array_split(np.arange(self.n), num_shards)[shard_id])
        return SyntheticSplit(n, self.num_classes, self.image_size, self.seed * 1009 + shard_id)


def synthetic_dataset(num_classes: int, image_size: int, n_train: int, n_val: int) -> DataSet:
    classes = [f"class_{i:03d}" for i in range(num_classes)]
    return DataSet("synthetic", f"random {image_size}x{image_size}", classes,
                   SyntheticSplit(n_train, num_classes, image_size, seed=1),
                   SyntheticSplit(n_val, num_classes, image_size, seed=2))


class SyntheticLoader:
    """Normalised-looking N(0, 1) images, already on the device; the same samples every epoch."""

    def __init__(self, split: SyntheticSplit, batch_size: int, device: torch.device, train: bool,
                 channels_last: bool, start_step: int = 0):
        self.split, self.batch_size, self.device, self.train = split, batch_size, device, train
        self.start_step = start_step  # a run resumed mid-epoch skips the batches it already trained on
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.labels = torch.as_tensor(split.labels, device=device)

    def __len__(self) -> int:
        n, b = len(self.split), self.batch_size
        return n // b if self.train else -(-n // b)

    def __iter__(self):
        s = self.split.image_size
        generator = torch.Generator(device=self.device)
        first, self.start_step = self.start_step, 0
        for i in range(first, len(self)):
            start = i * self.batch_size
            stop = min(start + self.batch_size, len(self.split))
            generator.manual_seed(self.split.seed * 1_000_003 + i)
            images = torch.randn(stop - start, 3, s, s, device=self.device, generator=generator)
            yield images.contiguous(memory_format=self.memory_format), self.labels[start:stop]
