"""CIFAR python pickles: the CIFAR-100 release (train, test, meta) read into uint8 arrays."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from fasttrain.data.splits import ArraySplit, DataSet
from fasttrain.errors import UserError


def find_cifar_dir(path: Path) -> Path | None:
    for candidate in (path, path / "cifar-100-python"):
        if (candidate / "train").is_file() and (candidate / "test").is_file():
            return candidate
    return None


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            record = pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise UserError(f"{path}: not a CIFAR-100 python pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: not a CIFAR-100 python pickle (holds a {type(record).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in record.items()}


def read_cifar_split(path: Path, labels_required: bool = True) -> ArraySplit:
    """One pickle: a training or test split, or (labels_required=False) unlabelled images to predict."""
    record = _read_pickle(path)
    labels = record.get("fine_labels", record.get("labels"))
    if "data" not in record or (labels is None and labels_required):
        raise UserError(f"{path}: not a CIFAR-100 python pickle (no 'data' and 'fine_labels' entries)")
    if labels is None:
        labels = [0] * len(record["data"])
    data = np.asarray(record["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise UserError(f"{path}: not a CIFAR-100 python pickle ('data' is {data.shape}, expected "
                        f"({len(labels)}, 3072))")
    # rows are 1024 red, 1024 green, 1024 blue values: CHW planes -> HWC, the layout loaders crop
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return ArraySplit(images, np.asarray(labels, dtype=np.int64))


def load_cifar(path: Path) -> DataSet:
    root = find_cifar_dir(path)
    if root is None:
        raise UserError(f"{path}: no CIFAR-100 'train' and 'test' pickles here or in {path / 'cifar-100-python'}")
    train, val = read_cifar_split(root / "train"), read_cifar_split(root / "test")
    num = int(max(train.labels.max(), val.labels.max())) + 1
    classes = [str(i) for i in range(num)]
    if (root / "meta").is_file():
        names = _read_pickle(root / "meta").get("fine_label_names")
        if names and len(names) >= num:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return DataSet("cifar", "cifar-100-python", classes, train, val, root)
