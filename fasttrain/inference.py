"""Using a trained model: `predict` writes a Kaggle-ready CSV, `evaluate` measures it per class.

Both rebuild the model from a checkpoint alone (its recipe, classes and normalisation travel in
it), feed images through the recipe's evaluation transforms with the fastest loader available,
and run in bf16 autocast on a GPU.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fasttrain.data import build_eval_loader, open_dataset
from fasttrain.data.check import drop_unreadable
from fasttrain.data.datasets import IMAGE_EXTENSIONS, ArraySplit, FileSplit, read_cifar_split
from fasttrain.data.torch_loader import default_workers
from fasttrain.device import choose_precision, device_name, prepare_model, resolve_device
from fasttrain.errors import UserError
from fasttrain.models import build_model
from fasttrain.outputs import load_checkpoint
from fasttrain.recipes import recipe_from_dict

CHECKPOINT_KEYS = {"model", "recipe", "classes", "model_name", "mean", "std"}


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


def _inputs(path: Path) -> tuple[ArraySplit | FileSplit, list[str], bool, list[tuple[Path, str]]]:
    """Images to predict: a CIFAR-format pickle file, or every image under a folder (recursively)."""
    if path.is_file():
        try:
            split = read_cifar_split(path, labels_required=False)
        except UserError as exc:
            raise UserError(f"--data {path}: a file, so it must be a CIFAR python pickle ({exc})") from None
        return split, [str(i) for i in range(len(split))], False, []
    if not path.is_dir():
        raise UserError(f"--data {path}: no such file or folder")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"--data {path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in it or below it")
    split, bad = drop_unreadable(FileSplit(files, np.zeros(len(files), dtype=np.int64)))
    return split, [f.relative_to(path).as_posix() for f in split.files], True, bad


def predict(checkpoint: Path, data: Path, out: Path, top_k: int = 1, device_name_: str = "auto",
            batch_size: int = 256, workers: int | None = None, loader: str = "auto") -> dict:
    device = resolve_device(device_name_)
    trained = load_trained(checkpoint, device, batch_size)
    split, ids, from_files, bad = _inputs(data)
    eval_loader, backend = build_eval_loader(split, from_files, trained.recipe, device,
                                             workers if workers is not None else default_workers(),
                                             trained.mean, trained.std, loader)
    skipped = []
    if hasattr(eval_loader, "on_skip"):
        eval_loader.on_skip.append(lambda path, why: skipped.append((path, why)))
    top, probs, _ = run_model(trained, eval_loader, device, max(top_k, 1))
    if skipped:  # files that failed to decode mid-run have no prediction: keep ids and rows aligned
        gone = {Path(p) for p, _ in skipped}
        ids = [i for i, f in zip(ids, split.files) if f not in gone]
    header = ["id", "label"] + [c for j in range(1, top_k + 1) for c in (f"label_{j}", f"prob_{j}")] * (top_k > 1)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for row_id, classes, p in zip(ids, top, probs):
                row = [row_id, trained.classes[classes[0]]]
                if top_k > 1:
                    row += [v for j in range(top_k) for v in (trained.classes[classes[j]], f"{p[j]:.5f}")]
                writer.writerow(row)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror})") from None
    return {"images": len(ids), "skipped": bad + skipped, "backend": backend, "device": device_name(device)}


def evaluate_checkpoint(checkpoint: Path, data: Path | None, out: Path, device_name_: str = "auto",
                        batch_size: int = 256, workers: int | None = None, loader: str = "auto") -> dict:
    device = resolve_device(device_name_)
    trained = load_trained(checkpoint, device, batch_size)
    dataset = open_dataset(trained.model_name, data)
    if dataset.classes != trained.classes:
        first = next((a, b) for a, b in itertools.zip_longest(dataset.classes, trained.classes) if a != b)
        raise UserError(f"--data {data}: its {dataset.num_classes} classes differ from the checkpoint's "
                        f"{len(trained.classes)} (first difference: data {first[0]!r}, checkpoint {first[1]!r})")
    split = dataset.val
    bad = []
    if isinstance(split, FileSplit):
        split, bad = drop_unreadable(split)
    eval_loader, backend = build_eval_loader(split, dataset.kind == "folder", trained.recipe, device,
                                             workers if workers is not None else default_workers(),
                                             trained.mean, trained.std, loader)
    top, _, labels = run_model(trained, eval_loader, device, 5)
    n_classes = len(trained.classes)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, top[:, 0]), 1)
    per_class = [{"class": name, "images": int(confusion[i].sum()), "correct": int(confusion[i, i]),
                  "accuracy": float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None}
                 for i, name in enumerate(trained.classes)]
    result = {"checkpoint": str(checkpoint), "data": dataset.describe(), "split": "val", "images": int(len(labels)),
              "top1": float((top[:, 0] == labels).mean()),
              "top5": float((top == labels[:, None]).any(1).mean()), "loader": backend,
              "device": device_name(device), "skipped": [str(p) for p, _ in bad]}
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        with open(out / "per_class.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["class", "images", "correct", "accuracy"])
            writer.writeheader()
            writer.writerows(per_class)
        np.savetxt(out / "confusion.csv", confusion, fmt="%d", delimiter=",")
        plot_confusion(confusion, trained.classes, out / "confusion.png",
                       f"{trained.model_name} on {dataset.layout}: top-1 {100 * result['top1']:.2f}%")
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror})") from None
    result["per_class"] = per_class
    return result


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
    labels = [classes[i] if n <= 40 else str(i) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90, fontsize=7 if n <= 40 else 9)
    ax.set_yticks(ticks, labels, fontsize=7 if n <= 40 else 9)
    big = {"fontsize": 10 if n <= 40 else 14}
    ax.set_xlabel("predicted class" + (" (index)" if n > 40 else ""), **big)
    ax.set_ylabel("true class" + (" (index; names in per_class.csv)" if n > 40 else ""), **big)
    ax.set_title(title, **big)
    fig.savefig(out, dpi=110)
    plt.close(fig)
