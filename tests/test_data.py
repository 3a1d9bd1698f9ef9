import pickle

import numpy as np
import pytest
import torch

from fasttrain.data import build_loaders, cap, open_dataset, synthetic_dataset
from fasttrain.data.datasets import load_image_folder
from fasttrain.data.transforms import dataset_mean_std
from fasttrain.errors import UserError
from fasttrain.recipes import CNN_SEED, RESNET_SEED

from conftest import CLASSES, class_image, write_class_folders


def test_cifar_pickles_from_the_folder_or_its_parent(cifar_root):
    for path in (cifar_root, cifar_root / "cifar-100-python"):
        data = open_dataset("cnn", path)
        assert data.kind == "cifar" and data.classes == CLASSES
        assert data.train.images.shape == (48, 32, 32, 3) and data.train.images.dtype == np.uint8
        assert data.val.labels.tolist() == [i % 3 for i in range(20)]


def test_cifar_rows_are_unpacked_from_chw_planes(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)]).astype(np.uint8)
    for split in ("train", "test"):
        with open(folder / split, "wb") as f:
            pickle.dump({b"data": row[None], b"fine_labels": [0]}, f)
    data = open_dataset("cnn", tmp_path)
    assert data.train.images[0, 5, 7].tolist() == [10, 20, 30]
    assert data.classes == ["0"]  # no meta file: class indices as names


@pytest.mark.parametrize("content", [b"not a pickle at all", pickle.dumps({"x": 1}), pickle.dumps([1, 2])])
def test_files_that_are_not_cifar_pickles_are_refused(tmp_path, content):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(content)
    (folder / "test").write_bytes(content)
    with pytest.raises(UserError, match="not a CIFAR-100 python pickle"):
        open_dataset("cnn", tmp_path)


def test_train_val_folders(jpeg_root):
    data = open_dataset("resnet", jpeg_root)
    assert data.layout == "train/val" and data.classes == CLASSES
    assert len(data.train) == 24 and len(data.val) == 9
    assert all(f.parent.name == CLASSES[y] for f, y in zip(data.train.files, data.train.labels))


def test_train_test_folders(tmp_path):
    write_class_folders(tmp_path / "train", 2)
    write_class_folders(tmp_path / "test", 1)
    data = open_dataset("resnet", tmp_path)
    assert data.layout == "train/test" and len(data.val) == 3


def test_class_folders_alone_get_a_deterministic_disjoint_split(tmp_path):
    write_class_folders(tmp_path, 10)
    a = load_image_folder(tmp_path, 0.2)
    b = load_image_folder(tmp_path, 0.2)
    assert a.val.files == b.val.files
    assert len(a.val) == 6 and len(a.train) == 24
    assert not set(a.train.files) & set(a.val.files)
    assert sorted(np.bincount(a.val.labels).tolist()) == [2, 2, 2]


def test_cub_release_layout(cub_root):
    for path in (cub_root, cub_root / "CUB_200_2011"):
        data = open_dataset("resnet", path)
        assert data.layout == "CUB_200_2011"
        assert data.classes == ["001.Apple", "002.Bee", "003.Cloud"]
        assert len(data.train) == 9 and len(data.val) == 3
        assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert all(f.is_file() for f in data.train.files)


def test_val_classes_must_exist_in_train(tmp_path):
    write_class_folders(tmp_path / "train", 2)
    (tmp_path / "val" / "zebra").mkdir(parents=True)
    class_image(0, 0).save(tmp_path / "val" / "zebra" / "z.jpg")  # images of a class never trained on
    with pytest.raises(UserError, match="classes not in"):
        open_dataset("resnet", tmp_path)


def test_unknown_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="unknown layout"):
        open_dataset("cnn", tmp_path)


def test_cap_takes_an_even_deterministic_subset(jpeg_root):
    data = cap(open_dataset("resnet", jpeg_root), 12, 4)
    again = cap(open_dataset("resnet", jpeg_root), 12, 4)
    assert len(data.train) == 12 and len(data.val) == 4
    assert data.train.files == again.train.files
    assert len(set(data.train.labels.tolist())) == 3  # not just the first class


def test_dataset_mean_std_of_arrays():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0, ..., 0] = 255
    from fasttrain.data.splits import ArraySplit
    mean, std, bad = dataset_mean_std(ArraySplit(images, np.zeros(2, np.int64)), 32)
    assert bad == []
    assert mean[0] == pytest.approx(0.5) and std[0] == pytest.approx(0.5)
    assert mean[1] == 0 and std[1] == pytest.approx(1e-3)  # flat channels are not divided by zero


def _collect(loader):
    images, labels = zip(*loader)
    return images, torch.cat(labels)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_loader_contract_on_cifar(cifar_root, workers, channels_last):
    data = open_dataset("cnn", cifar_root)
    recipe = CNN_SEED.replace(batch_size=16, channels_last=channels_last)
    loaders = build_loaders(data, recipe, torch.device("cpu"), workers, seed=0)
    assert loaders.backend == "torch" and len(loaders.train) == 3 and len(loaders.val) == 2
    images, labels = _collect(loaders.train)
    assert all(x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 for x in images)
    assert all(x.is_contiguous(memory_format=torch.channels_last) == channels_last for x in images)
    assert labels.dtype == torch.int64
    # evaluation: every sample once, in data-set order, the short last batch kept
    val_images, val_labels = _collect(loaders.val)
    assert [len(x) for x in val_images] == [16, 4]
    assert val_labels.tolist() == data.val.labels.tolist()
    # the training set's own statistics normalise it to about zero mean, unit spread
    flat = torch.cat(val_images).permute(1, 0, 2, 3).reshape(3, -1)
    assert flat.mean(1).abs().max() < 0.5 and (flat.std(1) - 1).abs().max() < 0.5


def test_training_batches_are_reshuffled_each_epoch_and_drop_the_remainder(cifar_root):
    data = open_dataset("cnn", cifar_root)
    loaders = build_loaders(data, CNN_SEED.replace(batch_size=20), torch.device("cpu"), 0, seed=0)
    _, first = _collect(loaders.train)
    _, second = _collect(loaders.train)
    assert len(first) == 40 and not torch.equal(first, second)


def test_torch_loader_on_jpegs_at_224(jpeg_root):
    data = open_dataset("resnet", jpeg_root)
    loaders = build_loaders(data, RESNET_SEED.replace(batch_size=8), torch.device("cpu"), 0, seed=0)
    images, _ = _collect(loaders.train)
    assert all(x.shape == (8, 3, 224, 224) for x in images)
    val_images, val_labels = _collect(loaders.val)
    assert sum(len(x) for x in val_images) == 9 and val_labels.tolist() == data.val.labels.tolist()


def test_cnn_on_jpegs_fits_them_to_32_pixels(jpeg_root):
    data = open_dataset("cnn", jpeg_root)
    loaders = build_loaders(data, CNN_SEED.replace(batch_size=8), torch.device("cpu"), 0, seed=0)
    assert next(iter(loaders.val))[0].shape == (8, 3, 32, 32)


def test_synthetic_loader_contract():
    data = cap(synthetic_dataset(10, 32, 100, 30), None, 25)
    loaders = build_loaders(data, CNN_SEED.replace(batch_size=16, channels_last=True), torch.device("cpu"), 0, 0)
    images, labels = _collect(loaders.train)
    assert len(images) == 6 and all(x.is_contiguous(memory_format=torch.channels_last) for x in images)
    assert labels.max() < 10
    val_images, _ = _collect(loaders.val)
    assert [len(x) for x in val_images] == [16, 9]
    again, _ = _collect(loaders.val)
    assert torch.equal(val_images[0], again[0])  # the same data set every epoch


def test_a_data_set_smaller_than_one_batch_is_refused(cifar_root):
    data = open_dataset("cnn", cifar_root)
    with pytest.raises(UserError, match="no full batch"):
        build_loaders(data, CNN_SEED.replace(batch_size=64), torch.device("cpu"), 0, seed=0)

