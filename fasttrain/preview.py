"""`python -m fasttrain preview`: one batch as the model sees it, de-normalised and labelled."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from fasttrain.data import build_loaders, open_dataset
from fasttrain.data.decode import DEFAULT_MAX_PIXELS
from fasttrain.data.index import shown
from fasttrain.device import resolve_device
from fasttrain.errors import UserError
from fasttrain.inference import checked_out
from fasttrain.recipes import get_recipe


def preview(model: str, data_path: Path | None, loader: str, split: str, out: Path, recipe_name: str = "fast",
            batch_size: int = 32, device_name: str = "auto", workers: int = 2, seed: int = 0,
            val_fraction: float = 0.1, cache: str = "none", max_pixels: int | None = DEFAULT_MAX_PIXELS,
            say: Callable[[str], None] = print, overwrite: bool = False, download: bool = False) -> Path:
    """Draw the first batch of a split after augmentation, from the loader (and DALI cache) asked for.

    Val batches come in data-set order, so the grids of two loaders (or of the cache and the files)
    compare picture to picture. Files the data index leaves out, and files that fail to decode, are
    named through `say`. Raises UserError for bad data, an unwritable `out` or an existing one (unless
    `overwrite`), both checked before any work; a missing or empty `data_path` gets the model's own data
    set downloaded into it only with `download` (open_dataset's rule).
    """
    with checked_out(out, overwrite):
        device = resolve_device(device_name)
        data = open_dataset(model, data_path, val_fraction, max_pixels, download=download)
        for note in data.notes:
            say(f"note: {note}")
        for path, _, detail in data.left_out:
            say(f"left out {shown(path)}: {detail}")
        batch = min(batch_size, len(data.train), len(data.val))
        recipe = get_recipe(model, recipe_name).replace(loader=loader, batch_size=batch, cache=cache,
                                                        channels_last=False)
        loaders = build_loaders(data, recipe, device, workers, seed,
                                on_skip=lambda _, path, why: say(f"skipped {shown(path)}: {why}"))
        images, labels = next(iter(loaders.train if split == "train" else loaders.val))
        mean = torch.tensor(loaders.mean).view(1, 3, 1, 1)
        std = torch.tensor(loaders.std).view(1, 3, 1, 1)
        pictures = (images.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        names = [shown(data.classes[i]) for i in labels.cpu().tolist()]
        _draw(pictures, names, out, f"{model} {split} batch, loader {loaders.backend}, recipe {recipe.name}")
        for note in loaders.notes:
            say(f"note: {note}")
        return out


def _draw(pictures, names: list[str], out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = math.ceil(math.sqrt(len(pictures)))
    rows = math.ceil(len(pictures) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.9 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, picture, name in zip(axes.flat, pictures, names):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(name, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror})") from None
    finally:
        plt.close(fig)
