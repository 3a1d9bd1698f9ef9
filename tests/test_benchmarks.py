"""The benchmark suites' contract: pytest-benchmark JSON with the agreed fields, and a report from it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import common, report

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {"pipeline", "variant", "device", "batch_size", "images_per_sec"}


def test_benchmark_json_fields_and_report(tmp_path):
    """Time two real loader benchmarks and one training step, then render the report and a README block."""
    results = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
         f"--benchmark-json={results}", "benchmarks/test_loaders.py::test_cifar_loader[torch]",
         "benchmarks/test_loaders.py::test_cifar_loader[dali-cpu]",
         "benchmarks/test_train_steps.py::test_train_step[train-cnn-seed]",
         "benchmarks/test_train_steps.py::test_train_step[train-cnn-channels-last]"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(results.read_text())
    rows = {(b["extra_info"]["pipeline"], b["extra_info"]["variant"]): b["extra_info"] for b in record["benchmarks"]}
    assert {("cifar", "torch"), ("cifar", "dali-cpu"), ("train-cnn", "seed"), ("train-cnn", "channels-last")} \
        <= rows.keys()
    for info in rows.values():
        assert FIELDS <= info.keys() and info["images_per_sec"] > 0 and info["timed"]
        assert info["cudnn_benchmark"] is torch.cuda.is_available()  # the trainer's backend settings
    for variant in ("torch", "dali-cpu"):  # what arrived: 2048 CIFAR-shaped arrays, 8 whole batches of 256
        assert rows[("cifar", variant)]["images_per_call"] == 2048
    seed = rows[("train-cnn", "seed")]
    assert seed["batch_size"] == 32 and seed["tflops"] > 0
    # the peak it is read against, said in words, and the datasheet's beside it (none for a CPU)
    assert seed["precision"] == "fp32" and seed["fraction_of_peak"] == pytest.approx(seed["tflops"] / seed["peak_tflops"])
    assert seed["peak"].startswith("measured on this machine: the faster of a 2048x2048 matmul and a 3x3 convolution")
    assert "float32" in seed["peak"] and seed["datasheet_peak_tflops"] is None
    assert record["machine_info"]["fasttrain"]["torch"]

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.BEGIN}\nold numbers\n{report.END}\noutro\n")
    assert report.main([str(results), "--out", str(tmp_path / "out"), "--readme", str(readme)]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**cifar**" in text and "| torch |" in text and "1.00x" in text and "vs seed" in text
    with Image.open(tmp_path / "out" / "report.png") as image:
        assert image.format == "PNG"
    updated = readme.read_text()
    assert "old numbers" not in updated and "**train-cnn**" in updated and updated.endswith(f"{report.END}\noutro\n")


def test_plain_pytest_runs_benchmarks_once_untimed():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/test_loaders.py::test_cifar_loader[torch]"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 passed" in proc.stdout and "Name (time in" not in proc.stdout  # ran, but no timing table


def test_precision_labels_say_what_runs_and_peaks_match_them(monkeypatch):
    """fp32 on CUDA under PyTorch's defaults (TF32 matmuls off, cuDNN TF32 on) is not `tf32`."""
    monkeypatch.setattr(common, "CUDA", True)
    for matmul, conv, label in ((False, True, "fp32 (convs may use TF32)"), (True, True, "tf32"),
                                (False, False, "fp32"), (True, False, "fp32 (matmuls may use TF32)")):
        with common.tf32(matmul, conv=conv):
            assert common.precision_label("fp32") == label
            assert common.precision_label("bf16") == "bf16"
    monkeypatch.setattr(common, "CUDA", False)
    with common.tf32(True):
        assert common.precision_label("fp32") == "fp32"  # a CPU has no TF32

    assert common.datasheet_tflops("NVIDIA H200", "bf16") == 989.5
    assert common.datasheet_tflops("NVIDIA H100 80GB HBM3", "tf32") == 494.7
    assert common.datasheet_tflops("NVIDIA H200", "fp32") == 67.0
    assert common.datasheet_tflops("NVIDIA H200", "fp32 (convs may use TF32)") == 494.7  # bounded by TF32
    assert common.datasheet_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert common.datasheet_tflops("NVIDIA A100-SXM4-40GB", "bf16") == 312.0
    for device in ("cpu", "NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA L4"):  # not in the table: unknown
        assert common.datasheet_tflops(device, "bf16") is None

    peaks = common.Peaks({"fp32": 1.0, "tf32": 8.0}, {"fp32": "a", "tf32": "b"}, 10.0)
    assert peaks.tflops("tf32") == 8.0 and peaks.describe("tf32") == "b"
    with pytest.raises(KeyError, match="fp32 \\(convs may use TF32\\)"):  # no silent fall back to fp32's peak
        peaks.tflops("fp32 (convs may use TF32)")
