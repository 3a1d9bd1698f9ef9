"""DALI pipelines on the CPU: the loader contract, and equivalence with the torch baseline."""

import builtins

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.cli import main
from fasttrain.data import build_loaders, open_dataset
from fasttrain.data import dali_loader
from fasttrain.errors import UserError
from fasttrain.recipes import CNN_SEED, IMAGENET_MEAN, IMAGENET_STD, RESNET_SEED

from conftest import class_image

CPU = torch.device("cpu")


def loaders_for(data, recipe, loader, cache="none", batch=8, threads=2, augment="auto"):
    recipe = recipe.replace(loader=loader, batch_size=batch, cache=cache, channels_last=True, cache_augment=augment)
    return build_loaders(data, recipe, CPU, threads if loader == "dali" else 0, seed=0)


def collect(loader):
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels), [len(x) for x in images]


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    """Bird-photo-sized JPEGs (500x375) in train/ and val/ folders, 3 classes."""
    root = tmp_path_factory.mktemp("photos")
    for split, n, start in (("train", 6, 0), ("val", 3, 50)):
        for label in range(3):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(start, start + n):
                class_image(label, i, (500, 375)).save(folder / f"{i:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def coordinate_root(tmp_path_factory):
    """One 400x300 PNG whose red channel is x and green channel is y, 64 times per split:
    a crop's position and size can be read off its pixels."""
    root = tmp_path_factory.mktemp("coords")
    x = np.linspace(0, 255, 400)[None, :].repeat(300, 0)
    y = np.linspace(0, 255, 300)[:, None].repeat(400, 1)
    image = Image.fromarray(np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8))
    for split in ("train", "val"):
        (root / split / "grid").mkdir(parents=True)
        for i in range(64):
            image.save(root / split / "grid" / f"{i:02d}.png")
    return root


# ---- the loader contract -------------------------------------------------------------------


@pytest.mark.parametrize("layout, model, cache, augment", [
    ("cifar", "cnn", "none", "auto"), ("cifar", "cnn", "gpu", "dali"), ("cifar", "cnn", "gpu", "device"),
    ("jpeg", "cnn", "none", "auto"), ("jpeg", "resnet", "none", "auto"), ("jpeg", "resnet", "gpu", "dali"),
    ("jpeg", "resnet", "gpu", "device"), ("cifar", "resnet", "none", "auto")])
def test_dali_loader_contract(layout, model, cache, augment, cifar_root, jpeg_root):
    data = open_dataset(model, cifar_root if layout == "cifar" else jpeg_root)
    recipe = CNN_SEED if model == "cnn" else RESNET_SEED
    loaders = loaders_for(data, recipe, "dali", cache, augment=augment)
    assert loaders.backend == (f"{augment}-cache" if cache == "gpu" else "dali-cpu")
    size = recipe.image_size
    for _ in range(2):  # two epochs: the iterator resets itself
        batches = list(loaders.train)
        assert len(batches) == len(loaders.train) == len(data.train) // 8
        for images, labels in batches:
            assert images.shape == (8, 3, size, size) and images.dtype == torch.float32
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert labels.dtype == torch.int64 and labels.shape == (8,)
    images, labels, sizes = collect(loaders.val)
    assert len(loaders.val) == len(sizes) and sum(sizes) == len(data.val)  # every sample once
    assert labels.tolist() == data.val.labels.tolist()  # data-set order, same class indices


def test_nchw_when_channels_last_is_off(cifar_root):
    data = open_dataset("cnn", cifar_root)
    loaders = build_loaders(data, CNN_SEED.replace(loader="dali", batch_size=8), CPU, 1, 0)
    images, _ = next(iter(loaders.train))
    assert images.is_contiguous() and images.shape == (8, 3, 32, 32)


def test_training_order_is_reshuffled_every_epoch(cifar_root, jpeg_root):
    for root, model in ((cifar_root, "cnn"), (jpeg_root, "resnet")):
        data = open_dataset(model, root)
        loaders = loaders_for(data, CNN_SEED if model == "cnn" else RESNET_SEED, "dali")
        first, second = collect(loaders.train)[1], collect(loaders.train)[1]
        assert not torch.equal(first, second)


# ---- equivalence with the torch baseline ---------------------------------------------------


def test_cifar_evaluation_is_identical_to_torch(cifar_root):
    data = open_dataset("cnn", cifar_root)
    dali_images, dali_labels, _ = collect(loaders_for(data, CNN_SEED, "dali").val)
    torch_images, torch_labels, _ = collect(loaders_for(data, CNN_SEED, "torch").val)
    assert torch.equal(dali_labels, torch_labels)
    assert torch.allclose(dali_images, torch_images, atol=1e-5)


@pytest.mark.parametrize("model", ["resnet", "cnn"])
def test_jpeg_evaluation_agrees_with_torch(model, photo_root):
    data = open_dataset(model, photo_root)
    recipe = CNN_SEED if model == "cnn" else RESNET_SEED
    dali_images, dali_labels, _ = collect(loaders_for(data, recipe, "dali", batch=4).val)
    torch_images, torch_labels, _ = collect(loaders_for(data, recipe, "torch", batch=4).val)
    assert torch.equal(dali_labels, torch_labels)
    # different JPEG decoders and resampling filters: close, not equal (normalised units; 1/255 ~ 0.017)
    assert (dali_images - torch_images).abs().mean() < 0.08


def test_the_cache_serves_the_same_evaluation_batches_as_the_files(photo_root):
    data = open_dataset("resnet", photo_root)
    from_files, _, _ = collect(loaders_for(data, RESNET_SEED, "dali", "none", batch=4).val)
    from_cache, _, _ = collect(loaders_for(data, RESNET_SEED, "dali", "gpu", batch=4).val)
    assert torch.allclose(from_files, from_cache, atol=1e-4)


def _crop_statistics(loader, epochs: int):
    """Crop area (share of the image), aspect ratio and flips, read off the coordinate image."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    areas, aspects, flips = [], [], []
    for _ in range(epochs):
        for images, _ in loader:
            pixels = (images * std + mean) * 255
            x, y = pixels[:, 0], pixels[:, 1]
            left, right = x[:, :, :2].mean((1, 2)), x[:, :, -2:].mean((1, 2))
            top, bottom = y[:, :2, :].mean((1, 2)), y[:, -2:, :].mean((1, 2))
            width, height = (left - right).abs() / 255, (bottom - top).abs() / 255
            areas += (width * height).tolist()
            aspects += (width * 400 / (height * 300)).tolist()
            flips += (left > right).tolist()
    return np.array(areas), np.array(aspects), np.array(flips, dtype=float)


def test_random_resized_crop_agrees_in_distribution(coordinate_root):
    data = open_dataset("resnet", coordinate_root)
    stats = {name: _crop_statistics(loaders_for(data, RESNET_SEED, name, batch=32).train, epochs=5)
             for name in ("dali", "torch")}
    for name, (area, aspect, flip) in stats.items():
        assert 0.05 < area.min() and area.max() < 1.02, name       # area 0.08-1 of the image
        assert 0.7 < aspect.min() and aspect.max() < 1.4, name     # aspect 3/4-4/3
        assert abs(flip.mean() - 0.5) < 0.1, name                  # 320 flips: 4.5 sigma
    (dali_area, dali_aspect, _), (torch_area, torch_aspect, _) = stats["dali"], stats["torch"]
    assert abs(dali_area.mean() - torch_area.mean()) < 0.08
    assert abs(np.log(dali_aspect).mean() - np.log(torch_aspect).mean()) < 0.08


def test_cifar_pad_crop_agrees_in_distribution(tmp_path):
    """Offsets uniform in -4..4 on each axis, zero padding, flips at 0.5, for both loaders."""
    from conftest import write_cifar
    write_cifar(tmp_path, n_train=256, n_test=8)
    data = open_dataset("cnn", tmp_path)
    data.train.images[:] = np.clip(data.train.images, 40, 255)  # no true zeros: padding is the only black
    results = {}
    for name in ("dali", "torch"):
        loaders = loaders_for(data, CNN_SEED, name, batch=64)
        mean = torch.tensor(loaders.mean).view(1, 3, 1, 1)
        std = torch.tensor(loaders.std).view(1, 3, 1, 1)
        images = torch.cat([x for _ in range(2) for x, _ in loaders.train])
        padded = ((images * std + mean) * 255).round().sum(1) <= 3   # black in all channels
        rows_padded = padded.all(2).sum(1).float()                      # |dy| per image
        cols_padded = padded.all(1).sum(1).float()                      # |dx| per image
        results[name] = (rows_padded, cols_padded)
        for offsets in (rows_padded, cols_padded):
            assert set(offsets.int().tolist()) == {0, 1, 2, 3, 4}, name
            assert abs(offsets.mean().item() - 20 / 9) < 0.3, name     # E|U{-4..4}| = 20/9
    for axis in (0, 1):
        assert abs(results["dali"][axis].mean() - results["torch"][axis].mean()) < 0.4


def test_per_channel_statistics_agree(photo_root):
    data = open_dataset("resnet", photo_root)
    stats = {}
    for name in ("dali", "torch"):
        train = loaders_for(data, RESNET_SEED, name, batch=6).train
        images = torch.cat([x for _ in range(8) for x, _ in train])  # 8 epochs: 144 random crops
        flat = images.permute(1, 0, 2, 3).reshape(3, -1)
        stats[name] = (flat.mean(1), flat.std(1))
    assert torch.allclose(stats["dali"][0], stats["torch"][0], atol=0.15)
    assert torch.allclose(stats["dali"][1], stats["torch"][1], atol=0.15)


# ---- bad input -----------------------------------------------------------------------------


def _folder_with_a_truncated_jpeg(root):
    for label in range(2):
        folder = root / "train" / f"c{label}"
        folder.mkdir(parents=True)
        for i in range(4):
            class_image(label, i, (120, 90)).save(folder / f"{i}.jpg")
        (root / "val" / f"c{label}").mkdir(parents=True)
        class_image(label, 9).save(root / "val" / f"c{label}" / "9.jpg")
    broken = root / "train" / "c1" / "2.jpg"
    broken.write_bytes(broken.read_bytes()[:-400])  # a valid header, scan data cut short: fails mid-decode
    return broken


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_a_file_that_fails_to_decode_mid_epoch_is_named_skipped_and_excluded(loader, tmp_path):
    broken = _folder_with_a_truncated_jpeg(tmp_path)
    data = open_dataset("resnet", tmp_path)
    loaders = loaders_for(data, RESNET_SEED, loader, batch=2)
    skipped = []
    loaders.train.on_skip.append(lambda path, why: skipped.append((path, why)))
    first = [len(y) for _, y in loaders.train]  # the run goes on: the other images still arrive
    second = [len(y) for _, y in loaders.train]
    assert [path for path, _ in skipped] == [broken]  # named once, and not met again
    assert skipped[0][1].startswith("cannot be decoded (")  # with Pillow's reason
    # torch drops the one sample from its batch; DALI rebuilds and continues the epoch over the 7 good files
    assert sum(first) == (7 if loader == "torch" else 6)
    assert sum(second) == 6 and all(n == 2 for n in second) and len(loaders.train) == 3


def test_missing_dali_is_one_line_naming_the_package(monkeypatch, cifar_root):
    real_import = builtins.__import__

    def no_dali(name, *args, **kwargs):
        if name.startswith("nvidia.dali") or (name == "nvidia" and args and args[2] and "dali" in args[2]):
            raise ImportError("No module named 'nvidia.dali'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dali)
    with pytest.raises(UserError, match="pip install nvidia-dali-cuda130"):
        dali_loader.import_dali()
    data = open_dataset("cnn", cifar_root)
    assert loaders_for(data, CNN_SEED, "auto").backend == "torch"  # the default falls back
    assert loaders_for(data, CNN_SEED, "torch").backend == "torch"


# ---- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize("model, layout", [("cnn", "cifar"), ("resnet", "jpeg")])
def test_training_with_the_dali_loader(model, layout, cifar_root, jpeg_root, tmp_path):
    import json
    data = cifar_root if layout == "cifar" else jpeg_root
    extra = ["--weights", "none", "--batch-size", "4", "--train-limit", "12", "--val-limit", "5"] if model == "resnet" \
        else ["--batch-size", "16"]
    out = tmp_path / "run"
    assert main([model, "--loader", "dali", "--device", "cpu", "--epochs", "2", "--data", str(data),
                 "--out", str(out), *extra]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loader"] == "dali-cpu" and summary["epochs_completed"] == 2


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_preview_draws_a_labelled_batch(loader, jpeg_root, tmp_path):
    out = tmp_path / f"{loader}.png"
    assert main(["preview", "resnet", "--data", str(jpeg_root), "--loader", loader, "--split", "val",
                 "--out", str(out), "--device", "cpu", "--batch-size", "6"]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300


def test_preview_serves_the_cache_and_names_the_files_it_leaves_out(tmp_path, capsys):
    _folder_with_a_truncated_jpeg(tmp_path / "data")
    (tmp_path / "data" / "val" / "c0" / "notes.jpg").write_text("not a picture")
    out = tmp_path / "cache.png"
    assert main(["preview", "resnet", "--data", str(tmp_path / "data"), "--cache", "gpu", "--split", "val",
                 "--out", str(out), "--device", "cpu", "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    assert f"left out {tmp_path / 'data' / 'val' / 'c0' / 'notes.jpg'}: not an image" in printed
    assert f"skipped {tmp_path / 'data' / 'train' / 'c1' / '2.jpg'}: cannot be decoded" in printed  # met by the cache
    assert "cache on" in printed and out.is_file()
