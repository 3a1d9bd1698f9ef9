"""A cheap look at every image file before training: can it be an image at all?

Reads each file's header with PIL (magic bytes, format, size), not its pixels, so a large folder
is checked in seconds. Files that fail are left out of both loaders; files that pass but fail to
decode later (truncated data) are handled by the loaders themselves.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from fasttrain.data.datasets import DataSet, FileSplit


def header_problem(path: Path) -> str | None:
    """Why this file cannot be an image, or None when its header is sound."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as exc:
        return f"not an image ({type(exc).__name__})"
    if width < 1 or height < 1:
        return "an image of size 0"
    return None


def decodes(path: Path) -> bool:
    """Whether PIL can decode the whole file: the full check, for a file a loader failed on."""
    try:
        with Image.open(path) as image:
            image.load()
    except Exception:
        return False
    return True


def drop_unreadable(split: FileSplit, workers: int = 8) -> tuple[FileSplit, list[tuple[Path, str]]]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(header_problem, split.files, chunksize=64))
    keep = np.array([p is None for p in problems], dtype=bool)
    bad = [(f, p) for f, p in zip(split.files, problems) if p is not None]
    return (split.take(np.flatnonzero(keep)) if bad else split), bad


def check_files(data: DataSet) -> list[tuple[Path, str]]:
    """Remove files that cannot be images from both splits; return them with the reason."""
    if data.kind != "folder":
        return []
    data.train, bad_train = drop_unreadable(data.train)
    data.val, bad_val = drop_unreadable(data.val)
    return bad_train + bad_val
