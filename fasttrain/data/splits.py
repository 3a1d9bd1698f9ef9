"""What a data set is once opened: its splits (arrays in memory or files on disk) and classes.

Nothing here reads or decodes files; datasets.py and cifar.py fill these in, loaders consume them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ArraySplit:
    """Decoded images held in memory: CIFAR's uint8 arrays, HWC."""

    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "ArraySplit":
        return ArraySplit(self.images[index], self.labels[index])


@dataclass
class FileSplit:
    """Encoded image files and their labels, in data-set order."""

    files: list[Path]
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "FileSplit":
        return FileSplit([self.files[i] for i in index], self.labels[index])


@dataclass
class DataSet:
    kind: str            # "cifar", "folder" or "synthetic"
    layout: str          # how it was found: "cifar-100-python", "train/val", "class folders", "CUB_200_2011", ...
    classes: list[str]
    train: ArraySplit | FileSplit | None
    val: ArraySplit | FileSplit | None
    root: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> str:
        where = f" at {self.root}" if self.root else ""
        return (f"{self.kind} ({self.layout}){where}: {len(self.train)} train / {len(self.val)} val images, "
                f"{self.num_classes} classes")
