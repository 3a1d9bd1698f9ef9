"""The cache's augmentation as batched tensor ops (fasttrain/data/device_augment.py), on the CPU.

Equality with the DataLoader where the ops are deterministic (evaluation), membership where they
are random (every training crop is one of the 81 x 2 pad-crop-flips of its source image), and the
same data order as the DALI cache path, so FASTTRAIN_CACHE_AUGMENT can switch between them.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from fasttrain.cli import main
from fasttrain.data import build_loaders, open_dataset
from fasttrain.data.dali_loader import dali_available, decode_to_device
from fasttrain.data.device_augment import DeviceCacheLoader, random_resized_boxes
from fasttrain.data.order import EpochOrder
from fasttrain.errors import UserError
from fasttrain.recipes import CNN_SEED, IMAGENET_MEAN, IMAGENET_STD, RESNET_SEED

from conftest import write_cifar

CPU = torch.device("cpu")
needs_dali = pytest.mark.skipif(not dali_available(), reason="needs NVIDIA DALI (pip install nvidia-dali-cuda130): "
                                "the cache is built by dali_loader")


def loaders_for(data, recipe, augment, monkeypatch, loader="dali", cache="gpu", batch=8, **kwargs):
    monkeypatch.setenv("FASTTRAIN_CACHE_AUGMENT", augment)
    recipe = recipe.replace(loader=loader, cache=cache, batch_size=batch, channels_last=True)
    return build_loaders(data, recipe, CPU, 1 if loader == "dali" else 0, seed=0, **kwargs)


def pixels(images, mean, std):
    """Normalised float batches back to uint8 values (B, 3, H, W), as integers."""
    mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((images * std + mean) * 255).round().to(torch.int64)


@pytest.fixture(scope="module")
def unique_cifar(tmp_path_factory):
    """48 training images, each its own class: a label names the sample it came from."""
    root = tmp_path_factory.mktemp("unique")
    write_cifar(root, n_train=48, n_test=20)
    data = open_dataset("cnn", root)
    data.train.labels = np.arange(48, dtype=np.int64)
    data.classes = [f"sample{i}" for i in range(48)]
    return data


# ---- CNN ----------------------------------------------------------------------------------


@needs_dali
@pytest.mark.parametrize("augment, atol", [("device", 1e-6), ("dali", 1e-5)])
def test_cnn_evaluation_equals_the_dataloader(augment, atol, cifar_root, monkeypatch):
    data = open_dataset("cnn", cifar_root)
    cached = loaders_for(data, CNN_SEED, augment, monkeypatch)
    baseline = loaders_for(data, CNN_SEED, augment, monkeypatch, loader="torch", cache="none")
    assert cached.backend == f"{augment}-cache"
    got, want = list(cached.val), list(baseline.val)
    assert [len(y) for _, y in got] == [len(y) for _, y in want] == [8, 8, 4]  # every image once, last batch short
    for (images, labels), (ref_images, ref_labels) in zip(got, want):
        assert torch.equal(labels, ref_labels) and labels.dtype == torch.int64
        assert images.dtype == torch.float32 and images.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(images, ref_images, atol=atol, rtol=0)


def _candidates(image: np.ndarray, padding: int) -> torch.Tensor:
    """Every RandomCrop(padding) + flip of an (H, W, 3) uint8 image: (offsets^2 * 2, 3, H, W), offsets
    in row-major (dy, dx) order, unflipped then flipped."""
    source = torch.from_numpy(image).permute(2, 0, 1).to(torch.int64)
    h, w = source.shape[1:]
    padded = F.pad(source, (padding,) * 4)
    crops = torch.stack([padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * padding + 1)
                         for dx in range(2 * padding + 1)])
    return torch.cat([crops, crops.flip(-1)])


@needs_dali
def test_cnn_training_crops_are_pad_crop_flips_of_their_source(unique_cifar, monkeypatch):
    data = unique_cifar
    loaders = loaders_for(data, CNN_SEED, "device", monkeypatch)
    order = EpochOrder(len(data.train), 8, True, seed=0)
    offsets, flips = [], []
    for epoch in (1, 2):
        expected = order.indices(epoch)
        batches = list(loaders.train)
        labels = torch.cat([y for _, y in batches])
        assert labels.tolist() == data.train.labels[expected].tolist()  # labels travel with their images
        values = pixels(torch.cat([x for x, _ in batches]), loaders.mean, loaders.std)
        for image, sample in zip(values, expected):
            match = (_candidates(data.train.images[sample], 4) == image).flatten(1).all(1).nonzero().view(-1)
            assert len(match), f"epoch {epoch}: image of sample {sample} is no pad-crop-flip of it"
            k = int(match[0])
            offsets.append(k % 81)
            flips.append(k >= 81)
    for start in range(0, len(offsets), 8):  # within each batch the crops differ
        assert len(set(offsets[start:start + 8])) > 1
    assert len(set(offsets)) > 20                    # 96 draws of 81 offsets
    assert 0.25 < np.mean(flips) < 0.75              # 96 flips at p = 0.5: 5 sigma


@needs_dali
def test_cnn_training_visits_samples_in_the_dali_loaders_order(unique_cifar, monkeypatch):
    data = unique_cifar
    device = loaders_for(data, CNN_SEED, "device", monkeypatch)
    dali = loaders_for(data, CNN_SEED, "dali", monkeypatch)
    assert (device.backend, dali.backend) == ("device-cache", "dali-cache")
    assert isinstance(device.train, DeviceCacheLoader) and not isinstance(dali.train, DeviceCacheLoader)
    for _ in range(2):  # a new permutation each epoch, the same one for both
        assert [y.tolist() for _, y in device.train] == [y.tolist() for _, y in dali.train]


@needs_dali
def test_a_resumed_run_makes_the_same_batches(unique_cifar, monkeypatch):
    def same(batches, reference):
        return len(batches) == len(reference) and all(
            torch.equal(x, rx) and torch.equal(y, ry) for (x, y), (rx, ry) in zip(batches, reference))

    whole = loaders_for(unique_cifar, CNN_SEED, "device", monkeypatch)
    first, second = list(whole.train), list(whole.train)
    resumed = loaders_for(unique_cifar, CNN_SEED, "device", monkeypatch, start_epoch=2, start_step=3)
    assert same(list(resumed.train), second[3:])
    assert same(list(loaders_for(unique_cifar, CNN_SEED, "device", monkeypatch).train), first)  # a rerun


@needs_dali
def test_nchw_when_channels_last_is_off(cifar_root, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_CACHE_AUGMENT", "device")
    data = open_dataset("cnn", cifar_root)
    loaders = build_loaders(data, CNN_SEED.replace(loader="dali", cache="gpu", batch_size=8), CPU, 1, 0)
    for loader in (loaders.train, loaders.val):
        images, _ = next(iter(loader))
        assert images.is_contiguous() and images.shape == (8, 3, 32, 32)
    assert loaders.train.prefetch_batches == 0 and loaders.train.on_skip == []


@needs_dali
def test_the_choice_is_named_and_checked(cifar_root, monkeypatch):
    data = open_dataset("cnn", cifar_root)
    assert "DALI's operators" in loaders_for(data, CNN_SEED, "dali", monkeypatch).notes[-1]
    assert "batched tensor ops" in loaders_for(data, CNN_SEED, "device", monkeypatch).notes[-1]
    with pytest.raises(UserError, match="FASTTRAIN_CACHE_AUGMENT"):
        loaders_for(data, CNN_SEED, "gpu", monkeypatch)
    assert loaders_for(data, CNN_SEED, "gpu", monkeypatch, cache="none").backend == "dali-cpu"  # no cache, no choice


# ---- ResNet -------------------------------------------------------------------------------


@needs_dali
def test_resnet_batches_and_evaluation_from_the_file_cache(jpeg_root, monkeypatch):
    data = open_dataset("resnet", jpeg_root)
    loaders = loaders_for(data, RESNET_SEED, "device", monkeypatch, batch=4)
    assert loaders.backend == "device-cache"
    for images, labels in loaders.train:
        assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.is_contiguous(memory_format=torch.channels_last)
    got = list(loaders.val)
    images, labels = torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
    assert images.is_contiguous(memory_format=torch.channels_last) and labels.tolist() == data.val.labels.tolist()
    # evaluation is torchvision's CenterCrop(224) of the cache (256 px squares), normalised
    cache, kept = decode_to_device(data.val, RESNET_SEED, CPU, 1)
    assert len(kept) == len(data.val)
    reference = v2.Compose([v2.CenterCrop(224), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(torch.from_numpy(cache).permute(0, 3, 1, 2))
    assert torch.allclose(images, reference, atol=1e-5, rtol=0)
    # and close to the DataLoader's Resize(256) + CenterCrop(224) of the files (other decoder and filter)
    files = torch.cat([x for x, _ in loaders_for(data, RESNET_SEED, "device", monkeypatch, "torch", "none", 4).val])
    assert (images - files).abs().mean() < 0.08


@needs_dali
def test_resnet_evaluation_of_cifar_arrays_resamples_like_torchvision(cifar_root, monkeypatch):
    data = open_dataset("resnet", cifar_root)
    got = torch.cat([x for x, _ in loaders_for(data, RESNET_SEED, "device", monkeypatch).val])
    want = torch.cat([x for x, _ in loaders_for(data, RESNET_SEED, "device", monkeypatch, "torch", "none").val])
    # 32 -> 256 px is an enlargement: bilinear both ways; PIL rounds to uint8 (0.5/255/0.225 = 0.009)
    assert got.shape == want.shape == (20, 3, 224, 224)
    assert (got - want).abs().max() < 0.05 and (got - want).abs().mean() < 0.01


def _coordinate_cache(n: int, side: int = 256) -> torch.Tensor:
    """n copies of an image whose red channel is x and green channel is y (0..255)."""
    x = torch.arange(side).view(1, side).expand(side, side)
    return torch.stack([x, x.t(), torch.full_like(x, 128)], -1).to(torch.uint8).expand(n, side, side, 3).contiguous()


def test_resnet_random_resized_crops_follow_torchvisions_rule(monkeypatch):
    n = 256
    loader = DeviceCacheLoader(_coordinate_cache(n), torch.zeros(n, dtype=torch.int64),
                               EpochOrder(n, 64, True, seed=0), RESNET_SEED.replace(channels_last=True),
                               (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), train=True, seed=0)
    images = torch.cat([x for x, _ in loader])                            # pixel values, unnormalised
    x, y = images[:, 0], images[:, 1]
    left, right = x[:, :, 0].mean(1), x[:, :, -1].mean(1)
    top, bottom = y[:, 0, :].mean(1), y[:, -1, :].mean(1)
    # edge pixel centres lie half an output pixel inside the crop: width = span * 224 / 223
    width, height = (right - left).abs() * 224 / 223, (bottom - top).abs() * 224 / 223
    area, aspect = width * height / 256 ** 2, width / height
    assert area.min() > 0.07 and area.max() < 1.01
    assert aspect.min() > 0.74 and aspect.max() < 1.35
    flips = (left > right).float().mean()
    assert 0.35 < flips < 0.65                                            # 256 flips at p = 0.5
    # the same distribution as torchvision's own sampler
    torch.manual_seed(0)
    params = [v2.RandomResizedCrop.get_params(torch.empty(3, 256, 256), [0.08, 1.0], [3 / 4, 4 / 3])
              for _ in range(2000)]
    tv_area = np.array([h * w for _, _, h, w in params]) / 256 ** 2
    tv_log_aspect = np.array([math.log(w / h) for _, _, h, w in params])
    assert abs(area.mean().item() - tv_area.mean()) < 0.05
    assert abs(aspect.log().mean().item() - tv_log_aspect.mean()) < 0.05
    assert abs(area.std().item() - tv_area.std()) < 0.05


def test_random_resized_boxes_are_whole_pixels_inside_the_image():
    generator = torch.Generator().manual_seed(0)
    boxes = random_resized_boxes(4096, 60, 200, generator, CPU)  # wide: many tries fail
    x1, y1, x2, y2 = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round()) and (x1 >= 0).all() and (y1 >= 0).all()
    assert (x2 <= 200).all() and (y2 <= 60).all() and (x2 > x1).all() and (y2 > y1).all()
    assert (x1 == 0).any() and (x2 == 200).any()  # every position can be drawn, the last one too
    # 4 x 1000: no try fits, so torchvision's fallback: height 4, width round(4 * 4/3) = 5, centred
    fallback = random_resized_boxes(16, 4, 1000, generator, CPU)
    assert fallback.tolist() == [[497.0, 0.0, 502.0, 4.0]] * 16


# ---- the command line -----------------------------------------------------------------------


@needs_dali
def test_training_from_the_device_cache(cifar_root, tmp_path, monkeypatch):
    monkeypatch.delenv("FASTTRAIN_CACHE_AUGMENT", raising=False)  # the default
    out = tmp_path / "run"
    assert main(["cnn", "--recipe", "fast", "--device", "cpu", "--loader", "dali", "--cache", "gpu", "--data",
                 str(cifar_root), "--epochs", "1", "--batch-size", "8", "--workers", "0", "--no-compile",
                 "--train-limit", "16", "--val-limit", "8", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loader"] == "device-cache" and summary["epochs_completed"] == 1
