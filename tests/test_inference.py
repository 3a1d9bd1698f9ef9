"""predict and evaluate from a checkpoint alone."""

import csv
import json
import subprocess
import sys

import pytest
from PIL import Image

from fasttrain.cli import main

from conftest import write_cifar


@pytest.fixture(scope="module")
def cnn_run(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "cnn"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--recipe", "seed", "--device", "cpu",
                 "--epochs", "1", "--batch-size", "8", "--workers", "0", "--loader", "torch"]) == 0
    return out


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_evaluate_matches_the_runs_own_validation(cnn_run, cifar_root, tmp_path, loader, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(cnn_run / "best.pt"), "--data", str(cifar_root), "--out", str(out),
                 "--device", "cpu", "--loader", loader, "--batch-size", "7"]) == 0
    result = json.loads((out / "metrics.json").read_text())
    logged = json.loads((cnn_run / "metrics.jsonl").read_text().splitlines()[0])
    assert result["images"] == 20 and result["top1"] == pytest.approx(logged["val_acc"])
    assert result["top5"] == pytest.approx(logged["val_top5"])
    with open(out / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["apple", "bee", "cloud"]
    assert sum(int(r["images"]) for r in rows) == 20
    with Image.open(out / "confusion.png") as image:
        assert image.format == "PNG"
    printed = capsys.readouterr().out
    assert "accuracy per class" in printed and "top-1" in printed


def test_predict_a_folder_for_kaggle_with_top_k(cnn_run, jpeg_root, tmp_path):
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(cnn_run / "best.pt"), "--data", str(jpeg_root), "--out", str(out),
                 "--device", "cpu", "--top-k", "2"]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 33  # every image under the folder, recursively
    assert rows[0]["id"] == "train/apple/apple_000.jpg"
    assert {r["label"] for r in rows} <= {"apple", "bee", "cloud"}
    first = rows[0]
    assert first["label"] == first["label_1"] and float(first["prob_1"]) >= float(first["prob_2"])


def test_predict_a_cifar_pickle_by_index(cnn_run, cifar_root, tmp_path):
    out = tmp_path / "preds.csv"
    assert main(["predict", "--checkpoint", str(cnn_run / "best.pt"), "--data",
                 str(cifar_root / "cifar-100-python" / "test"), "--out", str(out), "--device", "cpu"]) == 0
    with open(out) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label"] and [r[0] for r in rows[1:]] == [str(i) for i in range(20)]


def _error(*args):
    proc = subprocess.run([sys.executable, "-m", "fasttrain", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_mismatched_checkpoints_and_data_are_one_line_errors(cnn_run, tmp_path):
    other = tmp_path / "other"
    write_cifar(other, classes=["a", "b", "c", "d"])
    assert "differ from the checkpoint" in _error("evaluate", "--checkpoint", cnn_run / "best.pt", "--data", other,
                                                  "--out", tmp_path / "eval", "--device", "cpu")
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    assert "not a readable fasttrain checkpoint" in _error("predict", "--checkpoint", tmp_path / "x.pt", "--data",
                                                           other, "--out", tmp_path / "p.csv", "--device", "cpu")
    import torch
    torch.save({"weights": torch.zeros(2)}, tmp_path / "y.pt")
    assert "not a fasttrain checkpoint" in _error("evaluate", "--checkpoint", tmp_path / "y.pt", "--data", other,
                                                  "--out", tmp_path / "eval")
    ck = torch.load(cnn_run / "best.pt", weights_only=True)
    ck["classes"] = ck["classes"] + ["extra"]  # a checkpoint whose class count does not match its weights
    torch.save(ck, tmp_path / "z.pt")
    assert "do not fit" in _error("predict", "--checkpoint", tmp_path / "z.pt", "--data", other, "--out",
                                  tmp_path / "p.csv", "--device", "cpu")
