"""Where a run's time goes: the wall clock from process start, its parts, outputs off the training
thread, recompiles counted, and failures of the background writer reported in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from fasttrain.cli import main
from fasttrain.outputs import load_checkpoint

SEED_RESNET = ["resnet", "--weights", "none", "--recipe", "seed", "--device", "cpu", "--batch-size", "8",
               "--workers", "0"]


def _summary(out):
    return json.loads((out / "summary.json").read_text())


def test_the_time_parts_add_up_to_the_process_wall_clock(cifar_root, tmp_path):
    # issue 10's CPU target: the seed CNN (71 M parameters: 570 MB of weights and momentum per
    # checkpoint), 3 epochs, a checkpoint every epoch, the training thread blocked <= 0.5 s an epoch
    out = tmp_path / "run"
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "fasttrain", "cnn", "--recipe", "seed", "--device", "cpu",
                           "--workers", "0", "--data", str(cifar_root), "--epochs", "3", "--save-every", "1",
                           "--out", str(out)], capture_output=True, text=True)
    elapsed = time.time() - started
    assert done.returncode == 0, done.stderr
    t = _summary(out)["time"]
    parts = ("startup_s", "compile_s", "train_s", "eval_s", "outputs_s", "other_s")
    assert sum(t[k] for k in parts) == pytest.approx(t["wall_s"], abs=0.01)
    # measured from the process start (the interpreter and imports included), up to the summary
    assert elapsed - 1.5 < t["wall_s"] <= elapsed
    assert t["startup_s"] > 1.0            # importing torch alone takes longer than that here
    assert -0.05 < t["other_s"] < 0.3 * t["wall_s"]  # no part counted twice, little left unaccounted
    assert load_checkpoint(out / "last.pt")["epoch"] == 3
    # blocked between epochs: each snapshot (0.05-0.15 s here); written on this thread, each 570 MB
    # checkpoint takes 0.5-2 s. The wait at the end for the last one to reach the disk is apart.
    assert 0 < t["final_write_s"] <= t["outputs_s"]
    assert t["outputs_s"] - t["final_write_s"] < 0.5 * 3
    assert "time: " in done.stdout and " wall = startup " in done.stdout


def test_save_every_writes_checkpoints_in_the_background_and_always_at_the_end(jpeg_root, tmp_path):
    out = tmp_path / "run"
    assert main([*SEED_RESNET, "--data", str(jpeg_root), "--epochs", "3", "--save-every", "2",
                 "--out", str(out)]) == 0
    assert load_checkpoint(out / "last.pt")["epoch"] == 3  # epoch 2 by the rule, epoch 3 as the end
    assert _summary(out)["save_every"] == 2 and len((out / "metrics.jsonl").read_text().splitlines()) == 3
    out0 = tmp_path / "run0"
    assert main([*SEED_RESNET, "--data", str(jpeg_root), "--epochs", "2", "--save-every", "0",
                 "--out", str(out0)]) == 0
    assert load_checkpoint(out0 / "last.pt")["epoch"] == 2


def test_a_full_disk_during_the_background_checkpoint_is_one_line(jpeg_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main([*SEED_RESNET, "--data", str(jpeg_root), "--epochs", "1", "--out", str(out)]) == 0
    before = (out / "last.pt").read_bytes()
    import fasttrain.outputs as outputs

    def full(state, f):  # what torch.save's zip writer raises when the disk fills mid-write
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(outputs.torch, "save", full)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: type("U", (), {"free": 0})())
    capsys.readouterr()
    assert main([*SEED_RESNET, "--data", str(jpeg_root), "--epochs", "2", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: cannot write checkpoint in") and "No space left on device" in err[0]
    assert "the previous checkpoint is intact" in err[0]
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_an_orphaned_temporary_checkpoint_is_removed_on_resume(jpeg_root, tmp_path):
    out = tmp_path / "run"
    assert main([*SEED_RESNET, "--data", str(jpeg_root), "--epochs", "1", "--out", str(out)]) == 0
    orphan = out / ".last.pt.abc123.tmp"  # what a process killed mid-write leaves
    orphan.write_bytes(b"half a checkpoint")
    assert main([*SEED_RESNET, "--data", str(jpeg_root), "--epochs", "2", "--resume", "--out", str(out)]) == 0
    assert not orphan.exists()


def test_compiled_training_recompiles_nothing_after_the_first_epoch(cifar_root, tmp_path, monkeypatch):
    """Dynamo's graph capture without code generation (no C++ toolchain needed): the graphs of
    epoch 1 (train step, tally, evaluation) serve epoch 2 unchanged."""
    monkeypatch.setenv("FASTTRAIN_COMPILE_BACKEND", "eager")
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--recipe", "seed", "--device", "cpu", "--compile",
                 "--epochs", "2", "--batch-size", "16", "--workers", "0", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["graphs_compiled"] >= 2  # training (model and loss, then the tally) and evaluation
    assert rows[1]["graphs_compiled"] == 0
    summary = _summary(out)
    assert summary["recompiles"] == 0 and summary["compiled"]


def test_the_first_epoch_leaves_out_what_the_loader_prefetched_while_compiling(cifar_root, monkeypatch):
    from fasttrain.data import build_loaders, open_dataset
    from fasttrain.recipes import CNN_SEED
    from fasttrain.train import ForwardLoss, TrainStep, make_optimizer, make_scheduler, train_one_epoch
    from fasttrain.device import choose_precision
    from fasttrain.models import build_model
    import torch

    cpu = torch.device("cpu")
    recipe = CNN_SEED.replace(batch_size=4, loader="torch")
    loaders = build_loaders(open_dataset("cnn", cifar_root), recipe, cpu, 1, 0)
    assert loaders.train.prefetch_batches == 4  # one worker, prefetch_factor 4
    model = build_model("cnn", 3, recipe, weights="none")
    optimizer = make_optimizer(model.parameters(), recipe)
    precision = choose_precision(cpu, False)
    step = TrainStep(ForwardLoss(model, torch.nn.CrossEntropyLoss()), optimizer,
                     make_scheduler(optimizer, recipe, len(loaders.train)), precision.grad_scaler(), precision)
    stats = train_one_epoch(step, loaders.train, model, cpu, first_step_compiles=True)
    # 48 images in 12 steps: 1 compiling step and 4 prefetched ones untimed, 7 timed
    assert stats.images == 7 * 4 and stats.compile_s > 0 and stats.warmup_s > 0
