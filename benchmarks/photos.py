"""Generated photographs: bird-photo-sized JPEGs that decode like real ones, for loader benchmarks."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

def photo(rng: np.random.Generator, size=(500, 375)) -> Image.Image:
    """A synthetic photograph: sky-like gradient, soft shapes, fine texture, JPEG-friendly statistics."""
    w, h = size
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    base = (top * (1 - t) + bottom * t).repeat(w, 1)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 10)):
        x, y = rng.integers(0, w), rng.integers(0, h)
        r = rng.integers(15, 120)
        draw.ellipse([x - r, y - r // 2, x + r, y + r // 2], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    texture = rng.normal(0, 12, (h, w, 1)) * np.sin(np.arange(w) / rng.uniform(2, 6))[None, :, None]
    return Image.fromarray(np.clip(np.asarray(image) + texture, 0, 255).astype(np.uint8))


def _write(job: tuple[Path, int, int]) -> None:
    path, seed, quality = job
    photo(np.random.default_rng(seed)).save(path, quality=quality)


def write_photos(root: Path, n: int, classes: int = 8, seed: int = 0) -> Path:
    """n training JPEGs (and n/8 validation ones) in class folders under root, made in parallel."""
    jobs = []
    for split, count, offset in (("train", n, 0), ("val", max(classes, n // 8), 10**6)):
        for i in range(count):
            folder = root / split / f"class{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{i:05d}.jpg", seed * 10**7 + offset + i, 90))
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_write, jobs, chunksize=16))
    return root


