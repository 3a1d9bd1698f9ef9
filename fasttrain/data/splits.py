"""What a data set is once opened: its splits (arrays in memory or files on disk) and classes.

Nothing here reads or decodes files; datasets.py and cifar.py fill these in, loaders consume them.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def ignored_by_rule(ignored: list[tuple[Path, str]]) -> dict[str, int]:
    """How many ignored files each rule accounts for, in the order the rules were first met."""
    return dict(Counter(rule for _, rule in ignored))


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
    """Encoded image files and their labels, in data-set order.

    host_decode: (N,) bool, True for files whose pixels DALI's decoder would not give exactly as
    the decode policy does (fasttrain/data/decode.py); None when unknown (then every file counts as
    one DALI decodes).
    """

    files: list[Path]
    labels: np.ndarray  # (N,) int64
    host_decode: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "FileSplit":
        index = np.asarray(index, dtype=np.int64)
        host = None if self.host_decode is None else self.host_decode[index]
        return FileSplit([self.files[i] for i in index], self.labels[index], host)

    def without(self, paths: set) -> "FileSplit":
        """This split less the given files (their labels go with them)."""
        return self.take(np.array([i for i, f in enumerate(self.files) if f not in paths], dtype=np.int64))


@dataclass
class DataSet:
    kind: str            # "cifar", "folder" or "synthetic"
    layout: str          # how it was found: "cifar-100-python", "train/val", "class folders", "CUB_200_2011", ...
    classes: list[str]
    train: ArraySplit | FileSplit | None
    val: ArraySplit | FileSplit | None
    root: Path | None = None
    notes: list[str] = field(default_factory=list)
    # every file under root that is not in a split: (path, category, detail); summary.json counts
    # categories, skipped.txt lists every file
    left_out: list[tuple[Path, str, str]] = field(default_factory=list)
    ignored: list[tuple[Path, str]] = field(default_factory=list)  # (path, rule): OS litter, hidden files
    not_used: dict[str, int] = field(default_factory=dict)         # images set aside by a flag: {"--train-limit": n}
    found: int | None = None  # files the data index walked under root (image folders only)
    split_dirs: dict[str, Path] = field(default_factory=dict)  # {"train": root/train, "val": root/valid} if folders
    failed: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})  # undecodable, found by loaders

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def drop(self, paths, category: str, detail: str) -> list[Path]:
        """Take these files out of both splits, labels with them, and record why; returns those it held."""
        wanted = set(paths) - {p for p, _, _ in self.left_out}
        held = []
        for name in ("train", "val"):
            split = getattr(self, name)
            if isinstance(split, FileSplit):
                here = [f for f in split.files if f in wanted]
                if here:
                    setattr(self, name, split.without(set(here)))
                    held += here
        self.left_out += [(p, category, detail) for p in held]
        return held

    def record_failure(self, split: str, path: Path, reason: str) -> bool:
        """A file of `split` ("train" or "val") that a loader found undecodable and leaves out from now on.

        Returns False when the file was already recorded (a loader may meet it again).
        """
        if any(p == path for p, _, _ in self.left_out):
            return False
        self.left_out.append((path, "damaged", reason))
        self.failed[split] += 1
        return True

    def file_counts(self) -> dict:
        """What became of every file found: used (per split), left out and ignored, by reason.

        For image folders these add up to `found`, every file under the data folder.
        """
        left = dict(Counter(category for _, category, _ in self.left_out))
        ignored = ignored_by_rule(self.ignored)
        counts = {"train": len(self.train) - self.failed["train"], "val": len(self.val) - self.failed["val"],
                  "left_out": left, "ignored": ignored,
                  "not_used": dict(self.not_used)}
        if self.found is not None:
            counts["found"] = self.found
        return counts

    def describe(self) -> str:
        where = f" at {os.fsencode(self.root).decode('utf-8', 'backslashreplace')}" if self.root else ""
        return (f"{self.kind} ({self.layout}){where}: {len(self.train)} train / {len(self.val)} val images, "
                f"{self.num_classes} classes")
