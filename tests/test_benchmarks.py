"""The benchmark suites' contract: pytest-benchmark JSON with the agreed fields, and a report from it."""

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from benchmarks import report

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
    assert rows[("train-cnn", "seed")]["batch_size"] == 32 and rows[("train-cnn", "seed")]["tflops"] > 0
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
