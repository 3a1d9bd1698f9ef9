"""Data folders as people really have them: exports, archives, odd formats, damaged and odd-named files.

Each test builds its own odd input, one reported failure per test. Every run is tiny (small images,
one epoch, batch 2, CPU) so the file stays quick on two cores.
"""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fasttrain.cli import main
from fasttrain.data import build_loaders, open_dataset
from fasttrain.data.index import build_index
from fasttrain.errors import UserError
from fasttrain.recipes import CNN_SEED

from conftest import class_image

RUN = ["--recipe", "seed", "--device", "cpu", "--epochs", "1", "--batch-size", "2", "--workers", "0"]
# the seed recipes: fp32, eager, the DataLoader unless --loader says otherwise. ResNet-18 without
# weights trains only its head on CPU and writes a 45 MB checkpoint: the quickest whole run. The CNN
# (a 270 MB checkpoint) runs where its own path matters: dataset mean/std, decoded before training.
RESNET = ["resnet", "--weights", "none", *RUN]
CNN = ["cnn", *RUN]


# ---- helpers -------------------------------------------------------------------------------------


def image(path: Path, label: int = 0, i: int = 0, size=(48, 36), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    class_image(label, i, size).save(path, **save)
    return path


def classes(root: Path, names=("a", "b"), per_class: int = 3, start: int = 0, size=(48, 36)) -> Path:
    """root/<name>/<i>.jpg for each class name."""
    for label, name in enumerate(names):
        for i in range(start, start + per_class):
            image(root / name / f"{i}.jpg", label, i, size, quality=90)
    return root


def truncated(path: Path, label: int = 0, i: int = 0) -> Path:
    """A 120 x 90 JPEG whose header is intact and whose scan data is cut short."""
    image(path, label, i, (120, 90), format="JPEG", quality=90)
    data = path.read_bytes()
    path.write_bytes(data[:-400])
    return path


def apple_double(path: Path) -> Path:
    """What macOS zips put in __MACOSX/ and beside files: an AppleDouble header, no image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60))
    return path


def train(capsys, *args, model=RESNET) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*model, *map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def files_on_disk(root: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(root))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A ResNet-18 head trained one epoch on classes a and b: what predict and evaluate tests load."""
    root = tmp_path_factory.mktemp("ckdata")
    classes(root / "train", per_class=4)
    classes(root / "val", per_class=1, start=10)
    out = tmp_path_factory.mktemp("ckrun") / "run"
    assert main([*RESNET, "--data", str(root), "--out", str(out)]) == 0
    return out / "best.pt"


# ---- 1. split folders by their export names --------------------------------------------------------


def test_roboflow_train_valid_is_a_split_not_two_classes(tmp_path):
    classes(tmp_path / "train", per_class=3)
    classes(tmp_path / "valid", per_class=2, start=10)
    data = open_dataset("cnn", tmp_path)
    assert data.classes == ["a", "b"] and data.layout == "train/valid"
    assert len(data.train) == 6 and len(data.val) == 4
    assert all(f.parts[-3] == "valid" for f in data.val.files)


def test_train_valid_test_validates_on_valid_and_holds_test_out(tmp_path):
    classes(tmp_path / "train", per_class=3)
    classes(tmp_path / "valid", per_class=2, start=10)
    classes(tmp_path / "test", per_class=2, start=20)
    data = open_dataset("cnn", tmp_path)
    assert data.classes == ["a", "b"] and data.layout == "train/valid"
    assert len(data.train) == 6 and len(data.val) == 4
    assert all(f.parts[-3] == "valid" for f in data.val.files)
    held = [p for p, category, _ in data.left_out if category == "held-out test split"]
    assert sorted(held) == sorted((tmp_path / "test").rglob("*.jpg")) and len(held) == 4
    assert data.file_counts()["left_out"] == {"held-out test split": 4}


def test_valid_and_test_without_train_is_one_line_error(tmp_path, capsys):
    classes(tmp_path / "valid", per_class=2)
    classes(tmp_path / "test", per_class=2, start=10)
    line = one_line_error(capsys, [*RESNET, "--data", tmp_path, "--out", tmp_path / "run"])
    assert "train/" in line and "valid/" in line and "test/" in line
    assert not (tmp_path / "run").exists()


# ---- 2. operating-system litter ----------------------------------------------------------------------


def test_macos_and_windows_litter_is_ignored_and_counted(tmp_path):
    classes(tmp_path, per_class=3)
    litter = {
        apple_double(tmp_path / "__MACOSX" / "a" / "._0.jpg"): "macOS archive metadata (__MACOSX/)",
        apple_double(tmp_path / "__MACOSX" / "._a"): "macOS archive metadata (__MACOSX/)",
        apple_double(tmp_path / "a" / "._1.jpg"): "AppleDouble metadata (._*)",
        tmp_path / ".DS_Store": "macOS folder metadata",
        tmp_path / "b" / ".DS_Store": "macOS folder metadata",
        tmp_path / "b" / "Thumbs.db": "Windows thumbnail cache",
        image(tmp_path / ".cache" / "thumb.jpg"): "hidden folder",
    }
    for path in litter:
        if not path.exists():
            path.write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(40))
    data = open_dataset("cnn", tmp_path)
    assert data.classes == ["a", "b"]
    assert len(data.train) + len(data.val) == 6 and data.left_out == []
    assert {p: rule for p, rule in data.ignored} == litter
    counts = data.file_counts()
    assert counts["ignored"] == {"macOS archive metadata (__MACOSX/)": 2, "AppleDouble metadata (._*)": 1,
                                 "macOS folder metadata": 2, "Windows thumbnail cache": 1, "hidden folder": 1}
    assert counts["found"] == files_on_disk(tmp_path) == 13


# ---- 3. formats decided from bytes, not names ------------------------------------------------------------


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_every_image_format_and_extension_is_used(loader, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    made = [image(mixed / "0.gif", 0, 0), image(mixed / "1.tif", 0, 1), image(mixed / "2.JPG", 0, 2, format="JPEG"),
            image(mixed / "3.jfif", 0, 3, format="JPEG"), image(mixed / "4", 0, 4, format="JPEG"),
            image(mixed / "5.png", 0, 5)]
    made += [image(tmp_path / "webp" / f"{i}.webp", 1, i) for i in range(3)]  # a class of .webp files only
    data = open_dataset("cnn", tmp_path)
    assert data.classes == ["mixed", "webp"] and data.left_out == []
    assert sorted(data.train.files + data.val.files) == sorted(made)
    out = tmp_path.parent / f"run-{loader}"
    code, printed, _ = train(capsys, "--loader", loader, "--data", tmp_path, "--out", out)
    assert code == 0
    s = summary(out)
    assert s["loader"] == ("dali-cpu" if loader == "dali" else "torch")
    assert s["files"]["train"] + s["files"]["val"] == 9 and s["files"]["left_out"] == {} and s["skipped_files"] == 0
    assert "skipped" not in printed and "left out" not in printed


# ---- 4. classes with too little in them -------------------------------------------------------------------


def test_an_empty_class_folder_is_a_one_line_error_naming_it(tmp_path, capsys):
    classes(tmp_path, per_class=3)
    (tmp_path / "zebra").mkdir()
    line = one_line_error(capsys, [*RESNET, "--data", tmp_path, "--out", tmp_path.parent / "run"])
    assert "'zebra'" in line and "no training image" in line


def test_a_val_folder_without_images_is_ignored_with_a_note_and_one_with_images_is_refused(tmp_path):
    data = tmp_path / "data"
    classes(data / "train", per_class=3)
    classes(data / "val", per_class=2)
    (data / "val" / "empty" / "inner").mkdir(parents=True)   # no file at all
    (data / "val" / "notes").mkdir()
    (data / "val" / "notes" / "readme.txt").write_text("not an image")  # named in skipped.txt, as ever
    opened = open_dataset("resnet", data)
    assert opened.classes == ["a", "b"] and len(opened.val) == 4
    assert any("empty/, notes/ have no images and are not classes of train/: ignored" in n for n in opened.notes)
    image(data / "val" / "zebra" / "0.jpg")  # a class the model never trains on: refused, as before
    with pytest.raises(UserError, match="classes not in .*: zebra"):
        open_dataset("resnet", data)


def test_a_class_with_a_single_image_trains_with_a_note(tmp_path, capsys):
    classes(tmp_path, per_class=3)
    image(tmp_path / "c" / "only.jpg", 2, 0)
    out = tmp_path.parent / "run"
    code, printed, _ = train(capsys, "--data", tmp_path, "--out", out)
    assert code == 0
    assert "note: 1 class has no validation image: c" in printed
    assert summary(out)["data"]["classes"] == 3


# ---- 8-10. damaged files ------------------------------------------------------------------------------


def test_cnn_with_a_truncated_jpeg_names_it_and_finishes(tmp_path, capsys):
    data = tmp_path / "data"
    classes(data, per_class=4, size=(120, 90))
    broken = truncated(data / "a" / "1.jpg", 0, 1)
    out = tmp_path / "run"
    code, printed, _ = train(capsys, "--data", data, "--out", out, model=CNN)
    assert code == 0
    assert f"skipped {broken}: cannot be decoded" in printed  # found by the mean/std pass, named at once
    assert (out / "skipped.txt").exists() and f"{broken}\tdamaged\tcannot be decoded" in (out / "skipped.txt").read_text()
    s = summary(out)
    assert s["files"]["left_out"] == {"damaged": 1} and s["files"]["train"] + s["files"]["val"] == 7
    assert s["skipped_files"] == 1


def test_strict_refuses_a_truncated_file_in_one_line(tmp_path, capsys):
    data = tmp_path / "data"
    classes(data, per_class=4)
    broken = truncated(data / "b" / "2.jpg", 1, 2)
    line = one_line_error(capsys, [*CNN, "--strict", "--data", data, "--out", tmp_path / "run"])
    assert "--strict" in line and str(broken) in line and "cannot be decoded" in line


COLOURS = [(220, 30, 30), (30, 200, 40), (40, 50, 220)]


def colour_image(path: Path, label: int, i: int, size=(64, 48)) -> Path:
    """A class-coloured image with noise: big enough that cutting 400 bytes leaves the header intact."""
    rng = np.random.default_rng(100 * label + i)
    pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    return path


def colour_folder(root: Path) -> list[Path]:
    """train/ 4 + val/ 3 images per class; the second train file and the first val file of c0 truncated."""
    for label in range(3):
        for i in range(4):
            colour_image(root / "train" / f"c{label}" / f"{i}.jpg", label, i)
        for i in range(3):
            colour_image(root / "val" / f"c{label}" / f"{i}.jpg", label, 10 + i)
    broken = [root / "train" / "c0" / "1.jpg", root / "val" / "c0" / "0.jpg"]
    for path in broken:
        path.write_bytes(path.read_bytes()[:-400])
    return broken


@pytest.mark.parametrize("augment", ["device", "dali"])
@pytest.mark.parametrize("normalize", ["imagenet", "dataset"])
def test_the_dali_cache_keeps_labels_with_their_images_when_files_fail(normalize, augment, tmp_path):
    """Every image the cache serves has its own class's colour: a failed file shifts no row.

    With "imagenet" statistics both damaged files reach the cache; with "dataset" statistics the
    mean/std pass finds the training one first and drops it with its label, the cache the val one.
    """
    broken = colour_folder(tmp_path)
    data = open_dataset("cnn", tmp_path)
    recipe = CNN_SEED.replace(loader="dali", cache="gpu", batch_size=2, channels_last=False, normalize=normalize,
                              cache_augment=augment)
    heard = []
    loaders = build_loaders(data, recipe, torch.device("cpu"), 1, 0,
                            on_skip=lambda split, path, why: heard.append((split, path)))
    assert loaders.backend == f"{augment}-cache"
    assert sorted(heard) == [("train", broken[0]), ("val", broken[1])]
    mean = torch.tensor(loaders.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaders.std).view(1, 3, 1, 1)
    palette = torch.tensor(COLOURS, dtype=torch.float32)

    def served(loader) -> tuple[int, list]:
        n, wrong = 0, []
        for images, labels in loader:
            pixels = (images.float() * std + mean) * 255
            centre = pixels[:, :, 10:22, 10:22].mean((2, 3))  # inside every padded random crop
            nearest = torch.cdist(centre, palette).argmin(1)
            wrong += [(int(a), int(b)) for a, b in zip(nearest, labels) if a != b]
            n += len(labels)
        return n, wrong

    n_val, wrong_val = served(loaders.val)
    assert wrong_val == [] and n_val == 8  # 9 val files, one damaged
    for _ in range(2):
        n_train, wrong_train = served(loaders.train)
        assert wrong_train == [] and n_train == 10  # 11 good training files: 5 whole batches of 2


def test_the_dali_cache_names_and_counts_damaged_files_in_a_run(tmp_path, capsys):
    data = tmp_path / "data"
    broken = colour_folder(data)
    out = tmp_path / "run"
    code, printed, _ = train(capsys, "--loader", "dali", "--cache", "gpu", "--data", data, "--out", out)
    assert code == 0
    listed = (out / "skipped.txt").read_text()
    for path in broken:
        assert f"skipped {path}: cannot be decoded" in printed
        assert f"{path}\tdamaged\tcannot be decoded" in listed
    s = summary(out)
    assert s["loader"] == "device-cache" and s["skipped_files"] == 2
    assert s["files"]["left_out"] == {"damaged": 2}
    assert (s["files"]["train"], s["files"]["val"], s["files"]["found"]) == (11, 8, 21)


# ---- 11. evaluate with damaged files ----------------------------------------------------------------------


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_evaluate_names_damaged_val_files_and_scores_the_rest(loader, checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    classes(data / "train", per_class=2)
    classes(data / "val", per_class=2, start=10)
    text = data / "val" / "a" / "notes.jpg"
    text.write_text("a text file with a .jpg name")
    broken = truncated(data / "val" / "b" / "9.jpg", 1, 9)
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--loader", loader, "--batch-size", "2", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert f"not scored {text}: not an image" in printed
    assert f"not scored {broken}: cannot be decoded" in printed
    result = json.loads((out / "metrics.json").read_text())
    assert sorted(item["path"] for item in result["skipped"]) == sorted([str(text), str(broken)])
    assert result["images"] == 4
    with open(out / "per_class.csv") as f:
        assert sum(int(row["images"]) for row in csv.DictReader(f)) == 4


# ---- 12. file names that are not UTF-8 -----------------------------------------------------------------------


def latin1_folder(root: Path) -> list[bytes]:
    names = []
    for label, folder in enumerate(("a", "b")):
        for i in range(3):
            raw = (b"caf\xe9-%d.jpg" if label == 0 else b"\xff\xfe-%d.jpg") % i
            image(root / folder / os.fsdecode(raw), label, i)
            names.append(folder.encode() + b"/" + raw)
    return names


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_names_that_are_not_utf8_train(loader, tmp_path, capsys):
    data = tmp_path / "data"
    latin1_folder(data)
    out = tmp_path / "run"
    code, _, _ = train(capsys, "--loader", loader, "--data", data, "--out", out)
    assert code == 0
    s = summary(out)
    assert s["loader"] == ("dali-cpu" if loader == "dali" else "torch")
    assert s["files"]["train"] + s["files"]["val"] == 6 and s["files"]["left_out"] == {}


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_predict_writes_names_that_are_not_utf8_as_their_bytes(loader, checkpoint, tmp_path, capsys):
    data = tmp_path / "data"
    names = latin1_folder(data)
    out = tmp_path / "preds.csv"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--loader", loader, "--batch-size", "2", "--workers", "0"]) == 0
    assert "Traceback" not in "".join(capsys.readouterr())
    raw = out.read_bytes()
    rows = raw.splitlines()
    assert rows[0] == b"id,label" and len(rows) == 7
    assert sorted(r.split(b",")[0] for r in rows[1:]) == sorted(names)  # the bytes on disk, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "preds.csv"]  # no temporary file left


# ---- 13. predict on a Kaggle-style flat test folder ------------------------------------------------------------


def test_predict_a_flat_test_folder_with_odd_files(checkpoint, tmp_path, capsys):
    test = tmp_path / "test"
    image(test / "0001.webp", 0, 1)
    image(test / "0002.tif", 1, 2)
    image(test / "0003", 0, 3, format="JPEG")
    (test / "notes.txt").write_text("photographed on a phone, see README")
    (test / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(40))
    out = tmp_path / "submission.csv"
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(test), "--out", str(out),
                 "--device", "cpu", "--workers", "0"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == ["0001.webp", "0002.tif", "0003"]
    assert {r["label"] for r in rows} <= {"a", "b"}
    assert f"no row for {test / 'notes.txt'}: not an image" in printed
    assert printed[-1].startswith(f"wrote {out}: 3 predictions, 1 files with no row, "
                                  f"1 ignored (1 macOS folder metadata)")


# ---- 14. every file is counted once ---------------------------------------------------------------------------


def test_every_file_of_a_messy_folder_is_counted_once(tmp_path, capsys):
    data = tmp_path / "data"
    classes(data / "train", per_class=5)
    classes(data / "valid", per_class=2, start=10)
    classes(data / "test", per_class=1, start=20)                          # held-out test split
    image(data / "extras" / "x.jpg")                                      # outside the splits
    image(data / "train" / "stray.jpg")                                   # not in a class folder
    image(data / "sample.jpg")                                            # an image at the top, beside the splits
    (data / "README.txt").write_text("dataset card")                      # not an image
    truncated(data / "train" / "a" / "broken.jpg")                        # damaged, found by the loaders
    (data / "train" / "b" / "notes.jpg").write_text("text")               # not an image
    (data / "train" / "b" / "empty.jpg").write_bytes(b"")                 # empty
    apple_double(data / "__MACOSX" / "train" / "a" / "._0.jpg")           # ignored
    apple_double(data / "train" / "a" / "._0.jpg")                        # ignored
    (data / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")             # ignored
    (data / "train" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")       # ignored
    image(data / ".ipynb_checkpoints" / "x.jpg")                          # ignored
    out = tmp_path / "run"
    code, _, _ = train(capsys, "--train-limit", "6", "--data", data, "--out", out)
    assert code == 0
    files = summary(out)["files"]
    total = (files["train"] + files["val"] + sum(files["left_out"].values()) + sum(files["ignored"].values())
             + sum(files["not_used"].values()))
    assert files["not_used"] == {"--train-limit": 5}  # train/a and train/b hold 11 images
    assert (total, files["found"]) == (files_on_disk(data), files_on_disk(data)), files
    listed = (out / "skipped.txt").read_text().splitlines()
    assert len(listed) == sum(files["left_out"].values()) + sum(files["ignored"].values())


# ---- 15. links, loops and very large images ------------------------------------------------------------------


def test_a_class_folder_linked_from_outside_the_data_root_is_followed(tmp_path):
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    classes(data, names=("a",), per_class=3)
    classes(elsewhere, names=("a", "b"), per_class=3, start=10)
    os.symlink(elsewhere / "b", data / "b", target_is_directory=True)
    ds = open_dataset("cnn", data)
    assert ds.classes == ["a", "b"]
    used = ds.train.files + ds.val.files
    assert sorted(p for p in used if p.parent.name == "b") == [data / "b" / f"{i}.jpg" for i in (10, 11, 12)]
    assert ds.left_out == [] and ds.found == 6


def test_a_folder_link_loop_does_not_hang_and_is_named(tmp_path, capsys):
    data = tmp_path / "data"
    classes(data, per_class=3)
    loop = data / "a" / "again"
    os.symlink(data / "a", loop, target_is_directory=True)  # a link to its own parent folder

    def hung(signum, frame):
        raise TimeoutError("indexing a folder with a link loop did not finish in 60 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        out = tmp_path / "run"
        code, printed, _ = train(capsys, "--data", data, "--out", out)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 0
    # a folder, not a file: named in a note, not counted among the files
    assert f"note: {loop}: a folder link that leads back to a folder above it; not followed" in printed
    assert summary(out)["files"]["train"] + summary(out)["files"]["val"] == 6  # each image once, not twice


def test_an_image_above_max_image_pixels_is_left_out_saying_how_to_allow_it(tmp_path, capsys):
    data = tmp_path / "data"
    classes(data, per_class=3, size=(8, 8))             # 64 pixels each
    big = image(data / "a" / "big.jpg", 0, 9, (20, 20))  # 400 pixels
    out = tmp_path / "run"
    code, printed, _ = train(capsys, "--max-image-pixels", "100", "--data", data, "--out", out)
    assert code == 0
    line = next(l for l in printed.splitlines() if f"left out {big}" in l)
    assert "--max-image-pixels 100" in line and "raise --max-image-pixels" in line
    assert summary(out)["files"]["left_out"] == {"too large": 1}


# ---- the index cache ------------------------------------------------------------------------------------------


def test_the_index_cache_rereads_only_changed_files(tmp_path):
    classes(tmp_path, per_class=3)
    first = build_index(tmp_path)
    assert first.probed == 6 and len(first.images) == 6
    again = build_index(tmp_path)
    assert again.probed == 0 and again.images == first.images
    changed = tmp_path / "b" / "1.jpg"
    before = changed.stat().st_size
    image(changed, 1, 1, (96, 72), quality=90)  # new content, a different size
    assert changed.stat().st_size != before
    third = build_index(tmp_path)
    assert third.probed == 1
    assert (third.images[changed].width, third.images[changed].height) == (96, 72)
    assert {p: v for p, v in third.images.items() if p != changed} == \
        {p: v for p, v in first.images.items() if p != changed}


# ---- found by trying it as a new user ------------------------------------------------------------


def test_a_zip_wrapper_folder_is_read_through_not_trained_as_one_class(tmp_path):
    data = tmp_path / "unzipped"
    classes(data / "dataset" / "Train", per_class=3)
    classes(data / "dataset" / "VALID", per_class=2, start=10)
    classes(data / "dataset" / "test", per_class=2, start=20)
    apple_double(data / "__MACOSX" / "dataset" / "._Train")
    (data / "README.txt").write_text("unzip me")
    opened = open_dataset("resnet", data)
    assert opened.classes == ["a", "b"] and opened.layout == "Train/VALID"
    assert len(opened.train) == 6 and len(opened.val) == 4
    assert any("reading" in n and "the only folder in" in n for n in opened.notes)
    counts = opened.file_counts()
    assert counts["found"] == files_on_disk(data) == 14 + 2  # images, the AppleDouble file and README.txt
    assert counts["left_out"] == {"held-out test split": 4, "not an image": 1}


def test_a_class_written_in_another_unicode_form_is_the_same_class(tmp_path):
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    classes(tmp_path / "train", names=(nfc, "b"), per_class=3)
    classes(tmp_path / "val", names=(nfd, "b"), per_class=2, start=10)  # as a Mac-made zip writes it
    opened = open_dataset("resnet", tmp_path)
    assert opened.classes == ["b", nfc] and sorted(opened.val.labels.tolist()) == [0, 0, 1, 1]


def test_tabs_and_line_breaks_in_names_keep_skipped_txt_one_line_per_file(tmp_path, capsys):
    data = classes(tmp_path / "data", per_class=3)
    (data / "a" / "bad\tname.txt").write_text("x")
    (data / "a" / "bad\nname.txt").write_text("x")
    out = tmp_path / "run"
    code, printed, _ = train(capsys, "--data", data, "--out", out)
    assert code == 0
    rows = (out / "skipped.txt").read_text().splitlines()
    assert len(rows) == 2 and all(len(row.split("\t")) == 3 for row in rows)
    assert "bad\\tname.txt" in printed and "bad\\nname.txt" in printed


def test_class_names_that_are_not_utf8_are_drawn(checkpoint, tmp_path, capsys):
    root = tmp_path / "data"
    for split, n in (("train", 3), ("val", 2)):
        for label, name in enumerate((os.fsdecode(b"caf\xe9"), "b")):
            for i in range(n):
                image(root / split / name / f"{i}.jpg", label, i)
    out = tmp_path / "grid.png"
    assert main(["preview", "resnet", "--data", str(root), "--loader", "torch", "--split", "val", "--out", str(out),
                 "--device", "cpu", "--batch-size", "4"]) == 0 and out.is_file()
    run = tmp_path / "run"
    code, _, _ = train(capsys, "--data", root, "--out", run)
    assert code == 0
    assert main(["evaluate", "--checkpoint", str(run / "best.pt"), "--data", str(root), "--out",
                 str(tmp_path / "eval"), "--device", "cpu"]) == 0
    assert (tmp_path / "eval" / "confusion.png").is_file()
    assert b"caf\xe9" in (tmp_path / "eval" / "per_class.csv").read_bytes()


def test_predict_one_image_file(checkpoint, tmp_path, capsys):
    photo = image(tmp_path / "photo.jpg")
    out = tmp_path / "one.csv"
    assert main(["predict", "--checkpoint", str(checkpoint), "--data", str(photo), "--out", str(out),
                 "--device", "cpu"]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["id", "label"] and len(rows) == 2 and rows[1][0] == "photo.jpg"
    (tmp_path / "notes.txt").write_text("hello")
    line = one_line_error(capsys, ["predict", "--checkpoint", checkpoint, "--data", tmp_path / "notes.txt",
                                   "--out", tmp_path / "x.csv", "--device", "cpu"])
    assert "neither an image nor a CIFAR python pickle" in line


def test_evaluate_scores_the_split_asked_for(checkpoint, tmp_path, capsys):
    root = tmp_path / "data"
    classes(root / "train", per_class=3)
    classes(root / "valid", per_class=1, start=10)
    classes(root / "test", per_class=4, start=20)
    scored = {}
    for split in ("val", "test"):
        out = tmp_path / split
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root), "--split", split,
                     "--out", str(out), "--device", "cpu"]) == 0
        scored[split] = json.loads((out / "metrics.json").read_text())["images"]
    assert scored == {"val": 2, "test": 8}
    # a labelled folder of class folders alone: the held-out share by default, every image with --split all
    for split, expected in (("val", 2), ("all", 8)):
        out = tmp_path / f"alone-{split}"
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(root / "test"), "--split", split,
                     "--out", str(out), "--device", "cpu"]) == 0
        assert json.loads((out / "metrics.json").read_text())["images"] == expected
    only_test = tmp_path / "only"
    classes(only_test / "test", per_class=2)
    out = tmp_path / "only-eval"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--data", str(only_test), "--out", str(out),
                 "--device", "cpu"]) == 0  # no train/: the test split is what there is to score
    assert json.loads((out / "metrics.json").read_text())["images"] == 4
