"""Using a trained model: `predict` writes a Kaggle-ready CSV, `evaluate` measures it per class.

Both rebuild the model from a checkpoint alone (its recipe, classes and normalisation travel in
it), feed images through the recipe's evaluation transforms with the fastest loader available,
and run in bf16 autocast on a GPU.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fasttrain.data import build_eval_loader
from fasttrain.data.cifar import read_cifar_split
from fasttrain.data.datasets import NOT_A_SPLIT, no_data, open_for_evaluation, same_name
from fasttrain.data.decode import DEFAULT_MAX_PIXELS
from fasttrain.data.index import Index, build_index, probe, shown
from fasttrain.data.splits import ArraySplit, FileSplit
from fasttrain.data.torch_loader import default_workers
from fasttrain.device import choose_precision, device_name, prepare_model, resolve_device
from fasttrain.errors import UserError
from fasttrain.models import build_model
from fasttrain.outputs import atomic_write, folders_to_make, load_checkpoint, remove_if_empty
from fasttrain.recipes import recipe_from_dict

CHECKPOINT_KEYS = {"model", "recipe", "classes", "model_name", "mean", "std"}
EVALUATION_FILES = ("metrics.json", "per_class.csv", "confusion.csv", "confusion.png")


@dataclass
class Trained:
    model: torch.nn.Module
    model_name: str
    recipe: object
    classes: list[str]
    mean: list[float]
    std: list[float]


def load_trained(path: Path, device: torch.device, batch_size: int | None = None) -> Trained:
    if not path.is_file():
        raise UserError(f"--checkpoint {path}: no such file")
    ck = load_checkpoint(path)
    if not isinstance(ck, dict) or not CHECKPOINT_KEYS <= ck.keys():
        raise UserError(f"--checkpoint {path}: not a fasttrain checkpoint (no recipe, classes or model inside)")
    recipe = recipe_from_dict(ck["recipe"])
    if batch_size:
        recipe = recipe.replace(batch_size=batch_size)
    model = build_model(ck["model_name"], len(ck["classes"]), recipe, weights="none")
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError:
        raise UserError(f"--checkpoint {path}: its weights do not fit a {ck['model_name']} with "
                        f"{len(ck['classes'])} classes") from None
    model = prepare_model(model, device, recipe.channels_last).eval()
    return Trained(model, ck["model_name"], recipe, list(ck["classes"]), list(ck["mean"]), list(ck["std"]))


@torch.no_grad()
def run_model(trained: Trained, loader, device: torch.device, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k class indices and probabilities of every image, and the labels the loader carried."""
    precision = choose_precision(device, device.type == "cuda")
    indices, probs, labels = [], [], []
    for images, y in loader:
        with precision.autocast():
            logits = trained.model(images)
        p, i = logits.float().softmax(1).topk(min(k, logits.shape[1]), dim=1)
        indices.append(i.cpu())
        probs.append(p.cpu())
        labels.append(y.cpu())
    return torch.cat(indices).numpy(), torch.cat(probs).numpy(), torch.cat(labels).numpy()


def _inputs(path: Path, max_pixels: int | None) -> tuple[ArraySplit | FileSplit, list[str], bool, Index | None]:
    """Images to predict: a CIFAR-format pickle file, or every image under a folder (recursively),
    read through the data index: each file is an image with a row, or left out and named."""
    if path.is_file():
        one = probe(str(path))
        if one.problem is None:  # a single image
            return (FileSplit([path], np.zeros(1, dtype=np.int64), np.array([not one.dali])), [path.name], True,
                    None)
        try:
            split = read_cifar_split(path, labels_required=False)
        except UserError as exc:
            raise UserError(f"--data {shown(path)}: neither an image nor a CIFAR python pickle ({exc})") from None
        return split, [str(i) for i in range(len(split))], False, None
    if not path.is_dir():
        raise UserError(f"--data {shown(path)}: no such file or folder")
    index = build_index(path, max_pixels)
    files = list(index.images)
    if not files:
        why = f" ({len(index.left_out)} files left out, e.g. {shown(index.left_out[0][0])}: {index.left_out[0][2]})" \
            if index.left_out else ""
        raise UserError(f"--data {shown(path)}: no images in it or below it{why}")
    split = FileSplit(files, np.zeros(len(files), dtype=np.int64), np.array([not index.images[f].dali for f in files]))
    return split, [f.relative_to(path).as_posix() for f in files], True, index


@contextlib.contextmanager
def checked_out(out: Path, overwrite: bool, results: tuple[str, ...] | None = None):
    """Fail before the work, not after it: `out` (the file a command writes, or with `results` the
    folder that will hold those files) must be writable, and earlier results are kept unless
    `overwrite`. The folder is made and a probe file written and removed in it (os.access says yes to
    root and knows nothing of read-only mounts); folders made here are removed again if the body
    fails before writing into them. Raises UserError (one line) for output that exists without
    `overwrite`, a folder where a file is meant, or a place that cannot be written."""
    folder = out if results is not None else out.parent
    if results is None and out.is_dir():
        raise UserError(f"--out {shown(out)}: a folder; name the file to write")
    earlier = [out] if results is None else [out / name for name in results]
    earlier = [p for p in earlier if p.exists()]
    if earlier and not overwrite:
        raise UserError(f"{shown(earlier[0])} exists; pass --overwrite to replace it" if results is None else
                        f"--out {shown(out)} holds an earlier evaluation ({', '.join(p.name for p in earlier)}); "
                        f"pass --overwrite to replace it")
    blocker = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"--out {shown(out)}: cannot write there ({shown(blocker)} is a file, not a folder)")
    made = folders_to_make(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-").close()
    except OSError as exc:
        remove_if_empty(made)
        raise UserError(f"--out {shown(out)}: cannot write there ({exc.strerror or exc})") from None
    try:
        yield
    except BaseException:
        remove_if_empty(made)
        raise


def _write_csv(out: Path, rows: list[list]) -> None:
    """The whole CSV or nothing: written beside `out`, then renamed over it. Names that are not valid
    UTF-8 are written as the bytes they are on disk."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda f: csv.writer(f).writerows(rows), mode="w", encoding="utf-8",
                     errors="surrogateescape", newline="")
    except OSError as exc:
        raise UserError(f"--out {shown(out)}: cannot write there ({exc.strerror or exc})") from None


def predict(checkpoint: Path, data: Path, out: Path, top_k: int = 1, device_name_: str = "auto",
            batch_size: int = 256, workers: int | None = None, loader: str = "auto",
            max_pixels: int | None = DEFAULT_MAX_PIXELS, overwrite: bool = False) -> dict:
    """Predict every image under `data` (a folder, recursively, or one CIFAR pickle) into the CSV `out`.

    Returns {"images": rows written, "skipped": [(path, reason)] for image files with no row,
    "ignored": files ignored by rule, "backend", "device"}; every file found is in one of them.
    Raises UserError for a bad checkpoint, data or output location (checked before any work), and
    for an existing `out` unless `overwrite`.
    """
    with checked_out(out, overwrite):
        if not data.exists():
            raise UserError(f"--data {shown(data)}: no such file or folder")
        return _predict(checkpoint, data, out, top_k, device_name_, batch_size, workers, loader, max_pixels)


def _predict(checkpoint: Path, data: Path, out: Path, top_k: int, device_name_: str, batch_size: int,
             workers: int | None, loader: str, max_pixels: int | None) -> dict:
    device = resolve_device(device_name_)
    trained = load_trained(checkpoint, device, batch_size)
    split, ids, from_files, index = _inputs(data, max_pixels)
    skipped = [(p, detail) for p, _, detail in index.left_out] if index else []
    failed = []
    eval_loader, backend = build_eval_loader(split, from_files, trained.recipe, device,
                                             workers if workers is not None else default_workers(),
                                             trained.mean, trained.std, loader,
                                             on_skip=lambda path, why: failed.append((path, why)))
    top, probs, _ = run_model(trained, eval_loader, device, max(top_k, 1))
    if failed:  # files that failed to decode have no prediction: keep ids and rows aligned
        gone = {Path(p) for p, _ in failed}
        ids = [i for i, f in zip(ids, split.files) if f not in gone]
    header = ["id", "label"] + [c for j in range(1, top_k + 1) for c in (f"label_{j}", f"prob_{j}")] * (top_k > 1)
    rows = [header]
    for row_id, classes, p in zip(ids, top, probs):
        row = [row_id, trained.classes[classes[0]]]
        if top_k > 1:
            row += [v for j in range(top_k) for v in (trained.classes[classes[j]], f"{p[j]:.5f}")]
        rows.append(row)
    _write_csv(out, rows)
    return {"images": len(ids), "skipped": skipped + failed, "ignored": index.ignored if index else [],
            "backend": backend, "device": device_name(device)}


def evaluate_checkpoint(checkpoint: Path, data: Path | None, out: Path, device_name_: str = "auto",
                        batch_size: int = 256, workers: int | None = None, loader: str = "auto",
                        max_pixels: int | None = DEFAULT_MAX_PIXELS, split: str = "val", overwrite: bool = False,
                        download: bool = False) -> dict:
    """Top-1/top-5, per-class accuracy and the confusion matrix of a checkpoint on a data set's val split.

    The data set is opened as training opens it (the data index); files of the val split that are
    left out, or fail to decode, are counted nowhere and listed in the result's "skipped" with why.
    Raises UserError for a bad checkpoint, mismatched classes, an unwritable `out` or one that holds
    an earlier evaluation (unless `overwrite`), and a `data` folder that is not there (the model's own
    data set is downloaded into it only with `download`, as open_dataset does).
    """
    with checked_out(out, overwrite, EVALUATION_FILES):
        if data is not None and not data.exists() and not download:  # before the checkpoint is loaded
            raise no_data(data) if split == "val" else UserError(f"--data {shown(data)}: no such folder")
        return _evaluate(checkpoint, data, out, device_name_, batch_size, workers, loader, max_pixels, split,
                         download)


def _evaluate(checkpoint: Path, data: Path | None, out: Path, device_name_: str, batch_size: int,
              workers: int | None, loader: str, max_pixels: int | None, split: str, download: bool) -> dict:
    device = resolve_device(device_name_)
    trained = load_trained(checkpoint, device, batch_size)
    dataset = open_for_evaluation(trained.model_name, data, split, trained.classes, max_pixels, download=download)
    if [same_name(c) for c in dataset.classes] != [same_name(c) for c in trained.classes]:
        first = next((a, b) for a, b in itertools.zip_longest(dataset.classes, trained.classes) if a != b)
        raise UserError(f"--data {data}: its {dataset.num_classes} classes differ from the checkpoint's "
                        f"{len(trained.classes)} (first difference: data {first[0]!r}, checkpoint {first[1]!r})")
    scored = dataset.val
    # what the val split lost before loading: files left out of its folder (with a val/ folder), or
    # any file left out (when val is a share of each class, a left-out file may have been in it)
    val_dir = dataset.split_dirs.get("val")
    skipped = [(p, detail) for p, category, detail in dataset.left_out
               if (val_dir in p.parents if val_dir else category not in NOT_A_SPLIT)]
    eval_loader, backend = build_eval_loader(scored, dataset.kind == "folder", trained.recipe, device,
                                             workers if workers is not None else default_workers(),
                                             trained.mean, trained.std, loader,
                                             on_skip=lambda path, why: skipped.append((path, why)))
    top, _, labels = run_model(trained, eval_loader, device, 5)
    n_classes = len(trained.classes)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, top[:, 0]), 1)
    per_class = [{"class": name, "images": int(confusion[i].sum()), "correct": int(confusion[i, i]),
                  "accuracy": float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None}
                 for i, name in enumerate(trained.classes)]
    result = {"checkpoint": str(checkpoint), "data": dataset.describe(), "split": split, "notes": dataset.notes,
              "images": int(len(labels)),
              "top1": float((top[:, 0] == labels).mean()),
              "top5": float((top == labels[:, None]).any(1).mean()), "loader": backend,
              "device": device_name(device),
              "skipped": [{"path": shown(p), "reason": why} for p, why in skipped]}
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "metrics.json", lambda f: f.write(json.dumps(result, indent=2)), mode="w")
        atomic_write(out / "per_class.csv", lambda f: _per_class_csv(f, per_class), mode="w", newline="",
                     encoding="utf-8", errors="surrogateescape")
        atomic_write(out / "confusion.csv", lambda f: _confusion_csv(f, confusion, trained.classes), mode="w",
                     newline="", encoding="utf-8", errors="surrogateescape")
        plot_confusion(confusion, trained.classes, out / "confusion.png",
                       f"{trained.model_name} on {dataset.layout}: top-1 {100 * result['top1']:.2f}%")
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror})") from None
    result["per_class"] = per_class
    return result


def _confusion_csv(f, confusion: np.ndarray, classes: list[str]) -> None:
    """confusion.csv: a header `true \\ predicted,<class>,...`, then one row per true class: its
    name, then how many of its images were predicted as each class (counts, not shares)."""
    writer = csv.writer(f)
    writer.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, confusion):
        writer.writerow([name, *(int(n) for n in row)])


def _per_class_csv(f, per_class: list[dict]) -> None:
    writer = csv.DictWriter(f, fieldnames=["class", "images", "correct", "accuracy"])
    writer.writeheader()
    writer.writerows(per_class)


def plot_confusion(confusion: np.ndarray, classes: list[str], out: Path, title: str) -> None:
    """Rows are true classes, normalised to 1; readable from 3 to 200 classes (names shown up to 40)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    n = len(classes)
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    side = min(22, max(6, 0.11 * n + 4))
    fig, ax = plt.subplots(figsize=(side + 1.5, side), constrained_layout=True)
    image = ax.imshow(rows, cmap="viridis", norm=PowerNorm(0.4, vmin=0, vmax=1), interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.04, label="share of the true class (power scale)")
    step = 1 if n <= 40 else max(1, n // 40)
    ticks = np.arange(0, n, step)
    labels = [shown(classes[i]) if n <= 40 else str(i) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=7 if n <= 40 else 9)
    ax.set_yticks(ticks, labels, fontsize=7 if n <= 40 else 9)
    big = {"fontsize": 10 if n <= 40 else 14}
    ax.set_xlabel("predicted class" + (" (index)" if n > 40 else ""), **big)
    ax.set_ylabel("true class" + (" (index; names in per_class.csv)" if n > 40 else ""), **big)
    ax.set_title(title, **big)
    fig.savefig(out, dpi=110)
    plt.close(fig)
