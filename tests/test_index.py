"""The data index's own machinery: the process pool, remembered verdicts, folder links, the CUB
release's counts, --strict's reach, and DALI's recovery paths that the index feeds."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttrain.cli import main
from fasttrain.data import build_loaders, open_dataset
from fasttrain.data import index as index_module
from fasttrain.data.index import build_index, verify
from fasttrain.recipes import CNN_SEED, RESNET_SEED

from conftest import class_image

CPU = torch.device("cpu")


def _classes(root: Path, per_class: int = 4, size=(48, 36)) -> Path:
    for label, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            class_image(label, i, size).save(root / name / f"{i}.jpg", quality=90)
    return root


def test_the_process_pool_reads_what_a_single_process_reads(tmp_path, monkeypatch):
    root = _classes(tmp_path / "data", per_class=6)
    (root / "a" / "notes.jpg").write_text("not a picture")
    serial = build_index(root)
    for path in (root / "a").iterdir():  # new mtimes: every header is read again, now by the pool
        os.utime(path, ns=(1, 1))
    monkeypatch.setattr(index_module, "POOL_THRESHOLD", 1)
    pools, real = [], index_module._in_pool
    monkeypatch.setattr(index_module, "_in_pool", lambda *args: pools.append(args[2]) or real(*args))
    pooled = build_index(root, workers=2)
    assert pools == [2] and pooled.probed == 7  # the 6 + 1 files of a/, read by two worker processes
    assert pooled.images == serial.images and pooled.left_out == serial.left_out


def test_strict_verdicts_are_remembered(tmp_path, monkeypatch):
    from fasttrain.data import decode

    root = _classes(tmp_path / "data")
    broken = root / "b" / "1.jpg"
    class_image(1, 1, (120, 90)).save(broken, quality=90)
    broken.write_bytes(broken.read_bytes()[:-400])
    files = sorted(root.rglob("*.jpg"))
    calls = []
    real = decode.problem
    monkeypatch.setattr(decode, "problem", lambda path: calls.append(path) or real(path))
    first = verify(files, root)
    assert [p for p, _ in first] == [broken] and "truncated" in first[0][1]
    assert len(calls) == len(files)
    assert verify(files, root) == first and len(calls) == len(files)  # nothing decoded the second time
    class_image(1, 1).save(broken, quality=90)  # repaired: a new size, so it is decoded again
    assert verify(files, root) == [] and len(calls) == len(files) + 1


def test_two_links_to_one_folder_read_it_once_in_the_same_order_everywhere(tmp_path):
    root = _classes(tmp_path / "data")
    (root / "puppies").symlink_to(root / "a", target_is_directory=True)
    (root / "zz-link").symlink_to(root / "a", target_is_directory=True)
    data = open_dataset("resnet", root)
    # name order decides which name is read, whatever order the file system lists: a/ comes first
    assert data.classes == ["a", "b"]
    assert sum(1 for f in data.train.files + data.val.files if f.parent.name == "a") == 4
    assert not any(f.parent.name in ("puppies", "zz-link") for f in data.train.files + data.val.files)
    assert sum("the same folder as" in note for note in data.notes) == 2


def test_cub_counts_add_up(tmp_path):
    root = tmp_path / "CUB_200_2011"
    names = ["001.A", "002.B"]
    images, labels, split = [], [], []
    for label, name in enumerate(names):
        (root / "images" / name).mkdir(parents=True)
        for i in range(3):
            rel = f"{name}/{i}.jpg"
            class_image(label, i).save(root / "images" / rel)
            image_id = 10 * label + i + 1
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {label + 1}")
            split.append(f"{image_id} {int(i < 2)}")
    images.append("99 001.A/gone.jpg")  # listed, not on disk
    labels.append("99 1")
    split.append("99 1")
    class_image(0, 7).save(root / "images" / "001.A" / "extra.jpg")  # on disk, not listed
    (root / "images" / "002.B" / "2.jpg").write_text("damaged")
    for filename, rows in (("images.txt", images), ("image_class_labels.txt", labels),
                           ("train_test_split.txt", split)):
        (root / filename).write_text("\n".join(rows) + "\n")
    data = open_dataset("resnet", tmp_path)
    counts = data.file_counts()
    assert counts["found"] == 7 == sum(len(files) for _, _, files in os.walk(root / "images"))
    assert counts["left_out"] == {"not listed": 1, "not an image": 1}
    assert counts["train"] + counts["val"] + sum(counts["left_out"].values()) == counts["found"]
    assert any("1 images listed in images.txt are not on disk (e.g. 001.A/gone.jpg)" in n for n in data.notes)


@pytest.mark.parametrize("bad", ["1 x.jpg\n", "1 a/0.jpg\n2 a/1.jpg\n"])
def test_malformed_cub_tables_are_one_line_errors(tmp_path, capsys, bad):
    root = tmp_path / "CUB_200_2011"
    _classes(root / "images")
    (root / "images.txt").write_text(bad)
    (root / "image_class_labels.txt").write_text("1 1\n")  # image 2 has no class
    (root / "train_test_split.txt").write_text("1 yes\n" if bad.startswith("1 x") else "1 1\n2 1\n")
    assert main(["resnet", "--data", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "malformed CUB_200_2011 tables" in err[0]


def test_strict_passes_a_readme_beside_the_splits_and_refuses_a_notes_jpg(tmp_path, capsys):
    root = tmp_path / "data"
    _classes(root / "train")
    _classes(root / "valid", per_class=2)
    (root / "README.roboflow.txt").write_text("exported by Roboflow")
    args = ["resnet", "--data", str(root), "--weights", "none", "--recipe", "seed", "--device", "cpu",
            "--epochs", "1", "--batch-size", "2", "--workers", "0", "--strict"]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    (root / "train" / "a" / "notes.jpg").write_text("not a picture")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.jpg: not an image" in err[0] and "README" not in err[0]


def test_dali_decodes_the_policy_way_a_file_its_decoder_refuses(tmp_path):
    """A PNG without its end chunk: Pillow reads it, DALI's decoder does not. No file is lost."""
    root = tmp_path / "data"
    for split, n in (("train", 4), ("val", 2)):
        _classes(root / split, per_class=n, size=(40, 32))
    png = root / "val" / "a" / "open-ended.png"
    class_image(0, 9, (40, 32)).save(png)
    png.write_bytes(png.read_bytes()[:-12])  # the IEND chunk is 12 bytes
    data = open_dataset("cnn", root)
    assert png in data.val.files
    recipe = CNN_SEED.replace(batch_size=2, channels_last=False, normalize="imagenet")
    skipped = []
    dali = build_loaders(data, recipe.replace(loader="dali"), CPU, 1, 0,
                         on_skip=lambda split, path, why: skipped.append(path))
    torch_ = build_loaders(data, recipe.replace(loader="torch"), CPU, 0, 0)
    ours, theirs = (torch.cat([x for x, _ in loaders.val]) for loaders in (dali, torch_))
    assert skipped == [] and ours.shape == theirs.shape == (len(data.val), 3, 32, 32)
    assert (ours - theirs).abs().max() < 0.1


def test_dali_recovery_in_a_resumed_epoch_serves_each_remaining_batch_once(tmp_path):
    root = tmp_path / "data"
    for label in range(2):
        for i in range(4):
            (root / "train" / f"c{label}").mkdir(parents=True, exist_ok=True)
            class_image(label, i, (120, 90)).save(root / "train" / f"c{label}" / f"{i}.jpg", quality=90)
        (root / "val" / f"c{label}").mkdir(parents=True)
        class_image(label, 9).save(root / "val" / f"c{label}" / "9.jpg")
    broken = root / "train" / "c1" / "2.jpg"
    broken.write_bytes(broken.read_bytes()[:-400])
    data = open_dataset("resnet", root)
    recipe = RESNET_SEED.replace(loader="dali", batch_size=2, channels_last=False)
    for seed in range(20):  # a seed whose resumed epoch (from step 1) meets the broken file
        skipped = []
        loaders = build_loaders(data, recipe, CPU, 1, seed, start_epoch=1, start_step=1,
                                on_skip=lambda split, path, why: skipped.append(path))
        batches = [len(y) for _, y in loaders.train]
        if skipped:
            break
    assert skipped == [broken]
    # 7 good files make 3 batches; the epoch resumed after 1 of them: 2 remain, each served once
    assert len(loaders.train) == 3 and batches == [2, 2]
    assert np.sum(batches) == 4
