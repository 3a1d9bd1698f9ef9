"""A run gives its memory back: when cli.main() returns or raises, however the run ended, and (for
the checkpoint it resumed from) as soon as the model and optimizer hold its state.

The suite runs dozens of trainings in one process. Before these tests, each run's model,
optimizer, gradients and checkpoint buffers (1.3 GB for the seed CNN) stayed alive in reference
cycles until a full garbage collection, which a process with torch loaded runs rarely: the suite
grew past the CI machine's 24 GiB and was killed. The garbage collector is off while they run,
so what they see is freed by reference counting alone.
"""

from __future__ import annotations

import errno
import gc
import sys
import threading
import warnings
import weakref

import pytest
import torch

import fasttrain.outputs as outputs
import fasttrain.session as session
import fasttrain.setup as setup
from fasttrain.cli import main

from conftest import fail_in_evaluation

SEED_RESNET = ["resnet", "--weights", "none", "--recipe", "seed", "--device", "cpu", "--batch-size", "8",
               "--workers", "0"]
BIG = 1_000_000  # elements: ResNet-18's largest tensors (layer4's 3x3 convolutions) have 2.4 M


@pytest.fixture
def no_gc():
    """Nothing freed by the cyclic collector while the test runs; what earlier tests left is gone."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


def _big_tensors(before: set[int]) -> list[torch.Tensor]:
    found = []
    with warnings.catch_warnings():  # isinstance() on torch's deprecated lazy attributes warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.numel() > BIG and id(obj) not in before:
                    found.append(obj)
            except Exception:  # noqa: BLE001 - objects half torn down, lazy modules: not tensors
                continue
    return found


def _end(how: str, monkeypatch) -> None:
    """Make the run (two epochs) end `how`: at the end, by a failure in epoch 2's evaluation, by a
    second Ctrl-C after epoch 1, or by a full disk at the first checkpoint."""
    if how == "fails":
        fail_in_evaluation(monkeypatch, epoch=2)
    elif how == "second ctrl-c":
        real_end = session.TrainingSession._epoch_end

        def ctrl_c_after_epoch_1(self, record):
            real_end(self, record)
            raise KeyboardInterrupt

        monkeypatch.setattr(session.TrainingSession, "_epoch_end", ctrl_c_after_epoch_1)
    elif how == "disk full":
        def full(state, f):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(outputs.torch, "save", full)


@pytest.mark.parametrize("how, code", [("finishes", 0), ("fails", RuntimeError), ("second ctrl-c", 130),
                                       ("disk full", 2)])
def test_a_run_lets_go_of_its_model_optimizer_and_buffers_however_it_ends(how, code, jpeg_root, tmp_path,
                                                                          monkeypatch, no_gc):
    models = []
    build = setup.build_model
    monkeypatch.setattr(setup, "build_model", lambda *a, **k: models.append(build(*a, **k)) or models[-1])
    _end(how, monkeypatch)
    before = {id(t) for t in _big_tensors(set())}
    argv = [*SEED_RESNET, "--finetune", "--data", str(jpeg_root), "--epochs", "2", "--out", str(tmp_path / "run")]
    if code is RuntimeError:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            main(argv)
    else:
        assert main(argv) == code
    alive = weakref.ref(models.pop())
    assert alive() is None, "the model outlived the run"
    writers = [t for t in threading.enumerate() if t.name == "fasttrain-writer"]
    for thread in writers:  # ends after the jobs queued before the run ended (skipped once abandoned)
        thread.join(timeout=10)
    assert not [t for t in writers if t.is_alive()]
    left = [tuple(t.shape) for t in _big_tensors(before)]
    assert left == []  # weights, momentum, gradients (--finetune: all of them), the writer's host copies


def test_a_resumed_run_lets_go_of_its_checkpoint_before_training(jpeg_root, tmp_path, monkeypatch, no_gc):
    out = tmp_path / "run"
    assert main([*SEED_RESNET, "--data", str(jpeg_root), "--epochs", "1", "--out", str(out)]) == 0
    loaded = []
    load = session.load_checkpoint

    def load_and_watch(path):
        checkpoint = load(path)
        loaded.extend(weakref.ref(t) for t in checkpoint["model"].values() if t.numel() > BIG)
        return checkpoint

    alive_when_training = []
    fit = session.fit

    def watch_fit(*args, **kwargs):
        alive_when_training.append(sum(ref() is not None for ref in loaded))
        return fit(*args, **kwargs)

    monkeypatch.setattr(session, "load_checkpoint", load_and_watch)
    monkeypatch.setattr(session, "fit", watch_fit)
    assert main([*SEED_RESNET, "--epochs", "2", "--resume", "--out", str(out)]) == 0
    assert loaded and alive_when_training == [0]


def test_a_writer_failure_keeps_no_job_alive_and_says_where_it_happened(tmp_path, no_gc):
    from fasttrain.outputs import RunDir, RunWriter

    writer = RunWriter(RunDir(tmp_path))
    payload = torch.zeros(4)  # what a checkpoint job's closure holds: the snapshot
    kept = weakref.ref(payload)

    def job(snapshot=payload):
        raise ValueError("a bug in a writer job")

    writer.submit(job)
    del job, payload
    with pytest.raises(ValueError, match="a bug in a writer job") as caught:
        writer.flush()
    assert kept() is None  # neither the stored error's traceback nor the thread holds the job
    if sys.version_info >= (3, 11):  # exception notes
        assert any("in fasttrain's writer thread" in note and "in job" in note for note in caught.value.__notes__)
    writer.close()
