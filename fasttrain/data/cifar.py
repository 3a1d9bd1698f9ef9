"""CIFAR python pickles: the CIFAR-10 and CIFAR-100 releases read into uint8 HWC arrays.

Layouts, found in the folder given or in its `cifar-100-python/` or `cifar-10-batches-py/` child:

- CIFAR-100 release: `train`, `test`, `meta` (`test` is the validation split).
- CIFAR-10 release: `data_batch_1` ... `data_batch_5` (the training split, concatenated in that order),
  `test_batch`, `batches.meta`. Other `data_batch_N` files are not used (a DataSet note says so).

Each data file is a pickled dict, keys str or bytes (Python 2 pickles load too):

- `data`: the images. As released, (N, 3072) uint8 rows of 1024 red, 1024 green, 1024 blue values
  (CHW planes of 32x32 images). Also accepted, as they cannot be mistaken for anything else:
  (N, 32, 32, 3) HWC and (N, 3, 32, 32) CHW arrays, and any integer or float dtype whose values are
  pixels 0-255 (floats are rounded). Float data lying wholly within [0, 1] is taken as scaled pixels:
  multiplied by 255 and rounded, and DataSet.notes says so. Anything else (negatives, values over 255,
  NaN, booleans, other shapes) is refused.
- `fine_labels` (CIFAR-100 style) or `labels` (CIFAR-10 style): N labels, either class indices (ints,
  or floats that are whole numbers) or class names (str or bytes). Booleans are refused.

The meta file (`meta` or `batches.meta`; each layout looks for its own first) names the classes in
`fine_label_names` (CIFAR-100) or `label_names` (CIFAR-10); the entry matching the training labels'
key style is preferred. With names known, index labels must lie in [0, len(names)) and name labels
must be among the names. Without a meta file, name labels define the classes (sorted unique names of
the training split; validation labels must be among them) and index labels give classes "0" ... "K-1",
K = largest label + 1; negative labels are refused.

Everything wrong is refused with one UserError line (the CLI prints it as `error: ...`, exit 2) that
names the file and what is wrong. A file that is not a CIFAR-style pickle at all reads "<file>: not a
CIFAR python pickle (...)", with "CIFAR-100" or "CIFAR-10" in place of "CIFAR" when the file sits in
that release's folder.
"""

from __future__ import annotations

import numbers
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fasttrain.data.splits import ArraySplit, DataSet
from fasttrain.errors import UserError

CIFAR100_DIR, CIFAR10_DIR = "cifar-100-python", "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
SIDE = 32
ROW = 3 * SIDE * SIDE


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _text(value) -> str:
    """A class name or dict key: bytes (Python 2 str, loaded with encoding='bytes') decoded."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin-1")
    return str(value)


def _release(path: Path) -> str:
    """The release a file's folder promises, for 'not a ... python pickle' messages."""
    return {CIFAR100_DIR: "CIFAR-100", CIFAR10_DIR: "CIFAR-10"}.get(path.parent.name, "CIFAR")


def _not_cifar(path: Path, why: str) -> UserError:
    return UserError(_one_line(f"{path}: not a {_release(path)} python pickle ({why})"))


def _layout_of(folder: Path) -> str | None:
    """'train/test' (CIFAR-100 release file names), 'batches' (CIFAR-10 release) or None."""
    if not folder.is_dir():
        return None
    if (folder / "train").is_file() and (folder / "test").is_file():
        return "train/test"
    if (folder / "test_batch").is_file() or _batch_names(folder):
        return "batches"
    return None


def _batch_names(folder: Path) -> list[str]:
    """data_batch_<n> files in the folder, in numeric order."""
    names = [p.name for p in folder.glob("data_batch_*") if p.is_file() and p.name[11:].isdigit()]
    return sorted(names, key=lambda n: int(n[11:]))


def find_cifar_dir(path: Path) -> Path | None:
    """The folder holding CIFAR python pickles: `path` itself, else `path/cifar-100-python`, else
    `path/cifar-10-batches-py`; None when none of them has either release's layout.

    CIFAR-100 layout: `train` and `test` files. CIFAR-10 layout: `test_batch` or any `data_batch_N`
    file (load_cifar then names whatever else is missing). Reads no file contents; raises nothing.
    """
    for candidate in (path, path / CIFAR100_DIR, path / CIFAR10_DIR):
        if _layout_of(candidate) is not None:
            return candidate
    return None


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            record = pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise _not_cifar(path, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(record, dict):
        raise _not_cifar(path, f"holds a {type(record).__name__}, not a dict")
    return {_text(k): v for k, v in record.items()}


def _keys(record: dict) -> str:
    keys = sorted(record)
    return ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "") if keys else "none"


def _examples(values) -> str:
    """Up to three distinct offending values, for messages."""
    distinct = sorted({v.item() if isinstance(v, np.generic) else v for v in values})
    shown = ", ".join(repr(v) if isinstance(v, str) else f"{v:g}" if isinstance(v, float) else str(v)
                      for v in distinct[:3])
    return shown + (", ..." if len(distinct) > 3 else "")


def _pixels(path: Path, data: np.ndarray, notes: list[str]) -> np.ndarray:
    """Any integer or float pixel array -> uint8, or UserError."""
    if data.dtype == np.uint8:
        return data
    kind = data.dtype.kind
    if kind not in "iuf":
        raise UserError(f"{path}: 'data' holds {data.dtype} values; expected uint8 pixels 0-255 "
                        f"(or integers 0-255, or floats in [0, 1])")
    if kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            raise UserError(f"{path}: 'data' has {data.size - np.count_nonzero(finite)} NaN or infinite values; "
                            f"expected pixels 0-255 (or floats in [0, 1])")
    low, high = data.min(), data.max()
    if low < 0 or high > 255:
        bad = data[(data < 0) | (data > 255)]
        raise UserError(f"{path}: 'data' has {bad.size} values outside 0-255 ({_examples(bad[:1000])}); "
                        f"expected pixels 0-255 or floats in [0, 1], not normalised data")
    if kind != "f":
        return data.astype(np.uint8)
    if high <= 1:
        notes.append(f"{path}: float pixels in [0, 1] scaled to 0-255")
        data = data.astype(np.float32) * 255
    return np.rint(data).astype(np.uint8)


def _images(path: Path, raw, notes: list[str]) -> np.ndarray:
    """The 'data' entry -> (N, 32, 32, 3) uint8, C-contiguous."""
    try:
        data = np.asarray(raw)
    except Exception as exc:
        raise UserError(_one_line(f"{path}: 'data' is not an array ({type(exc).__name__}: {exc})")) from None
    if data.ndim == 2 and data.shape[1] == ROW:
        chw = True
    elif data.ndim == 4 and data.shape[1:] in ((SIDE, SIDE, 3), (3, SIDE, SIDE)):
        chw = data.shape[1] == 3
    else:
        raise UserError(f"{path}: 'data' has shape {data.shape}; expected (N, {ROW}) rows of CHW planes as "
                        f"released, or (N, {SIDE}, {SIDE}, 3) images")
    if len(data) == 0:
        raise UserError(f"{path}: 'data' holds no images")
    data = _pixels(path, data, notes)
    if chw:  # rows are 1024 red, 1024 green, 1024 blue values: CHW planes -> HWC, the layout loaders crop
        data = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(data)


@dataclass
class _Record:
    """One data file read: images, and labels as given (int64 indices, or names when `named`)."""

    path: Path
    images: np.ndarray             # (N, 32, 32, 3) uint8
    labels: np.ndarray | list | None  # (N,) int64, or N str when named; None when not read
    named: bool
    key: str | None                # "fine_labels", "labels" or None


def _label_values(path: Path, key: str, raw) -> tuple[np.ndarray | list[str], bool]:
    """A labels entry -> ((N,) int64 indices, False) or (N names, True); UserError for anything else."""
    try:
        labels = np.asarray(raw)
    except Exception:
        labels = None
    if labels is None or labels.ndim != 1:
        shape = "not a list" if labels is None else f"shape {labels.shape}"
        raise UserError(f"{path}: '{key}' has {shape}; expected one label per image")
    kind = labels.dtype.kind
    if kind == "O":  # mixed Python objects: all names, or all numbers
        values = labels.tolist()
        if all(isinstance(v, (str, bytes)) for v in values):
            return [_text(v) for v in values], True
        bad = [v for v in values if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real)]
        if bad:
            raise UserError(_one_line(f"{path}: '{key}' holds {type(bad[0]).__name__} {bad[0]!r}; labels must "
                                      f"be class indices or class names"))
        labels, kind = np.asarray(values, dtype=np.float64), "f"
        if all(isinstance(v, numbers.Integral) for v in values):
            labels, kind = np.asarray(values, dtype=np.int64), "i"
    if kind in "US":
        return [_text(v) for v in labels.tolist()], True
    if kind == "b":
        raise UserError(f"{path}: '{key}' holds booleans; labels must be class indices or class names")
    if kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.rint(labels))
        if bad.any():
            raise UserError(f"{path}: {np.count_nonzero(bad)} of {len(labels)} '{key}' values are not whole "
                            f"numbers ({_examples(labels[bad])}); labels must be class indices")
        return labels.astype(np.int64), False
    if kind in "iu":
        return labels.astype(np.int64), False
    raise UserError(f"{path}: '{key}' holds {labels.dtype} values; labels must be class indices or class names")


def _read_record(path: Path, labels_required: bool, notes: list[str]) -> _Record:
    record = _read_pickle(path)
    key = next((k for k in ("fine_labels", "labels") if k in record), None)
    if "data" not in record or (key is None and labels_required):
        raise _not_cifar(path, f"no 'data' and 'fine_labels' or 'labels' entries; keys: {_keys(record)}")
    images = _images(path, record["data"], notes)
    if not labels_required:
        return _Record(path, images, None, False, key)
    labels, named = _label_values(path, key, record[key])
    if len(labels) != len(images):
        raise UserError(f"{path}: 'data' holds {len(images)} images but '{key}' has {len(labels)} labels")
    return _Record(path, images, labels, named, key)


def _resolve(record: _Record, classes: list[str] | None, source: str) -> np.ndarray:
    """A record's labels -> (N,) int64 indices into `classes` (None: indices, classes not yet known)."""
    path, labels, n = record.path, record.labels, len(record.labels)
    if record.named:
        if classes is None:
            raise UserError(f"{path}: '{record.key}' holds class names, but no meta file names the classes "
                            f"and the training labels are class indices")
        index = {name: i for i, name in enumerate(classes)}
        unknown = [name for name in labels if name not in index]
        if unknown:
            raise UserError(_one_line(f"{path}: {len(unknown)} of {n} labels are not among the {len(classes)} "
                                      f"class names in {source} ({_examples(unknown)})"))
        return np.fromiter((index[name] for name in labels), dtype=np.int64, count=n)
    if classes is not None:
        bad = (labels < 0) | (labels >= len(classes))
        if bad.any():
            raise UserError(f"{path}: {np.count_nonzero(bad)} of {n} labels outside 0..{len(classes) - 1} "
                            f"({_examples(labels[bad])}); {source} names {len(classes)} classes")
    elif (labels < 0).any():
        bad = labels < 0
        raise UserError(f"{path}: {np.count_nonzero(bad)} of {n} labels are negative ({_examples(labels[bad])}); "
                        f"labels must be class indices 0, 1, 2, ...")
    return labels


def _read_names(meta: Path, key: str | None, notes: list[str]) -> list[str] | None:
    """Class names from a meta file, or None (with a note) when it has none."""
    record = _read_pickle(meta)
    order = ("label_names", "fine_label_names") if key == "labels" else ("fine_label_names", "label_names")
    name_key = next((k for k in order if k in record), None)
    if name_key is None:
        notes.append(f"{meta}: no 'fine_label_names' or 'label_names' entry; classes are not named")
        return None
    raw = record[name_key]
    values = None if isinstance(raw, (str, bytes, dict)) else list(raw) if hasattr(raw, "__iter__") else None
    if values is None or not all(isinstance(v, (str, bytes)) for v in values):
        raise UserError(_one_line(f"{meta}: '{name_key}' must be a list of class names, not "
                                  f"{type(raw).__name__}{'' if values is None else ' of other things'}"))
    names = [_text(v) for v in values]
    if not names:
        raise UserError(f"{meta}: '{name_key}' is empty")
    seen: set[str] = set()
    twice = [name for name in names if name in seen or seen.add(name)]
    if twice:
        raise UserError(_one_line(f"{meta}: '{name_key}' names {twice[0]!r} more than once"))
    return names


def read_cifar_split(path: Path, labels_required: bool = True, classes: list[str] | None = None,
                     notes: list[str] | None = None) -> ArraySplit:
    """One pickle: a training or test split, or (labels_required=False) unlabelled images to predict.

    Returns ArraySplit(images (N, 32, 32, 3) uint8 HWC, labels (N,) int64). `data` and labels are read
    as described in the module docstring. labels_required=False reads only `data`: any labels in the
    file are ignored and the labels returned are zeros. `classes` (names) maps name labels to their
    indices and bounds index labels to [0, len(classes)); without it, name labels map to the file's
    sorted unique names and index labels need only be non-negative. Things worth telling the user
    (float pixels rescaled) are appended to `notes` when given.

    Raises UserError (one line naming the file) for a file that is not a pickled dict with `data`
    (and `fine_labels` or `labels` when required), and for any shape, pixel value or label refused above.
    """
    notes = [] if notes is None else notes
    record = _read_record(path, labels_required, notes)
    if not labels_required:
        return ArraySplit(record.images, np.zeros(len(record.images), dtype=np.int64))
    source = "the classes given"
    if classes is None and record.named:
        classes, source = sorted(set(record.labels)), "this file's labels"
    return ArraySplit(record.images, _resolve(record, classes, source))


def load_cifar(path: Path) -> DataSet:
    """The CIFAR-10 or CIFAR-100 python release (or pickles in either format) under `path`.

    Finds the folder with find_cifar_dir. Returns a DataSet of kind "cifar" whose train and val are
    ArraySplits (images (N, 32, 32, 3) uint8 HWC, labels (N,) int64): train from `train` or from
    `data_batch_1` ... `data_batch_5` concatenated in order, val from `test` or `test_batch`. Its layout
    is "cifar-10-batches-py" for the CIFAR-10 release layout or CIFAR-10-style `labels` keys, else
    "cifar-100-python". Classes come from the meta file, else from name labels, else "0" ... "K-1".
    Notes list float pixels rescaled, data_batch files not used, and other CIFAR folders passed over.

    Raises UserError (one line naming the file or folder) when no layout is found, a CIFAR-10 file is
    missing, or any file, pixel value or label is refused (see the module docstring).
    """
    root = find_cifar_dir(path)
    if root is None:
        raise UserError(f"{path}: no CIFAR python pickles here or in {path / CIFAR100_DIR} or "
                        f"{path / CIFAR10_DIR} (expected train and test, or data_batch_1 ... data_batch_5 "
                        f"and test_batch)")
    notes: list[str] = []
    others = [c for c in (path, path / CIFAR100_DIR, path / CIFAR10_DIR) if c != root and _layout_of(c)]
    if others:
        notes.append(f"using the CIFAR pickles in {root}; {', '.join(map(str, others))} not used")
    batches = _layout_of(root) == "batches"
    if not batches:
        train_files, test_file, meta_names = [root / "train"], root / "test", ("meta", "batches.meta")
        if (root / "test_batch").is_file() or _batch_names(root):
            notes.append(f"{root}: train and test used; the CIFAR-10 data_batch/test_batch files are not")
    else:
        missing = [n for n in CIFAR10_TRAIN + ("test_batch",) if not (root / n).is_file()]
        if missing:
            raise UserError(f"{root}: CIFAR-10 python pickles without {', '.join(missing)} (the release has "
                            f"data_batch_1 ... data_batch_5 and test_batch)")
        unused = [n for n in _batch_names(root) if n not in CIFAR10_TRAIN]
        if unused:
            notes.append(f"{root}: {', '.join(unused)} not used (CIFAR-10 trains on data_batch_1 ... data_batch_5)")
        train_files, test_file = [root / n for n in CIFAR10_TRAIN], root / "test_batch"
        meta_names = ("batches.meta", "meta")

    train = [_read_record(f, True, notes) for f in train_files]
    key = train[0].key
    layout = CIFAR10_DIR if batches or key == "labels" else CIFAR100_DIR
    meta = next((root / n for n in meta_names if (root / n).is_file()), None)
    classes = _read_names(meta, key, notes) if meta is not None else None
    source = meta.name if meta is not None else ""
    if classes is None and any(r.named for r in train):
        classes = sorted({name for r in train if r.named for name in r.labels})
        source = "the training split's labels"
    test = _read_record(test_file, True, notes)
    train_labels = [_resolve(r, classes, source) for r in train]
    test_labels = _resolve(test, classes, source)
    if classes is None:
        classes = [str(i) for i in range(int(max(max(y.max() for y in train_labels), test_labels.max())) + 1)]
    images = train[0].images if len(train) == 1 else np.concatenate([r.images for r in train])
    train_split = ArraySplit(images, np.concatenate(train_labels))
    return DataSet("cifar", layout, classes, train_split, ArraySplit(test.images, test_labels), root,
                   notes=notes)
