"""CIFAR python pickles as users have them: both releases' layouts, odd labels, odd pixel arrays."""

import pickle

import numpy as np
import pytest

from fasttrain.cli import main
from fasttrain.data import open_dataset
from fasttrain.data.cifar import find_cifar_dir, load_cifar, read_cifar_split
from fasttrain.errors import UserError

from conftest import CLASSES, write_cifar

CIFAR10_NAMES = ["airplane", "automobile", "bird"]


def dump(path, record):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(record, f, protocol=2)


def rows(n, start=0):
    """n distinct CHW rows: image i is filled with (start + i) % 256 in red, 7 in green, 9 in blue."""
    data = np.empty((n, 3, 1024), dtype=np.uint8)
    data[:, 0] = ((start + np.arange(n)) % 256)[:, None]
    data[:, 1], data[:, 2] = 7, 9
    return data.reshape(n, 3072)


def write_cifar10(folder, per_batch=4, n_test=5, names=CIFAR10_NAMES, batches=range(1, 6), str_keys=False):
    """The cifar-10-batches-py release layout; batch b's images are numbered 10 * b + i."""
    k = (lambda s: s) if str_keys else (lambda s: s.encode())
    for b in batches:
        dump(folder / f"data_batch_{b}", {k("data"): rows(per_batch, 10 * b), k("batch_label"): b"batch",
                                          k("labels"): [(b + i) % len(names) for i in range(per_batch)]})
    dump(folder / "test_batch", {k("data"): rows(n_test, 200), k("labels"): [i % len(names) for i in range(n_test)]})
    dump(folder / "batches.meta", {k("label_names"): [n.encode() for n in names], k("num_vis"): 3072})
    return folder


def write_split_files(folder, train, test, names=None, labels_key=b"labels", names_key=b"label_names"):
    """`train`/`test` (and `meta`) files: train and test are (data, labels) pairs."""
    for split, (data, labels) in (("train", train), ("test", test)):
        dump(folder / split, {b"data": data, labels_key: labels})
    if names is not None:
        dump(folder / "meta", {names_key: names})
    return folder


def refused(path, *fragments):
    """load_cifar's one-line UserError, which must hold every fragment."""
    with pytest.raises(UserError) as info:
        load_cifar(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize("str_keys", [False, True])
def test_cifar10_release_from_the_folder_or_its_parent(tmp_path, str_keys):
    folder = write_cifar10(tmp_path / "cifar-10-batches-py", str_keys=str_keys)
    for path in (tmp_path, folder):
        data = load_cifar(path)
        assert data.kind == "cifar" and data.layout == "cifar-10-batches-py" and data.root == folder
        assert data.classes == CIFAR10_NAMES
        assert data.train.images.shape == (20, 32, 32, 3) and data.train.images.dtype == np.uint8
        # the five batches in order 1..5, each row unpacked from CHW planes
        assert data.train.images[:, 3, 5, 0].tolist() == [10 * b + i for b in range(1, 6) for i in range(4)]
        assert data.train.images[0, 3, 5].tolist() == [10, 7, 9]
        assert data.train.labels.tolist() == [(b + i) % 3 for b in range(1, 6) for i in range(4)]
        assert data.val.labels.tolist() == [0, 1, 2, 0, 1] and data.val.images[:, 0, 0, 0].tolist() == [200, 201,
                                                                                                        202, 203, 204]
    assert open_dataset("cnn", tmp_path).layout == "cifar-10-batches-py"


def test_cifar100_release_says_so(cifar_root):
    data = load_cifar(cifar_root)
    assert data.layout == "cifar-100-python" and data.classes == CLASSES and data.notes == []


def test_train_test_files_with_cifar10_keys_keep_their_class_names(tmp_path):
    write_split_files(tmp_path, (rows(6), [0, 1, 2, 3, 4, 0]), (rows(2), [4, 3]),
                      names=[b"a", b"b", b"c", b"d", b"e"])
    data = load_cifar(tmp_path)
    assert data.classes == ["a", "b", "c", "d", "e"] and data.layout == "cifar-10-batches-py"
    assert data.val.labels.tolist() == [4, 3]


def test_a_cifar100_meta_names_fine_labels_even_with_label_names_beside(tmp_path):
    folder = tmp_path / "cifar-100-python"
    write_split_files(folder, (rows(2), [0, 1]), (rows(1), [1]), labels_key=b"fine_labels")
    dump(folder / "meta", {b"label_names": [b"wrong", b"names"], b"fine_label_names": [b"fine", b"names"]})
    assert load_cifar(tmp_path).classes == ["fine", "names"]


def test_find_cifar_dir(tmp_path):
    assert find_cifar_dir(tmp_path) is None
    (tmp_path / "train").mkdir()  # class folders named train/ and test/ are no CIFAR layout
    (tmp_path / "test").mkdir()
    (tmp_path / "meta").write_bytes(b"")
    assert find_cifar_dir(tmp_path) is None
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert find_cifar_dir(tmp_path) is None
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"")
    assert find_cifar_dir(tmp_path) == tmp_path / "cifar-10-batches-py"
    write_cifar(tmp_path)
    assert find_cifar_dir(tmp_path) == tmp_path / "cifar-100-python"


def test_a_cifar10_folder_missing_batches_names_them(tmp_path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-py", batches=(1, 2, 4, 5))
    refused(tmp_path, str(folder), "data_batch_3")
    (folder / "test_batch").unlink()
    refused(tmp_path, "data_batch_3, test_batch")


def test_extra_batches_and_a_second_layout_are_noted_not_used(tmp_path):
    folder = write_cifar10(tmp_path / "cifar-10-batches-py", batches=range(1, 7))
    write_cifar(tmp_path)
    data = load_cifar(tmp_path)
    assert data.layout == "cifar-100-python" and len(data.train) == 48
    assert any(str(folder) in note and "not used" in note for note in data.notes)
    data = load_cifar(folder)
    assert len(data.train) == 20 and any("data_batch_6 not used" in note for note in data.notes)


# ---------------------------------------------------------------------------------------------
# labels


def test_labels_outside_the_named_classes_are_refused(tmp_path):
    folder = write_cifar10(tmp_path)
    dump(folder / "data_batch_2", {b"data": rows(4), b"labels": [0, -1, 2, -1]})
    refused(folder, "data_batch_2", "2 of 4 labels", "-1", "3 classes")
    dump(folder / "data_batch_2", {b"data": rows(4), b"labels": [0, 3, 7, 2]})
    refused(folder, "data_batch_2", "2 of 4 labels outside 0..2", "3, 7", "batches.meta")


def test_negative_labels_are_refused_without_class_names(tmp_path):
    write_split_files(tmp_path, (rows(3), [0, 1, 2]), (rows(3), [-1, -1, 0]))
    message = refused(tmp_path, str(tmp_path / "test"), "2 of 3 labels are negative", "-1")
    assert "CIFAR python pickle" not in message  # the file is one; its labels are wrong


def test_class_name_labels_map_through_the_meta_names(tmp_path):
    write_split_files(tmp_path, (rows(3), [b"bird", b"airplane", "bird"]), (rows(1), np.array(["automobile"])),
                      names=CIFAR10_NAMES)
    data = load_cifar(tmp_path)
    assert data.classes == CIFAR10_NAMES
    assert data.train.labels.tolist() == [2, 0, 2] and data.val.labels.tolist() == [1]
    dump(tmp_path / "test", {b"data": rows(2), b"labels": [b"bird", b"horse"]})
    refused(tmp_path, str(tmp_path / "test"), "1 of 2 labels", "'horse'", "meta")


def test_class_name_labels_without_meta_become_the_classes(tmp_path):
    write_split_files(tmp_path, (rows(4), ["dog", "cat", "dog", "ant"]), (rows(2), ["cat", "ant"]))
    data = load_cifar(tmp_path)
    assert data.classes == ["ant", "cat", "dog"]
    assert data.train.labels.tolist() == [2, 1, 2, 0] and data.val.labels.tolist() == [1, 0]
    dump(tmp_path / "test", {b"data": rows(2), b"labels": ["cat", "emu"]})
    refused(tmp_path, str(tmp_path / "test"), "'emu'", "training split")


@pytest.mark.parametrize("labels, fragment", [([True, False], "booleans"),
                                              ([0.0, 1.5], "not whole numbers (1.5)"),
                                              ([0, float("inf")], "not whole numbers (inf)"),
                                              ([0, None], "NoneType None"),
                                              ([[0, 1], [1, 0]], "shape (2, 2)")])
def test_labels_that_are_not_class_indices_are_refused(tmp_path, labels, fragment):
    write_split_files(tmp_path, (rows(2), labels), (rows(1), [0]))
    refused(tmp_path, str(tmp_path / "train"), fragment)


def test_whole_float_labels_are_indices(tmp_path):
    write_split_files(tmp_path, (rows(2), np.array([1.0, 0.0])), (rows(1), [2.0]))
    data = load_cifar(tmp_path)
    assert data.train.labels.dtype == np.int64 and data.train.labels.tolist() == [1, 0]
    assert data.classes == ["0", "1", "2"]


def test_a_label_count_that_differs_from_the_images_is_refused(tmp_path):
    write_split_files(tmp_path, (rows(3), [0, 1]), (rows(1), [0]))
    refused(tmp_path, str(tmp_path / "train"), "3 images", "2 labels")


def test_meta_names_must_be_names(tmp_path):
    write_split_files(tmp_path, (rows(2), [0, 1]), (rows(1), [0]), names=[b"a", b"a"])
    refused(tmp_path, "meta", "'a' more than once")
    dump(tmp_path / "meta", {b"label_names": []})
    refused(tmp_path, "meta", "empty")


# ---------------------------------------------------------------------------------------------
# pixels


def test_float_pixels_in_0_1_are_scaled_and_noted(tmp_path):
    data = rows(2).astype(np.float32) / 255
    write_split_files(tmp_path, (data, [0, 1]), (rows(1) + 0.6, [1]))
    loaded = load_cifar(tmp_path)
    assert loaded.train.images.dtype == np.uint8
    assert np.array_equal(loaded.train.images, load_cifar_arrays(rows(2)))
    assert np.array_equal(loaded.val.images, load_cifar_arrays(rows(1) + 1))  # floats in 0..255: rounded, no note
    assert loaded.notes == [f"{tmp_path / 'train'}: float pixels in [0, 1] scaled to 0-255"]


def load_cifar_arrays(data):
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_wider_integer_pixels_are_cast(tmp_path):
    write_split_files(tmp_path, (rows(2).astype(np.int64), [0, 1]), (rows(1), [1]))
    assert np.array_equal(load_cifar(tmp_path).train.images, load_cifar_arrays(rows(2)))


def test_hwc_images_are_taken_as_they_are(tmp_path):
    hwc = np.ascontiguousarray(load_cifar_arrays(rows(3)))
    write_split_files(tmp_path, (hwc, [0, 1, 2]), (rows(3).reshape(3, 3, 32, 32), [0, 1, 2]))
    data = load_cifar(tmp_path)
    assert np.array_equal(data.train.images, hwc) and np.array_equal(data.val.images, hwc)


def with_values(values, dtype=np.float64):
    data = np.full((2, 3072), 0.5, dtype=dtype)
    data[1, :len(values)] = values
    return data


@pytest.mark.parametrize("data, fragment", [(with_values([-1, -1, -0.5]), "3 values outside 0-255 (-1, -0.5)"),
                                            (np.full((2, 3072), 256, dtype=np.int32), "outside 0-255 (256)"),
                                            (np.full((2, 3072), np.nan), "6144 NaN"),
                                            (np.zeros((2, 3072), dtype=bool), "bool"),
                                            (np.zeros((2, 32, 32)), "shape (2, 32, 32)")])
def test_pixels_that_cannot_be_right_are_refused(tmp_path, data, fragment):
    write_split_files(tmp_path, (data, [0, 1]), (rows(1), [1]))
    refused(tmp_path, str(tmp_path / "train"), fragment)


# ---------------------------------------------------------------------------------------------
# files that are no CIFAR pickles, predict's unlabelled pickle, the CLI


@pytest.mark.parametrize("content", [b"junk", pickle.dumps([1, 2]), pickle.dumps({"labels": [0]})])
def test_non_cifar_files_are_refused_as_cifar_python_pickles(tmp_path, content):
    (tmp_path / "train").write_bytes(content)
    (tmp_path / "test").write_bytes(content)
    refused(tmp_path, f"{tmp_path / 'train'}: not a CIFAR python pickle (")
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "data_batch_1").write_bytes(content)
    refused(folder, f"{folder / 'data_batch_1'}: not a CIFAR-10 python pickle (")


def test_an_unlabelled_pickle_reads_for_prediction(tmp_path):
    dump(tmp_path / "images", {b"data": rows(3)})
    split = read_cifar_split(tmp_path / "images", labels_required=False)
    assert split.images.shape == (3, 32, 32, 3) and split.labels.tolist() == [0, 0, 0]
    dump(tmp_path / "images", {"data": rows(3), "labels": [-1, None]})  # whatever labels it has: not looked at
    assert len(read_cifar_split(tmp_path / "images", labels_required=False)) == 3
    with pytest.raises(UserError, match="'labels' holds NoneType None"):  # once required, they are checked
        read_cifar_split(tmp_path / "images")
    dump(tmp_path / "images", {b"data": np.zeros((0, 3072), dtype=np.uint8)})
    with pytest.raises(UserError, match="'data' holds no images"):
        read_cifar_split(tmp_path / "images", labels_required=False)
    dump(tmp_path / "images", {b"labels": [0]})
    with pytest.raises(UserError, match="not a CIFAR python pickle .no 'data'"):
        read_cifar_split(tmp_path / "images", labels_required=False)


def test_read_cifar_split_takes_classes(tmp_path):
    dump(tmp_path / "part", {b"data": rows(2), b"labels": [b"cat", b"ant"]})
    assert read_cifar_split(tmp_path / "part").labels.tolist() == [1, 0]
    assert read_cifar_split(tmp_path / "part", classes=["cat", "ant"]).labels.tolist() == [0, 1]
    notes = []
    dump(tmp_path / "part", {b"data": rows(2) / 255.0, b"labels": [0, 3]})
    with pytest.raises(UserError, match="1 of 2 labels outside 0..1 .3."):
        read_cifar_split(tmp_path / "part", classes=["cat", "ant"], notes=notes)
    assert read_cifar_split(tmp_path / "part", notes=notes).labels.tolist() == [0, 3]
    assert notes[-1].endswith("float pixels in [0, 1] scaled to 0-255")


def test_the_cli_says_what_is_wrong_in_one_line(tmp_path, capsys):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    dump(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": rows(2), b"labels": [0, -1]})
    assert main(["preview", "cnn", "--data", str(tmp_path), "--device", "cpu", "--loader", "torch",
                 "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "test_batch: 1 of 2 labels outside 0..2 (-1)" in err
