"""Loader plus training for one short epoch, so the data stall shows: `data_wait_fraction` is the
share of the epoch the training loop spent waiting for its next batch.

Groups `e2e-cnn` (the fast CNN recipe on CIFAR-shaped arrays) and `e2e-resnet` (ResNet-18
fine-tuned on bird-photo-sized JPEGs), each with the DataLoader, DALI and DALI from the cache.
The epoch is the trainer's own (`TrainStep`, compiled as the trainer compiles it); images_per_sec
counts the images that reached the training step, and every call must train on a whole epoch.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from torch import nn

from benchmarks.common import CUDA, DEVICE, SIZES, run
from benchmarks.test_loaders import VARIANTS, _skip_unavailable
from fasttrain.data import build_loaders, cap
from fasttrain.data.torch_loader import default_workers
from fasttrain.device import choose_precision, compiler, prepare_model
from fasttrain.models import build_model, trainable_parameters
from fasttrain.recipes import get_recipe
from fasttrain.train import ForwardLoss, TrainStep, make_optimizer, make_scheduler, train_one_epoch


def _bench(benchmark, pipeline, variant, data, model_name, images, batch):
    _skip_unavailable(variant)
    loader, cache, where, augment = VARIANTS[variant]
    recipe = get_recipe(model_name, "fast", finetune=True).replace(
        loader=loader, cache=cache, batch_size=batch, amp=CUDA, compile=CUDA, cache_augment=augment)
    data = cap(dataclasses.replace(data), images, None)
    loaders = build_loaders(data, recipe, where, default_workers(), seed=0)
    expected = len(data.train) // batch * batch  # training loaders deliver whole batches only
    assert expected > 0
    model = prepare_model(build_model(model_name, data.num_classes, recipe, weights="none"), DEVICE,
                          recipe.channels_last)
    optimizer = make_optimizer(trainable_parameters(model), recipe, fused=CUDA)
    scheduler = make_scheduler(optimizer, recipe, len(loaders.train))
    precision = choose_precision(DEVICE, recipe.amp)
    scaler, loss_fn = precision.grad_scaler(), nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    compile_ = compiler(recipe.compile, recipe.compile_mode)  # as the trainer: model and loss in one graph
    forward_loss = ForwardLoss(model, loss_fn)
    step_fn = TrainStep(compile_(forward_loss) if compile_ else forward_loss, optimizer, scheduler, scaler, precision)
    epochs = []

    def epoch():
        batches = _on_device(loaders.train)
        stats = train_one_epoch(step_fn, batches, model, DEVICE, tally_compiler=compile_)
        assert stats.images == batches.images and math.isfinite(stats.loss), (stats, batches.images)
        epochs.append(stats)
        return batches.images

    run(benchmark, epoch, pipeline=pipeline, variant=variant, batch_size=batch, images=expected, counted=True,
        precision=precision.name, backend=loaders.backend, compiled=recipe.compile)
    timed = epochs[-SIZES.rounds:] if benchmark.stats is not None else epochs[-1:]
    benchmark.extra_info["data_wait_fraction"] = sum(e.data_wait_fraction for e in timed) / len(timed)
    assert 0 <= benchmark.extra_info["data_wait_fraction"] <= 1


class _on_device:
    """A loader on the CPU (dali-cpu) still has to reach the GPU; the copy counts as waiting.

    `images` counts what arrived.
    """

    def __init__(self, loader):
        self.loader, self.images = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            self.images += labels.shape[0]
            yield images.to(DEVICE, non_blocking=True), labels.to(DEVICE, non_blocking=True)


@pytest.mark.parametrize("variant", ["torch", "dali", "dali-cache", "device-cache"])
def test_e2e_cnn(benchmark, variant, cifar_data):
    _bench(benchmark, "e2e-cnn", variant, cifar_data, "cnn", SIZES.e2e_cnn_images, SIZES.cnn_fast_batch)


@pytest.mark.parametrize("variant", ["torch", "dali-cpu", "dali", "dali-cache", "device-cache"])
def test_e2e_resnet(benchmark, variant, photo_data):
    _bench(benchmark, "e2e-resnet", variant, photo_data, "resnet", SIZES.e2e_resnet_images, SIZES.resnet_fast_batch)
