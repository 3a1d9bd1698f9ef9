"""Never losing work: exact resume, interruption, atomic checkpoints, damaged data, a diverging loss."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fasttrain.cli import main
from fasttrain.outputs import load_checkpoint
from fasttrain.train import ForwardLoss, NonFiniteLoss, TrainStep, train_one_epoch
from fasttrain.device import Precision

from conftest import class_image

SEED_CNN = ["--recipe", "seed", "--device", "cpu", "--batch-size", "8", "--workers", "0", "--loader", "torch"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly(cifar_root, tmp_path):
    """Two epochs in one go, and one epoch then a resume: the second epoch is the same."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(whole), "--epochs", "2", *SEED_CNN]) == 0
    assert main(["cnn", "--data", str(cifar_root), "--out", str(split), "--epochs", "1", *SEED_CNN]) == 0
    assert main(["cnn", "--data", str(cifar_root), "--out", str(split), "--epochs", "2", "--resume", *SEED_CNN]) == 0
    a, b = metrics(whole), metrics(split)
    assert [r["epoch"] for r in b] == [1, 2]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-5, abs=1e-7), key


def test_same_seed_same_first_epoch_loss(cifar_root, tmp_path):
    losses = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", "--seed", "7",
                     "--recipe", "seed", "--device", "cpu", "--batch-size", "8", "--workers", "2"]) == 0
        losses.append(metrics(out)[0]["train_loss"])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["seed"] == 7 and summary["determinism"]["repeatable"]
    assert losses[0] == losses[1]


def _start(out, *extra):
    """A CNN run slow enough to interrupt: 30 steps of 4 synthetic images an epoch."""
    return subprocess.Popen(
        [sys.executable, "-m", "fasttrain", "cnn", "--synthetic", "--device", "cpu", "--train-limit", "120",
         "--val-limit", "8", "--batch-size", "4", "--epochs", "1", "--recipe", "seed", "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for_training(proc):
    for line in proc.stdout:  # plain progress lines: the first comes after 20 steps
        if line.startswith("epoch 1/1 step"):
            return
    raise AssertionError("the run ended before training started: " + proc.stderr.read())


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_saves_and_resumes(signum, code, tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_training(proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and "Resume with:" in stderr
    ck = load_checkpoint(out / "last.pt")
    assert ck["epoch"] == 0 and 20 <= ck["step"] <= 30
    assert not (out / "metrics.jsonl").exists()  # no epoch finished: nothing logged yet
    resume = stderr.split("Resume with: ")[1].strip()
    assert "--resume" in resume and str(out) in resume
    done = subprocess.run(resume.replace("python ", f"{sys.executable} ", 1), shell=True, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1] and rows[0]["resumed_at_step"] == ck["step"]
    assert rows[0]["train_images"] == (30 - ck["step"]) * 4  # only the steps the interrupted run had not done


# Runs fasttrain with torch.save slowed for the second write of last.pt: half of the file goes to
# disk, a line says so, then it waits 10 minutes before writing the rest. The test sends its second
# Ctrl-C inside that wait, so it always lands in the middle of a checkpoint write.
_HALF_WRITE = r"""
import contextlib, io, os, sys, time
import torch

real_save, writes = torch.save, []

def _target(f):
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    try:
        return os.readlink(f"/proc/self/fd/{f.fileno()}")
    except (AttributeError, OSError, io.UnsupportedOperation):
        return ""

def save(obj, f, *args, **kwargs):
    target = _target(f)
    if "last.pt" not in os.path.basename(target):
        return real_save(obj, f, *args, **kwargs)
    writes.append(target)
    if len(writes) != 2:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    size = len(buffer.getvalue())

    class Half:
        # the real torch.save writes through this; past half the file it waits, inside torch's
        # C++ zip writer (which calls write()): where a real slow disk holds the writer thread
        def __init__(self, out):
            self.out, self.done = out, 0

        def write(self, data):
            written = self.out.write(data)
            self.done += len(data)
            if self.done >= size // 2 and self.done - len(data) < size // 2:
                self.out.flush()
                os.fsync(self.out.fileno())
                print(f"TEST: half of {size} bytes written to {target}", flush=True)
                for _ in range(60000):  # 10 minutes, waking often, as a thread busy writing would
                    time.sleep(0.01)
            return written

        def flush(self):
            self.out.flush()

    with contextlib.nullcontext(f) if not isinstance(f, (str, os.PathLike)) else open(f, "wb") as out:
        real_save(obj, Half(out), *args, **kwargs)

torch.save = save
from fasttrain.program import run  # the program's own entry, exit path included
sys.exit(run())
"""


def _reader(stream):
    """A child's pipe, read line by line on a thread, so that waiting for a line can time out."""
    import queue
    import threading

    lines = queue.Queue()

    def read():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _rest(lines, seconds=30):
    """What a reader still has to give, up to the end of its pipe (or `seconds`)."""
    import queue

    text, deadline = [], time.monotonic() + seconds
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            return "".join(text)
        if line is None:
            return "".join(text)
        text.append(line)


def _wait_for_line(lines, start, seconds, errors):
    """The first line that starts with `start`; fails if the child ends or time runs out first."""
    import queue

    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            raise AssertionError(f"the run ended before printing {start!r}: " + _rest(errors)[-3000:])
        if line.startswith(start):
            return line
    raise AssertionError(f"no line {start!r} within {seconds}s")


def test_a_second_ctrl_c_stops_at_once_without_a_half_written_checkpoint(tmp_path):
    """Epoch 1 saves last.pt; a Ctrl-C in epoch 2 starts saving again; a second one, sent while that
    save is half on disk (and would take 10 more minutes), stops the run at once: exit 130 within
    a minute, no temporary file left, last.pt still epoch 1's whole checkpoint."""
    from pathlib import Path

    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HALF_WRITE, "cnn", "--synthetic", "--device", "cpu", "--train-limit", "120",
         "--val-limit", "8", "--batch-size", "4", "--epochs", "2", "--recipe", "seed", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines, errors = _reader(proc.stdout), _reader(proc.stderr)
        _wait_for_line(lines, "epoch 2/2 step", 300, errors)  # epoch 1's last.pt was the first write
        proc.send_signal(signal.SIGINT)
        half = _wait_for_line(lines, "TEST: half of", 120, errors).split()  # the second write is half on disk now
        size, writing = int(half[3]), Path(half[-1])
        assert 0 < writing.stat().st_size < size, (writing, size)

        sent, stopped_after = time.monotonic(), None
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)  # not the 10 minutes the write would take
            stopped_after = time.monotonic() - sent
        except subprocess.TimeoutExpired:
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = _rest(errors)
    assert stopped_after is not None, "a second Ctrl-C in the middle of a checkpoint write did not stop the run " \
                                      "within 60 s: " + stderr[-3000:]
    assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
    assert "stopped at once" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert "Resume with" not in stderr  # the interrupted save did not happen: nothing claims it did
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # the half-written file is gone
    ck = load_checkpoint(out / "last.pt")  # loads whole: a half-written file would not
    assert (ck["epoch"], ck["step"]) == (1, 0)  # epoch 1's checkpoint, not the interrupted one of epoch 2


def test_a_full_disk_when_resuming_keeps_the_previous_files(cifar_root, tmp_path, monkeypatch, capsys):
    """Every fsync fails: the first write of a resumed run, the metrics rewrite, stops it in one line.
    (tests/test_run_time.py fails the background checkpoint write itself.)"""
    out = tmp_path / "run"
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "1", *SEED_CNN]) == 0
    before = (out / "last.pt").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("fasttrain.outputs.os.fsync", full)
    capsys.readouterr()
    assert main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "2", "--resume", *SEED_CNN]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "is intact" in err[0]
    assert err[0].startswith("error: cannot write metrics.jsonl")
    assert (out / "last.pt").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_damaged_files_are_skipped_and_named_or_refused_with_strict(tmp_path, capsys):
    data = tmp_path / "data"
    for split, n in (("train", 4), ("val", 2)):
        for label, name in enumerate(("a", "b")):
            (data / split / name).mkdir(parents=True)
            for i in range(n):
                class_image(label, i).save(data / split / name / f"{i}.jpg")
    text = data / "train" / "a" / "notes.jpg"
    text.write_text("this is a text file with a .jpg name")
    truncated = data / "train" / "b" / "1.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-300])  # header intact, scan data cut short
    args = ["resnet", "--data", str(data), "--weights", "none", "--device", "cpu", "--epochs", "1",
            "--batch-size", "2", "--workers", "0"]
    for loader in ("torch", "dali"):
        out = tmp_path / f"run-{loader}"
        assert main([*args, "--loader", loader, "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        # the header says notes.jpg is no image before training; the truncated JPEG fails mid-epoch
        assert f"left out {text}: not an image" in printed and f"skipped {truncated}: cannot be decoded" in printed
        listed = (out / "skipped.txt").read_text()
        assert str(text) in listed and str(truncated) in listed
        summary = json.loads((out / "summary.json").read_text())
        assert summary["skipped_files"] == 1
        files = summary["files"]
        assert files["left_out"] == {"not an image": 1, "damaged": 1} and files["train"] == 7 and files["val"] == 4
        assert files["found"] == 13  # 8 + 4 images and notes.jpg: every file is counted once
    assert main([*args, "--strict", "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--strict" in err[0] and "notes.jpg" in err[0] and "2 files cannot be used" in err[0]


def test_a_persistent_nonfinite_loss_stops_the_run(cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["cnn", "--data", str(cifar_root), "--out", str(out), "--epochs", "2", "--lr", "1e30", *SEED_CNN])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "NaN or infinite at epoch 1, step" in err[0] and "--lr" in err[0]
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "diverged" and s["error"] == err[0][len("error: "):]
    assert s["time"]["train_s"] > 0  # the steps of the epoch it diverged in


def _loader(losses):
    """Batches whose loss (through an identity 'model') is the given value per step."""
    return [(torch.tensor([[v, 0.0]]), torch.tensor([0])) for v in losses]


class _Identity(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x + 0 * self.w  # the loss is the input; the weight's gradient stays finite


def _epoch(losses, patience):
    model = _Identity()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step_fn = TrainStep(ForwardLoss(model, lambda logits, y: logits[:, 0].mean()), opt, sched, scaler,
                        Precision("cpu", None))
    return train_one_epoch(step_fn, _loader(losses), model, torch.device("cpu"), epoch=3,
                           nonfinite_patience=patience)


def test_nonfinite_guard_names_the_first_bad_step_and_tolerates_skipped_steps():
    nan = float("nan")
    with pytest.raises(NonFiniteLoss) as err:
        _epoch([1.0, 1.0, nan, nan, 1.0], patience=1)  # a streak of one is enough in fp32/bf16
    assert (err.value.epoch, err.value.step) == (3, 3)
    stats = _epoch([1.0, nan, nan, 1.0, 1.0], patience=3)  # fp16: GradScaler skips a short streak
    assert stats.loss == pytest.approx(3 / 5)  # non-finite steps count as no loss, not as NaN
