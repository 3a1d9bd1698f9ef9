"""The baseline: torchvision transforms in DataLoader worker processes, pinned memory.

This is the plain PyTorch pipeline of the seed report, kept exact so that the DALI pipelines
have a fair reference: each image is decoded and augmented on the CPU by PIL/torchvision,
batches are collated as float32 NCHW, pinned, then copied to the device.
"""

from __future__ import annotations

import os

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fasttrain.data.datasets import ArraySplit, FileSplit
from fasttrain.data.transforms import load_rgb


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ImageDataset(Dataset):
    """(transformed image, label) for CIFAR arrays or image files."""

    def __init__(self, split: ArraySplit | FileSplit, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        if isinstance(self.split, ArraySplit):
            image = Image.fromarray(self.split.images[i])
        else:
            image = load_rgb(self.split.files[i])
        return self.transform(image), int(self.split.labels[i])


class DeviceLoader:
    """Wraps a DataLoader: yields (images, labels) on the device, channels_last when asked."""

    def __init__(self, loader: DataLoader, device: torch.device, channels_last: bool):
        self.loader, self.device = loader, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            # from pinned memory these copies are asynchronous: no host sync per step
            yield (images.to(self.device, non_blocking=True, memory_format=self.memory_format),
                   labels.to(self.device, non_blocking=True))


def torch_loader(split, transform, batch_size: int, device: torch.device, train: bool, workers: int,
                 channels_last: bool, seed: int) -> DeviceLoader:
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        ImageDataset(split, transform),
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,            # fixed training shapes: a compiled model never recompiles
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
    )
    return DeviceLoader(loader, device, channels_last)
