"""A run gives its memory back: when cli.main() returns, and (for the checkpoint it resumed from)
as soon as the model and optimizer hold its state.

The suite runs dozens of trainings in one process. Before these tests, each run's model,
optimizer, gradients and checkpoint buffers (1.3 GB for the seed CNN) stayed alive in reference
cycles until a full garbage collection, which a process with torch loaded runs rarely: the suite
grew past the CI machine's 24 GiB and was killed. The garbage collector is off while they run,
so what they see is freed by reference counting alone.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import fasttrain.session as session
import fasttrain.setup as setup
from fasttrain.cli import main

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
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.numel() > BIG and id(obj) not in before:
                found.append(obj)
        except Exception:  # noqa: BLE001 - objects half torn down, lazy modules: not tensors
            continue
    return found


def test_a_finished_run_lets_go_of_its_model_optimizer_and_buffers(jpeg_root, tmp_path, monkeypatch, no_gc):
    models = []
    build = setup.build_model
    monkeypatch.setattr(setup, "build_model", lambda *a, **k: models.append(build(*a, **k)) or models[-1])
    before = {id(t) for t in _big_tensors(set())}
    assert main([*SEED_RESNET, "--data", str(jpeg_root), "--epochs", "2", "--out", str(tmp_path / "run")]) == 0
    alive = weakref.ref(models.pop())
    assert alive() is None, "the model outlived the run"
    left = [tuple(t.shape) for t in _big_tensors(before)]
    assert left == []  # weights, momentum, gradients, the writer's host copies


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
