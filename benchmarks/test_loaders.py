"""Input pipelines alone: images per second delivered on the training device, one epoch a call.

Group `cifar`: the DataLoader with torchvision transforms against DALI (on the CPU, on the GPU)
and DALI from the cache. Group `jpeg`: the same for bird-photo-sized JPEGs decoded to 224 px.
images_per_sec counts the images that arrived, and every call must deliver a whole epoch: each
batch of the recipe's shape, on the device, len(loader) of them.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import CUDA, DEVICE, SIZES, needs_dali, run
from fasttrain.data import build_loaders
from fasttrain.data.torch_loader import default_workers
from fasttrain.recipes import CNN_FAST, RESNET_FAST

# variant -> (loader, cache, where the pipeline runs, how the cache's batches are augmented)
VARIANTS = {
    "torch": ("torch", "none", DEVICE, "auto"),
    "dali-cpu": ("dali", "none", torch.device("cpu"), "auto"),
    "dali": ("dali", "none", DEVICE, "auto"),
    "dali-cache": ("dali", "gpu", DEVICE, "dali"),
    "device-cache": ("dali", "gpu", DEVICE, "device"),
}


def _epoch(loader, batch: int, size: int) -> int:
    """Consume one epoch as the training loop would: every batch on the training device.

    Returns the images that arrived; every batch must have the training loop's shape.
    """
    count = 0
    for images, labels in loader:
        if images.device != DEVICE:  # DALI on the CPU still has to reach the GPU
            images, labels = images.to(DEVICE, non_blocking=True), labels.to(DEVICE, non_blocking=True)
        assert images.shape == (batch, 3, size, size) and labels.shape == (batch,), (images.shape, labels.shape)
        assert images.device.type == DEVICE.type and images.dtype == torch.float32
        count += images.shape[0]
    return count


def _bench(benchmark, pipeline, variant, data, recipe, batch):
    loader, cache, where, augment = VARIANTS[variant]
    recipe = recipe.replace(loader=loader, cache=cache, batch_size=batch, cache_augment=augment)
    loaders = build_loaders(data, recipe, where, default_workers(), seed=0)
    expected = len(data.train) // batch * batch  # training loaders deliver whole batches only
    assert expected > 0 and len(loaders.train) * batch == expected
    run(benchmark, lambda: _epoch(loaders.train, batch, recipe.image_size), pipeline=pipeline, variant=variant,
        batch_size=batch, images=expected, counted=True, workers=default_workers(), backend=loaders.backend)


def _skip_unavailable(variant):
    if variant != "torch":
        mark = needs_dali()
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    if variant == "dali" and not CUDA:
        pytest.skip("needs a CUDA GPU for DALI's mixed/GPU operators (dali-cpu covers the CPU)")


@pytest.mark.parametrize("variant", ["torch", "dali-cpu", "dali", "dali-cache", "device-cache"])
def test_cifar_loader(benchmark, variant, cifar_data):
    _skip_unavailable(variant)
    _bench(benchmark, "cifar", variant, cifar_data, CNN_FAST, SIZES.cifar_batch)


@pytest.mark.parametrize("variant", ["torch", "dali-cpu", "dali", "dali-cache", "device-cache"])
def test_jpeg_loader(benchmark, variant, photo_data):
    _skip_unavailable(variant)
    _bench(benchmark, "jpeg", variant, photo_data, RESNET_FAST, SIZES.photo_batch)
