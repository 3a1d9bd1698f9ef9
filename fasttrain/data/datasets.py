"""Data sets on disk: CIFAR-100 python pickles, image folders and the CUB-200-2011 release.

Everything here indexes data (arrays, file lists, labels, class names); nothing decodes JPEGs
or builds batches. Loaders (torch baseline, DALI, synthetic) consume these splits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fasttrain.data import download
from fasttrain.data.cifar import find_cifar_dir, load_cifar, read_cifar_split  # noqa: F401
from fasttrain.data.splits import ArraySplit, DataSet, FileSplit  # noqa: F401
from fasttrain.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def default_root() -> Path:
    return Path(os.environ.get("FASTTRAIN_DATA", "./data"))


# --------------------------------------------------------------------------------------------
# image folders and CUB-200-2011


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _index_class_folders(folder: Path, classes: list[str]) -> FileSplit:
    files, labels = [], []
    for label, name in enumerate(classes):
        if (folder / name).is_dir():
            found = _images_in(folder / name)
            files += found
            labels += [label] * len(found)
    return FileSplit(files, np.asarray(labels, dtype=np.int64))


def _split_fraction(split: FileSplit, num_classes: int, val_fraction: float) -> tuple[FileSplit, FileSplit]:
    """Per-class deterministic split: the same files land in val on every machine and run."""
    rng = np.random.default_rng(0)
    val_index = []
    for c in range(num_classes):
        members = np.flatnonzero(split.labels == c)
        if len(members) < 2:
            continue
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        val_index += rng.permutation(members)[:n_val].tolist()
    is_val = np.zeros(len(split), dtype=bool)
    is_val[val_index] = True
    return split.take(np.flatnonzero(~is_val)), split.take(np.flatnonzero(is_val))


def _find_cub_dir(path: Path) -> Path | None:
    for candidate in (path, path / "CUB_200_2011"):
        if all((candidate / name).is_file() for name in CUB_FILES):
            return candidate
    return None


def _read_table(path: Path) -> dict[int, str]:
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, value = line.split(maxsplit=1)
            rows[int(key)] = value.strip()
    return rows


def load_cub(root: Path) -> DataSet:
    """The CUB_200_2011 release: images/ plus its id tables and official train/test split."""
    try:
        images = _read_table(root / "images.txt")
        labels = _read_table(root / "image_class_labels.txt")
        is_train = _read_table(root / "train_test_split.txt")
    except ValueError:
        raise UserError(f"{root}: malformed CUB_200_2011 tables (expected '<id> <value>' lines)") from None
    class_table = _read_table(root / "classes.txt") if (root / "classes.txt").is_file() else {}
    num = max(int(v) for v in labels.values())
    classes = [class_table.get(i, str(i)) for i in range(1, num + 1)]
    splits = {"1": ([], []), "0": ([], [])}
    for image_id, rel in sorted(images.items()):
        files, ys = splits[is_train.get(image_id, "0")]
        files.append(root / "images" / rel)
        ys.append(int(labels[image_id]) - 1)  # CUB class ids start at 1
    train, val = (FileSplit(f, np.asarray(y, dtype=np.int64)) for f, y in (splits["1"], splits["0"]))
    return DataSet("folder", "CUB_200_2011", classes, train, val, root)


def load_image_folder(path: Path, val_fraction: float) -> DataSet:
    cub = _find_cub_dir(path)
    if cub is not None:
        return load_cub(cub)
    val_dir = next((path / n for n in ("val", "test") if (path / n).is_dir()), None)
    if (path / "train").is_dir() and val_dir is not None:
        classes = [d.name for d in _class_dirs(path / "train")]
        extra = sorted({d.name for d in _class_dirs(val_dir)} - set(classes))
        if extra:
            raise UserError(f"{val_dir}: classes not in {path / 'train'}: {', '.join(extra[:5])}")
        data = DataSet("folder", f"train/{val_dir.name}", classes,
                       _index_class_folders(path / "train", classes),
                       _index_class_folders(val_dir, classes), path)
    else:
        classes = [d.name for d in _class_dirs(path)]
        everything = _index_class_folders(path, classes)
        train, val = _split_fraction(everything, len(classes), val_fraction)
        data = DataSet("folder", f"class folders, {val_fraction:g} held out", classes, train, val, path)
    if not classes or not len(data.train):
        raise UserError(f"{path}: no images found; expected train/ and val/ (or test/) with one folder per "
                        f"class, class folders alone, or the CUB_200_2011 layout")
    if not len(data.val):
        raise UserError(f"{path}: no validation images; add val/ or test/, or more images per class")
    return data


# --------------------------------------------------------------------------------------------
# finding, downloading and capping


def _is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def open_dataset(model: str, data: Path | None, val_fraction: float = 0.1) -> DataSet:
    """Find the data set under `data` (default: $FASTTRAIN_DATA or ./data) in any known layout.

    An absent or empty folder gets the model's own data set downloaded and verified:
    CIFAR-100 for the CNN, CUB-200-2011 for ResNet-18.
    """
    if data is None:
        return _own_dataset(model, default_root())
    path = data
    if path.is_file():
        raise UserError(f"--data {path}: a file; pass the folder that holds the data set")
    if find_cifar_dir(path) is not None:
        return load_cifar(path)
    if _find_cub_dir(path) is not None:
        return load_cub(_find_cub_dir(path))
    if _is_empty(path):
        return _own_dataset(model, path)
    if not _class_dirs(path):
        raise UserError(f"{path}: unknown layout; expected cifar-100-python/ pickles, train/ and val/ "
                        f"class folders, class folders alone, or CUB_200_2011/")
    return load_image_folder(path, val_fraction)


def _own_dataset(model: str, root: Path) -> DataSet:
    """The model's own data set under root, downloaded and verified when it is not there yet."""
    if model == "cnn":
        if find_cifar_dir(root) is None:
            download.fetch(download.CIFAR100, root)
        return load_cifar(root)
    if _find_cub_dir(root) is None:
        download.fetch(download.CUB200, root)
    cub = _find_cub_dir(root)
    if cub is None:
        raise UserError(f"{root}: the CUB-200-2011 archive did not unpack to CUB_200_2011/")
    return load_cub(cub)


def cap(data: DataSet, train_limit: int | None, val_limit: int | None) -> DataSet:
    """At most N images per split, drawn evenly (a fixed random subset, kept in data-set order)."""
    def capped(split, limit):
        if limit is None or limit >= len(split):
            return split
        keep = np.sort(np.random.default_rng(0).permutation(len(split))[:limit])
        return split.take(keep)

    data.train = capped(data.train, train_limit)
    data.val = capped(data.val, val_limit)
    return data
