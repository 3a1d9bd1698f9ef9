"""Data sets on disk: CIFAR-10/100 python pickles, image folders and the CUB-200-2011 release.

Everything here indexes data (arrays, file lists, labels, class names); nothing decodes JPEGs
or builds batches. Loaders (torch baseline, DALI, synthetic) consume these splits.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

import numpy as np

from fasttrain.data import download
from fasttrain.data.cifar import find_cifar_dir, load_cifar
from fasttrain.data.decode import DEFAULT_MAX_PIXELS
from fasttrain.data.index import Index, ignore_rule, build_index, shown
from fasttrain.data.splits import DataSet, FileSplit
from fasttrain.errors import UserError

CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt")


def default_root() -> Path:
    return Path(os.environ.get("FASTTRAIN_DATA", "./data"))


# --------------------------------------------------------------------------------------------
# image folders and CUB-200-2011, read through the data index

# folder names that mean a split, never a class (Roboflow and many Kaggle exports say valid/)
TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation")
TEST_NAMES = ("test", "testing")
# categories of files left out because of where they are, not what they are
HELD_OUT, OUTSIDE = "held-out test split", "outside the splits"
NOT_A_SPLIT = (HELD_OUT, OUTSIDE)


def _subfolders(index: Index, parts: tuple) -> list[str]:
    """Names of the folders directly inside root/parts, as walked by the index, sorted."""
    return sorted(f[len(parts)] for f in index.folders if len(f) == len(parts) + 1 and f[:len(parts)] == parts)


def _split_of(index: Index, parts: tuple, classes: list[str] | None) -> tuple[FileSplit, list[str]]:
    """The images under root/parts/<class>/... (any depth) as a FileSplit; classes from the folders
    when not given. Images directly in root/parts are left out, named."""
    if classes is None:
        classes = _subfolders(index, parts)
    label_of = {same_name(name): i for i, name in enumerate(classes)}
    depth = len(parts)
    files, labels, host = [], [], []
    for path, probe in list(index.images.items()):
        rel = path.relative_to(index.root).parts
        if rel[:depth] != parts:
            continue
        if len(rel) == depth + 1:
            index.left_out.append((path, "not in a class folder",
                                   f"an image directly in {shown(index.root.joinpath(*parts))}/, outside every class folder"))
            del index.images[path]
            continue
        if same_name(rel[depth]) in label_of:
            files.append(path)
            labels.append(label_of[same_name(rel[depth])])
            host.append(not probe.dali)
    return FileSplit(files, np.asarray(labels, dtype=np.int64), np.asarray(host, dtype=bool)), classes


def _wrapper(index: Index, top: list[str]) -> str | None:
    """The one folder that holds the whole data set, when the root holds that folder alone (besides
    ignored litter such as __MACOSX/) and it holds folders itself: as zip archives unpack."""
    if len(top) != 1 or top[0].lower() in TRAIN_NAMES + VAL_NAMES + TEST_NAMES:
        return None
    if any(len(p.relative_to(index.root).parts) == 1 for p in index.images):
        return None
    return top[0] if _subfolders(index, (top[0],)) else None


def same_name(name: str) -> str:
    """A folder name as compared across splits: Unicode NFC, so a class written by macOS (NFD) in
    val/ matches the same class written elsewhere (NFC) in train/."""
    return unicodedata.normalize("NFC", name)


def _leave_out_folder(index: Index, parts: tuple, category: str, detail: str) -> None:
    """Every image under root/parts goes to left_out (a held-out test split, a folder that is no split)."""
    for path in list(index.images):
        if path.relative_to(index.root).parts[:len(parts)] == parts:
            index.left_out.append((path, category, detail))
            del index.images[path]


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


def _from_index(kind_layout: str, classes: list[str], train: FileSplit, val: FileSplit, root: Path,
                index: Index, notes: list[str]) -> DataSet:
    return DataSet("folder", kind_layout, classes, train, val, root, notes + index.folder_notes,
                   left_out=index.left_out, ignored=index.ignored, found=index.files)


def load_cub(root: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> DataSet:
    """The CUB_200_2011 release: images/ plus its id tables and official train/test split.

    Every file under images/ goes through the data index: listed images that are damaged are left
    out and named, files on disk that images.txt does not list are left out ("not listed"), and
    listed images missing from disk are counted in a note. Raises UserError for malformed tables.
    """
    try:
        images = _read_table(root / "images.txt")
        labels = {k: int(v) for k, v in _read_table(root / "image_class_labels.txt").items()}
        is_train = _read_table(root / "train_test_split.txt")
        class_table = _read_table(root / "classes.txt") if (root / "classes.txt").is_file() else {}
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{shown(root)}: malformed CUB_200_2011 tables (expected '<id> <value>' lines)") from None
    unlabelled = [i for i in images if i not in labels]
    odd_split = sorted({v for v in is_train.values() if v not in ("0", "1")})
    if not labels or unlabelled or odd_split or min(labels.values()) < 1:
        what = (f"image id {unlabelled[0]} has no class in image_class_labels.txt" if unlabelled else
                f"train_test_split.txt holds {odd_split[0]!r} (expected 1 or 0)" if odd_split else
                "image_class_labels.txt holds no class ids from 1" )
        raise UserError(f"{shown(root)}: malformed CUB_200_2011 tables: {what}")
    num = max(labels.values())
    classes = [class_table.get(i, str(i)) for i in range(1, num + 1)]
    index = build_index(root / "images", max_pixels)
    splits = {"1": ([], [], []), "0": ([], [], [])}
    listed, missing = set(), []
    on_disk = {p for p, _, _ in index.left_out} | set(index.images)
    for image_id, rel in sorted(images.items()):
        path = root / "images" / rel
        listed.add(path)
        probe = index.images.get(path)
        if probe is None:
            if path not in on_disk:
                missing.append(rel)
            continue
        files, ys, host = splits[is_train.get(image_id, "0")]
        files.append(path)
        ys.append(labels[image_id] - 1)  # CUB class ids start at 1
        host.append(not probe.dali)
    for path in [p for p in index.images if p not in listed]:
        index.left_out.append((path, "not listed", "an image under images/ that images.txt does not list"))
        del index.images[path]
    notes = [f"{len(missing)} images listed in images.txt are not on disk (e.g. {missing[0]})"] if missing else []
    train, val = (FileSplit(f, np.asarray(y, dtype=np.int64), np.asarray(h, dtype=bool))
                  for f, y, h in (splits["1"], splits["0"]))
    return _from_index("CUB_200_2011", classes, train, val, root, index, notes)


def load_image_folder(path: Path, val_fraction: float, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> DataSet:
    """An image folder in any layout people have: train/ + val/ (or valid/, validation/, test/), or
    class folders alone (val_fraction of each class held out), or the CUB_200_2011 release.

    Raises UserError, in one line, for what cannot be right: no images, a class with no training
    image, validation classes that training lacks, a val/ or test/ without train/.
    """
    cub = _find_cub_dir(path)
    if cub is not None:
        return load_cub(cub, max_pixels)
    index = build_index(path, max_pixels)
    notes = [index.describe()] if index.probed > 1000 or index.seconds > 2 else []
    top = _subfolders(index, ())
    wrapper = _wrapper(index, top)
    if wrapper is not None:  # DIR/dataset/{train,valid,...} as a zip unpacks: the data set is inside
        data = load_image_folder(path / wrapper, val_fraction, max_pixels)
        data.notes.insert(0, f"reading {shown(path / wrapper)}/, the only folder in {shown(path)}/")
        inside = lambda p: (path / wrapper) in p.parents  # noqa: E731
        ignored = [(p, rule) for p, rule in index.ignored if not inside(p)]
        left_out = [entry for entry in index.left_out if not inside(entry[0])]  # a README.txt beside it
        data.ignored += ignored
        data.left_out += left_out
        data.found = (data.found or 0) + len(ignored) + len(left_out)
        return data
    splits = {name.lower(): name for name in top if name.lower() in TRAIN_NAMES + VAL_NAMES + TEST_NAMES}
    train_name = next((splits[n] for n in TRAIN_NAMES if n in splits), None)
    val_name = next((splits[n] for n in VAL_NAMES + TEST_NAMES if n in splits), None)
    if splits and train_name is None:
        raise UserError(f"{shown(path)}: has {', '.join(s + '/' for s in splits.values())} but no train/ "
                        f"folder; a split folder is never read as a class")
    if train_name is not None:
        for name in top:
            if name in (train_name, val_name):
                continue
            if name.lower() in TEST_NAMES:
                _leave_out_folder(index, (name,), HELD_OUT,
                                  f"{name}/ is a test split: not used for training or validation")
            else:
                _leave_out_folder(index, (name,), OUTSIDE,
                                  f"{name}/ is not train/ or {val_name or 'val'}/")
        for file in [p for p in index.images if len(p.relative_to(index.root).parts) == 1]:
            index.left_out.append((file, OUTSIDE,
                                   f"an image directly in {shown(path)}/, beside {train_name}/"))
            del index.images[file]
        train, classes = _split_of(index, (train_name,), None)
        if val_name is None:
            train, val = _split_fraction(train, len(classes), val_fraction)
            layout = f"{train_name}/ alone, {val_fraction:g} held out"
        else:
            known = {same_name(c) for c in classes}
            extra = [c for c in _subfolders(index, (val_name,)) if same_name(c) not in known]
            holding = set()  # the folders directly in val/ that hold images, at any depth
            for image in index.images if extra else ():
                rel = image.relative_to(index.root).parts
                if len(rel) > 2 and rel[0] == val_name:
                    holding.add(rel[1])
            empty = [c for c in extra if c not in holding]
            if empty:  # nothing in them to score: no class of its own, nothing lost
                one = len(empty) == 1
                notes.append(f"{shown(path / val_name)}: {', '.join(e + '/' for e in empty[:5])}"
                             f"{'' if len(empty) <= 5 else f' and {len(empty) - 5} more'} "
                             f"{'has' if one else 'have'} no images and {'is not a class' if one else 'are not classes'} "
                             f"of {train_name}/: ignored")
                extra = [c for c in extra if c in holding]
            if extra:
                raise UserError(f"{shown(path / val_name)}: classes not in {shown(path / train_name)}: "
                                f"{', '.join(extra[:5])}")
            val, _ = _split_of(index, (val_name,), classes)
            layout = f"{train_name}/{val_name}"
            if val_name.lower() in TEST_NAMES:
                notes.append(f"validating on {val_name}/ (there is no val/ or valid/)")
        where = path / train_name
        split_dirs = {"train": where, **({"val": path / val_name} if val_name else {})}
    else:
        split_dirs = {}
        train, classes = _split_of(index, (), None)
        train, val = _split_fraction(train, len(classes), val_fraction)
        layout = f"class folders, {val_fraction:g} held out"
        where = path
    data = _from_index(layout, classes, train, val, path, index, notes)
    data.split_dirs = split_dirs
    _check_classes(data, where)
    return data


def open_for_evaluation(model: str, path: Path | None, split: str, classes: list[str],
                        max_pixels: int | None = DEFAULT_MAX_PIXELS, val_fraction: float = 0.1,
                        download: bool = False) -> DataSet:
    """The images to score against a checkpoint's `classes`, as DataSet.val.

    split "val": the validation split training used (val/, valid/, validation/, else test/; the
    held-out share of class folders alone; CIFAR's test pickle; CUB's test split); a folder that
    holds only val/ or test/ is scored whole. "test": the test/ (or testing/) folder. "all": every
    image under `path`, read as class folders (point --data at a labelled test folder). Class
    folders are matched to the checkpoint's classes by name (Unicode NFC); a folder that is no
    class of the checkpoint is refused in one line, as is a split that is not there. A missing or
    empty `path` gets the model's own data set downloaded into it only with `download`, and only for
    "val" (open_dataset's rule).
    """
    simple = path is None or find_cifar_dir(path) is not None or _find_cub_dir(path) is not None
    if split == "val" and (simple or _has_train(path) or _is_empty(path)):
        return open_dataset(model, path, val_fraction, max_pixels, download)
    if path is None or not path.is_dir() or simple:
        raise UserError(f"--split {split}: --data must be an image folder" if path is not None and path.is_dir()
                        else f"--data {shown(path or default_root())}: no such folder")
    index = build_index(path, max_pixels)
    top = _subfolders(index, ())
    wrapper = _wrapper(index, top)
    if wrapper is not None:
        return open_for_evaluation(model, path / wrapper, split, classes, max_pixels, val_fraction, download)
    lower = {name.lower(): name for name in top}
    names = {"val": VAL_NAMES + TEST_NAMES, "test": TEST_NAMES, "all": ()}[split]
    chosen = next((lower[n] for n in names if n in lower), None)
    notes = []
    if chosen is None and split == "val":  # class folders alone: the share training held out
        data = open_dataset(model, path, val_fraction, max_pixels, download)
        data.notes.append(f"scoring the {val_fraction:g} of each class held out for validation, as training "
                          f"did; --split all scores every image")
        return data
    if chosen is None and split == "test":
        raise UserError(f"--split test: {shown(path)} has no test/ folder")
    if chosen is None:
        parts = ()
        notes.append(f"scoring every image under {shown(path)}/ as class folders")
    else:
        parts = (chosen,)
        for name in top:
            if name != chosen:
                _leave_out_folder(index, (name,), OUTSIDE, f"{name}/ is not the split scored ({chosen}/)")
    known = {same_name(c) for c in classes}
    extra = [c for c in _subfolders(index, parts) if same_name(c) not in known]
    if extra:
        raise UserError(f"{shown(path.joinpath(*parts))}: folders that are no class of the checkpoint: "
                        f"{', '.join(shown(c) for c in extra[:5])}")
    val, _ = _split_of(index, parts, classes)
    data = _from_index(f"{chosen + '/' if chosen else 'class folders'}, scored whole", list(classes),
                       FileSplit([], np.zeros(0, np.int64)), val, path, index, notes)
    data.split_dirs = {"val": path.joinpath(*parts)} if parts else {}
    if not len(val):
        raise UserError(f"--data {shown(path.joinpath(*parts))}: no images to score")
    return data


def _has_train(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() and p.name.lower() in TRAIN_NAMES for p in path.iterdir())


def _check_classes(data: DataSet, where: Path) -> None:
    """Refuse classes with nothing to learn from; note classes that nothing validates."""
    if not data.classes or not len(data.train):
        raise UserError(f"{shown(data.root)}: no images found; expected train/ and val/ (or valid/, test/) with one "
                        f"folder per class, class folders alone, or the CUB_200_2011 layout"
                        + (f" ({len(data.left_out)} files left out, e.g. {shown(data.left_out[0][0])}: "
                           f"{data.left_out[0][2]})" if data.left_out else ""))
    counts = np.bincount(data.train.labels, minlength=data.num_classes)
    empty = [c for c, n in zip(data.classes, counts) if n == 0]
    if empty:
        held = [(p, detail) for p, _, detail in data.left_out if where / empty[0] in p.parents]
        raise UserError(f"{shown(where)}: class{'es' if len(empty) > 1 else ''} "
                        f"{', '.join(repr(shown(c)) for c in empty[:5])}{' ...' if len(empty) > 5 else ''} "
                        f"{'have' if len(empty) > 1 else 'has'} no training image"
                        + (f" ({len(held)} files in {shown(empty[0])}/ left out, e.g. {shown(held[0][0].name)}: "
                           f"{held[0][1]})" if held else "") + "; add images or remove the empty folders")
    if not len(data.val):
        raise UserError(f"{shown(data.root)}: no validation images; add val/ or valid/, or more images per class")
    unvalidated = [c for c, n in zip(data.classes, np.bincount(data.val.labels, minlength=data.num_classes))
                   if n == 0]
    if unvalidated:
        data.notes.append(f"{len(unvalidated)} class{'es have' if len(unvalidated) > 1 else ' has'} no validation "
                          f"image: {', '.join(shown(c) for c in unvalidated[:5])}{' ...' if len(unvalidated) > 5 else ''}")


# --------------------------------------------------------------------------------------------
# finding, downloading and capping


def _is_empty(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def open_dataset(model: str, data: Path | None, val_fraction: float = 0.1,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, download: bool = False) -> DataSet:
    """Find the data set under `data` (default: $FASTTRAIN_DATA or ./data) in any known layout.

    CIFAR-10/100 python pickles, the CUB_200_2011 release, or an image folder (see
    load_image_folder); image folders are read through the data index (fasttrain/data/index.py).
    The model's own data set (CIFAR-100 for the CNN, CUB-200-2011 for ResNet-18) is downloaded and
    verified into the default folder when that is absent or empty; into an explicit `data` folder
    only with `download` (--download): a path given by hand that is not there is a typo far more
    often than a wish for a 160 MB download. Raises UserError for what it cannot read.
    """
    if data is None:
        return _own_dataset(model, default_root())
    path = data
    if path.is_file():
        raise UserError(f"--data {path}: a file; pass the folder that holds the data set")
    if find_cifar_dir(path) is not None:
        return load_cifar(path)
    if _find_cub_dir(path) is not None:
        return load_cub(_find_cub_dir(path), max_pixels)
    if _is_empty(path):
        if not download:
            raise no_data(path, model)
        return _own_dataset(model, path)
    if not any(p.is_dir() and ignore_rule(p.name, True) is None for p in path.iterdir()):
        raise UserError(f"{shown(path)}: unknown layout; expected CIFAR python pickles (cifar-100-python/ or "
                        f"cifar-10-batches-py/), train/ and val/ class folders, class folders alone, or CUB_200_2011/")
    return load_image_folder(path, val_fraction, max_pixels)


OWN_DATA = {"cnn": download.CIFAR100.name, "resnet": download.CUB200.name}


def no_data(path: Path, model: str | None = None) -> UserError:
    """An explicit --data that is missing or empty, and no --download: named, with the flag that downloads."""
    what = "no such folder" if not path.exists() else "an empty folder"
    own = OWN_DATA.get(model, "the model's data set")
    return UserError(f"--data {shown(path)}: {what}; pass --download to download {own} into it")


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
    def capped(split, limit, flag):
        if limit is None or limit >= len(split):
            return split
        data.not_used[flag] = len(split) - limit
        keep = np.sort(np.random.default_rng(0).permutation(len(split))[:limit])
        return split.take(keep)

    data.train = capped(data.train, train_limit, "--train-limit")
    data.val = capped(data.val, val_limit, "--val-limit")
    return data
