"""The baseline: torchvision transforms in DataLoader worker processes, pinned memory.

This is the plain PyTorch pipeline of the seed report, kept exact so that the DALI pipelines
have a fair reference: each image is decoded and augmented on the CPU by PIL/torchvision,
batches are collated as float32 NCHW, pinned, then copied to the device. Samples are visited in
the order of fasttrain/data/order.py, like every other backend.
"""

from __future__ import annotations

import gc
import os
import signal
from pathlib import Path
from typing import Callable

import torch
from PIL import Image  # CIFAR arrays become PIL images for torchvision's v2 ops
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from fasttrain.data.splits import ArraySplit, FileSplit
from fasttrain.data.order import EpochOrder
from fasttrain.data.decode import decode_failure, open_rgb


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ImageDataset(Dataset):
    """(transformed image, label, index) for CIFAR arrays or image files.

    A file that will not decode gives (reason, label, index): a str in the image's place.
    """

    def __init__(self, split: ArraySplit | FileSplit, transform):
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        if isinstance(self.split, ArraySplit):
            image = Image.fromarray(self.split.images[i])
        else:
            try:
                image = open_rgb(self.split.files[i])
            except Exception as exc:  # truncated or corrupt data behind a valid header
                return decode_failure(exc), int(self.split.labels[i]), i
        return self.transform(image), int(self.split.labels[i]), i


def collate_skipping(samples):
    """Collate the decodable samples; report the (index, reason) of the others."""
    good = [(image, label) for image, label, _ in samples if not isinstance(image, str)]
    bad = [(i, image) for image, _, i in samples if isinstance(image, str)]
    images, labels = default_collate(good) if good else (None, None)
    return images, labels, bad


class EpochSampler(Sampler):
    """Indices in EpochOrder's order: every iter() is the next epoch."""

    def __init__(self, order: EpochOrder):
        self.order = order

    def __iter__(self):
        return iter(self.order.next_epoch().tolist())

    def __len__(self) -> int:
        return self.order.steps() * self.order.batch_size


def _init_worker(worker_id: int) -> None:
    # Ctrl-C is the main process's to handle: it finishes the step and saves; workers keep serving
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Objects inherited through fork are never collected here: a DALI pipeline that was garbage in
    # the parent would run its destructor in this worker, where DALI's threads do not exist, and hang.
    gc.freeze()


class DeviceLoader:
    """Wraps a DataLoader: yields (images, labels) on the device, channels_last when asked.

    A file that fails to decode is dropped from its batch, named to every `on_skip` callback, and
    excluded from later epochs.
    """

    def __init__(self, loader: DataLoader, order: EpochOrder, files: list[Path] | None, device: torch.device,
                 channels_last: bool):
        self.loader, self.order, self.files, self.device = loader, order, files, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.batch_size = order.batch_size
        # batches the workers prepare ahead: ready at once after a slow first step (a compile)
        self.prefetch_batches = loader.num_workers * (loader.prefetch_factor or 0)
        self.on_skip: list[Callable[[Path, str], None]] = []

    def __len__(self) -> int:
        return self.order.steps()

    def __iter__(self):
        if self.loader.num_workers and getattr(self.loader, "_iterator", None) is None:
            gc.collect()  # workers are forked now: garbage (a finished DALI pipeline) is destroyed here, not there
        for images, labels, bad in self.loader:
            for i, reason in bad:
                self.order.excluded.add(i)
                for callback in self.on_skip:
                    callback(self.files[i], reason)
            if images is None:
                continue
            # from pinned memory these copies are asynchronous: no host sync per step
            yield (images.to(self.device, non_blocking=True, memory_format=self.memory_format),
                   labels.to(self.device, non_blocking=True))


def torch_loader(split, transform, batch_size: int, device: torch.device, train: bool, workers: int,
                 channels_last: bool, seed: int, start_epoch: int = 1, start_step: int = 0, shard_id: int = 0,
                 num_shards: int = 1) -> DeviceLoader:
    # EpochOrder does what DistributedSampler + set_epoch do (disjoint equal shards, a new
    # permutation each epoch from seed and epoch), and can also start mid-epoch on resume
    order = EpochOrder(len(split), batch_size, train, seed, shard_id, num_shards, start_epoch, start_step)
    loader = DataLoader(
        ImageDataset(split, transform),
        batch_size=batch_size,
        sampler=EpochSampler(order),
        drop_last=False,            # EpochOrder already keeps whole training batches only
        num_workers=workers,
        collate_fn=collate_skipping,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_init_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),  # seeds the workers' augmentation
    )
    return DeviceLoader(loader, order, list(split.files) if isinstance(split, FileSplit) else None, device,
                        channels_last)
