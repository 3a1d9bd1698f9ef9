"""torchrun on the CPU with gloo: two processes, one set of outputs, disjoint shards."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo over loopback is tested on Linux")


def torchrun(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def test_each_rank_sees_a_disjoint_equal_shard_covering_the_epoch(tmp_path):
    out = tmp_path / "seen.json"
    proc = torchrun("tests/helpers/dist_probe.py", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"torch", "dali", "dali-cache", "device-cache"}
    for loader, ranks in results.items():
        train = [r["train"] for r in ranks]
        assert ranks[0]["steps"] == ranks[1]["steps"] == 5, loader  # 53 samples, 2 ranks, batch 5
        assert len(train[0]) == len(train[1]) == 25, loader
        assert not set(train[0]) & set(train[1]), loader  # disjoint
        assert len(set(train[0] + train[1])) == 50, loader  # the epoch, less the 3 that make no whole batch
        val = ranks[0]["val"] + ranks[1]["val"]
        assert sorted(val) == list(range(21)), loader  # evaluation: every sample exactly once


@pytest.mark.parametrize("model, extra", [
    ("cnn", ["--train-limit", "64", "--val-limit", "16", "--batch-size", "8"]),
    ("resnet", ["--finetune", "--weights", "none", "--train-limit", "16", "--val-limit", "6", "--batch-size", "4"]),
])
def test_two_process_training_writes_one_set_of_outputs(model, extra, tmp_path):
    out = tmp_path / "run"
    proc = torchrun("-m", "fasttrain", model, "--synthetic", "--device", "cpu", "--epochs", "1", "--out", out, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: val acc") == 1  # rank 0 alone speaks
    assert "x 2 =" in proc.stdout and "global" in proc.stdout  # per-process and global batch, scaled lr
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["world_size"] == 2 and len(rows) == 1
    limit = int(extra[extra.index("--train-limit") + 1])
    assert rows[0]["train_images"] == limit  # summed over both ranks
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl",
                                                    "summary.json"]


def test_distributed_dali_cpu_run_and_resume(cifar_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cifar_root, data)
    out = tmp_path / "run"
    common = ["-m", "fasttrain", "cnn", "--data", data, "--loader", "dali", "--device", "cpu", "--recipe", "seed",
              "--batch-size", "8", "--out", out]
    first = torchrun(*common, "--epochs", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    again = torchrun(*common, "--epochs", "2", "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all(r["train_images"] == 48 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loader"] == "dali-cpu" and summary["world_size"] == 2
