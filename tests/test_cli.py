"""The command line end to end: one-epoch runs of both models on both layouts, outputs, resume, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fasttrain.cli import main
from fasttrain.data import build_loaders, open_dataset
from fasttrain.models import build_model
from fasttrain.outputs import load_checkpoint
from fasttrain.recipes import recipe_from_dict
from fasttrain.train import evaluate
from fasttrain.device import Precision

from conftest import write_cifar

TINY_CNN = ["--recipe", "seed", "--device", "cpu", "--epochs", "1", "--batch-size", "8", "--workers", "0"]
TINY_RESNET = ["--device", "cpu", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--weights", "none",
               "--train-limit", "8", "--val-limit", "5"]
METRIC_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_sec", "data_wait_fraction",
               "epoch_time_s", "lr"}
SUMMARY_KEYS = {"recipe", "command", "versions", "device", "loader", "world_size", "best_val_acc", "final_val_acc",
                "compile_time_s", "total_time_s", "mean_images_per_sec"}


def run_cli(*args, env=None):
    """The CLI as a user runs it: a fresh process, its exit code and output."""
    return subprocess.run([sys.executable, "-m", "fasttrain", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def assert_run_outputs(out, epochs=1):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert all(METRIC_KEYS <= r.keys() for r in rows)
    assert all(r["images_per_sec"] > 0 and 0 <= r["data_wait_fraction"] <= 1 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys() and summary["status"] == "finished"
    assert set(summary["versions"]) >= {"python", "torch", "torchvision", "dali"}
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("last.pt", "best.pt"):
        ck = load_checkpoint(out / name)
        assert {"model", "optimizer", "scaler", "epoch", "rng", "recipe", "classes"} <= ck.keys()
    return rows, summary


def test_cnn_summary_shows_the_reports_parameter_count(capsys):
    assert main(["cnn", "--summary"]) == 0
    text = capsys.readouterr().out
    assert "Total params: 71,345,252" in text and "Trainable params: 71,345,252" in text
    assert "Conv2d" in text and "[2, 128, 16, 16]" in text


def test_resnet_summary_frozen_and_finetuned(capsys):
    assert main(["resnet", "--summary", "--weights", "none"]) == 0
    frozen = capsys.readouterr().out
    assert "Total params: 11,279,112" in frozen and "Trainable params: 102,600" in frozen  # 512 * 200 + 200
    assert main(["resnet", "--summary", "--finetune", "--num-classes", "10"]) == 0  # no weights needed
    assert "Trainable params: 11,181,642" in capsys.readouterr().out


def test_cnn_one_epoch_on_cifar_pickles_then_resume(cifar_root, tmp_path):
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), *TINY_CNN]) == 0
    first_rows, summary = assert_run_outputs(out)
    assert summary["loader"] == "torch" and summary["data"]["classes"] == 3 and summary["precision"] == "fp32"
    assert summary["recipe"]["lr"] == 0.005 and summary["recipe"]["batch_size"] == 8
    # a finished run continues only with --resume, for more epochs, each epoch logged once
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--resume", "--epochs", "2",
                 "--device", "cpu", "--workers", "0"]) == 0
    rows, summary = assert_run_outputs(out, epochs=2)
    assert rows[0] == first_rows[0]
    assert load_checkpoint(out / "last.pt")["epoch"] == 2 and summary["epochs_completed"] == 2


def test_checkpoint_round_trip_reproduces_the_logged_accuracy(cifar_root, tmp_path):
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), *TINY_CNN]) == 0
    ck = load_checkpoint(out / "best.pt")
    recipe = recipe_from_dict(ck["recipe"])
    model = build_model("cnn", len(ck["classes"]), recipe)
    model.load_state_dict(ck["model"])
    data = open_dataset("cnn", cifar_root)
    loaders = build_loaders(data, recipe, torch.device("cpu"), 0, seed=0)
    stats = evaluate(model, loaders.val, Precision("cpu", None), torch.device("cpu"), recipe.batch_size)
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert stats.acc == pytest.approx(logged["val_acc"]) and stats.loss == pytest.approx(logged["val_loss"], rel=1e-4)


def test_cnn_fast_recipe_with_amp_on_jpeg_folders(jpeg_root, tmp_path):
    out = tmp_path / "run"
    assert main(["cnn", "--amp", "--data", str(jpeg_root), "--out", str(out), "--device", "cpu", "--epochs", "1",
                 "--workers", "2"]) == 0
    rows, summary = assert_run_outputs(out)
    assert summary["precision"] == "bf16" and summary["recipe"]["name"] == "fast"
    assert summary["recipe"]["batch_size"] == 16  # 24 images: the recipe's 512 shrinks to fit, lr alike
    assert summary["recipe"]["lr"] == pytest.approx(0.08 * 16 / 512)


@pytest.mark.parametrize("layout", ["jpeg", "cifar"])
def test_resnet_finetune_one_epoch_on_both_layouts(layout, jpeg_root, cifar_root, tmp_path):
    out = tmp_path / "run"
    data = jpeg_root if layout == "jpeg" else cifar_root
    assert main(["resnet", "--finetune", "--data", str(data), "--out", str(out), *TINY_RESNET]) == 0
    rows, summary = assert_run_outputs(out)
    assert summary["recipe"]["finetune"] and summary["data"]["val_images"] == 5


def test_done_when_commands_on_synthetic_data(tmp_path):
    """The issue's two acceptance commands, as a user types them."""
    for model, extra in (("cnn", ["--amp"]), ("resnet", ["--finetune", "--weights", "none"])):
        out = tmp_path / model
        result = run_cli(model, *extra, "--synthetic", "--epochs", "1", "--device", "cpu", "--train-limit", "256",
                         "--val-limit", "64", "--out", out)
        assert result.returncode == 0, result.stderr
        assert "epoch 1" in result.stdout and "done: val acc" in result.stdout  # plain lines: not a terminal
        assert_run_outputs(out)


# ---- bad input: one line on stderr, exit code 2 ------------------------------------------------


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("flags, fragment", [
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "nan"], "--lr"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--recipe", "slow"], "--recipe"),
    (["--device", "tpu"], "--device tpu"),
])
def test_nonsense_flags(flags, fragment):
    assert_one_line_error(run_cli("cnn", "--synthetic", *flags), fragment)


def test_missing_data_offline(tmp_path):
    # the default data folder is downloaded into (an explicit --data only with --download)
    result = run_cli("cnn", "--device", "cpu", "--out", tmp_path / "runs" / "a",
                     env={"FASTTRAIN_CIFAR100_URL": "http://127.0.0.1:9/cifar-100-python.tar.gz",
                          "FASTTRAIN_DATA": str(tmp_path / "nothing")})
    assert_one_line_error(result, "cifar-100-python/", str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists() and not (tmp_path / "runs").exists()  # no empty folders left


def test_unknown_layout_and_non_cifar_pickles(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "readme.txt").write_text("no images here")
    assert_one_line_error(run_cli("cnn", "--data", tmp_path / "odd", "--device", "cpu"), "unknown layout")
    bad = tmp_path / "bad" / "cifar-100-python"
    bad.mkdir(parents=True)
    (bad / "train").write_text("hello")
    (bad / "test").write_text("hello")
    assert_one_line_error(run_cli("cnn", "--data", bad, "--device", "cpu"), "not a CIFAR-100 python pickle")


def test_unwritable_out(tmp_path, cifar_root):
    (tmp_path / "file").write_text("a file, not a folder")
    result = run_cli("cnn", "--data", cifar_root, "--out", tmp_path / "file" / "run", *TINY_CNN)
    assert_one_line_error(result, "--out")


def test_a_run_is_never_overwritten_and_resume_needs_matching_classes(tmp_path, cifar_root):
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), *TINY_CNN]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert_one_line_error(run_cli("cnn", "--data", cifar_root, "--out", out, *TINY_CNN), "--resume")
    other = tmp_path / "other"
    write_cifar(other, classes=["x", "y", "z"])
    result = run_cli("cnn", "--data", other, "--out", out, "--resume", "--epochs", "2", "--device", "cpu")
    assert_one_line_error(result, "--data", "(was ", "--allow-changes")  # another data set: refused as a change
    result = run_cli("cnn", "--data", other, "--out", out, "--resume", "--epochs", "2", "--device", "cpu",
                     "--allow-changes")
    assert_one_line_error(result, "classes")  # allowed, but its classes differ from the checkpoint's
    assert (out / "metrics.jsonl").read_text() == before
    assert_one_line_error(run_cli("cnn", "--out", tmp_path / "new", "--resume", "--synthetic"), "no checkpoint")
