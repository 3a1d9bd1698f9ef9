"""Tiny data sets the tests make themselves: CIFAR pickles, JPEG folders, the CUB layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

CLASSES = ["apple", "bee", "cloud"]
COLOURS = [(200, 40, 40), (230, 200, 30), (60, 90, 220), (40, 170, 70)]


def class_image(label: int, i: int, size=(48, 36)) -> Image.Image:
    """A smooth background with a class-coloured ellipse: learnable, and decodes like a photo."""
    w, h = size
    rng = np.random.default_rng(1000 * label + i)
    ramp = np.linspace(0, 120, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
    base = np.clip(ramp + rng.normal(0, 8, (h, w, 3)) + 60, 0, 255).astype(np.uint8)
    image = Image.fromarray(base)
    x, y = rng.integers(0, w // 3), rng.integers(0, h // 3)
    ImageDraw.Draw(image).ellipse([x, y, x + w // 2, y + h // 2], fill=COLOURS[label])
    return image


def write_cifar(root: Path, n_train: int = 48, n_test: int = 20, classes: list[str] = CLASSES) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [i % len(classes) for i in range(n)]
        images = np.stack([np.asarray(class_image(y, i, (32, 32))) for i, y in enumerate(labels)])
        record = {b"data": images.transpose(0, 3, 1, 2).reshape(n, -1), b"fine_labels": labels,
                  b"coarse_labels": [0] * n, b"filenames": [f"{i}.png".encode() for i in range(n)]}
        with open(folder / split, "wb") as f:
            pickle.dump(record, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [c.encode() for c in classes]}, f, protocol=2)
    return folder


def write_class_folders(root: Path, per_class: int, start: int = 0) -> Path:
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            class_image(label, i).save(root / name / f"{name}_{i:03d}.jpg", quality=90)
    return root


def fail_in_evaluation(monkeypatch, epoch: int = 2) -> None:
    """fasttrain.train.evaluate raises, in `epoch` (1-based) of the run, what a dying GPU would."""
    import fasttrain.train as train

    real, calls = train.evaluate, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", dies)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    """Parent folder of a small cifar-100-python/ with 3 classes."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root)
    return root


@pytest.fixture(scope="session")
def jpeg_root(tmp_path_factory) -> Path:
    """train/ and val/ folders of JPEGs, 3 classes."""
    root = tmp_path_factory.mktemp("jpeg")
    write_class_folders(root / "train", per_class=8)
    write_class_folders(root / "val", per_class=3, start=100)
    return root


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory) -> Path:
    """The CUB_200_2011 release layout: images/<class>/<file>, id tables, official split."""
    root = tmp_path_factory.mktemp("cub") / "CUB_200_2011"
    names = [f"{i + 1:03d}.{c.title()}" for i, c in enumerate(CLASSES)]
    images, labels, split, image_id = [], [], [], 0
    for label, name in enumerate(names):
        (root / "images" / name).mkdir(parents=True)
        for i in range(4):
            image_id += 1
            rel = f"{name}/{name}_{i}.jpg"
            class_image(label, i).save(root / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {label + 1}")
            split.append(f"{image_id} {int(i < 3)}")
    for filename, rows in (("images.txt", images), ("image_class_labels.txt", labels),
                           ("train_test_split.txt", split),
                           ("classes.txt", [f"{i + 1} {n}" for i, n in enumerate(names)])):
        (root / filename).write_text("\n".join(rows) + "\n")
    return root.parent


@pytest.fixture(autouse=True, scope="session")
def _index_cache(tmp_path_factory):
    """The data index and decoded copies go to a folder of this test session, never the user's cache."""
    import os

    os.environ["FASTTRAIN_CACHE"] = str(tmp_path_factory.mktemp("fasttrain-cache"))
