"""The learning-rate schedule: linear warm-up from `warmup_start` to the peak lr, then cosine to 0 or constant.

Step s is the s-th optimizer step of the run (0-based, counted across epochs); the lr it uses is
recipe.lr * lr_factor(s). The expected values below are written out by hand, not recomputed with
the formula under test.
"""

import math

import pytest
import torch

from fasttrain.recipes import CNN_FAST, CNN_SEED, RESNET_FAST
from fasttrain.train import lr_factor, make_optimizer, make_scheduler

STEPS = 10  # optimizer steps per epoch in these tests


def test_fast_recipe_warms_up_linearly_then_follows_a_cosine_to_zero():
    recipe = CNN_FAST  # 2 warm-up epochs from 0.1 of the lr, cosine over 18 epochs: 20 + 160 steps
    assert (recipe.warmup_epochs, recipe.epochs, recipe.warmup_start, recipe.schedule) == (2.0, 18, 0.1, "cosine")
    f = lambda step: lr_factor(step, recipe, STEPS)  # noqa: E731
    assert f(0) == pytest.approx(0.1)                           # the first step: warmup_start
    assert f(10) == pytest.approx(0.55)                         # half-way through the warm-up
    assert f(19) == pytest.approx(0.955)                        # the last warm-up step
    assert f(20) == pytest.approx(1.0)                          # warm-up done: the peak lr
    assert f(60) == pytest.approx(0.5 + math.sqrt(2) / 4)       # a quarter of the cosine
    assert f(100) == pytest.approx(0.5)                         # the middle of the cosine
    assert f(179) == pytest.approx(math.sin(math.pi / 320) ** 2)  # the last step: almost 0
    assert f(180) == 0.0                                        # after the last step
    assert f(250) == 0.0                                        # and stays there


def test_constant_schedule_after_warm_up_and_without_one():
    assert CNN_SEED.warmup_epochs == 0 and CNN_SEED.schedule == "constant"
    assert [lr_factor(s, CNN_SEED, STEPS) for s in (0, 1, 125, 249, 250)] == [1.0] * 5  # the report's constant lr
    recipe = CNN_SEED.replace(warmup_epochs=1.0, warmup_start=0.0, epochs=3)
    assert [lr_factor(s, recipe, STEPS) for s in (0, 5, 9, 10, 20, 29, 30)] == \
        pytest.approx([0.0, 0.5, 0.9, 1.0, 1.0, 1.0, 1.0])


def test_fractional_warm_up_epochs_count_whole_steps():
    recipe = RESNET_FAST.replace(warmup_epochs=0.5, epochs=2)  # 5 warm-up steps of 20, then a cosine over 15
    f = lambda step: lr_factor(step, recipe, STEPS)  # noqa: E731
    assert [f(s) for s in range(6)] == pytest.approx([0.1, 0.28, 0.46, 0.64, 0.82, 1.0])
    assert f(10) == pytest.approx(0.75) and f(19) == pytest.approx(math.sin(math.pi / 30) ** 2) and f(20) == 0.0


def _expected(step: int, warmup: int, total: int, start: float) -> float:
    """The schedule as the recipes document it, for a whole-run comparison."""
    if step < warmup:
        return start + (1 - start) * step / warmup
    return (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup)))) / 2


@pytest.mark.parametrize("recipe", [CNN_FAST, RESNET_FAST.replace(epochs=4)], ids=["cnn-fast", "resnet-fast-4ep"])
def test_the_scheduler_drives_the_optimizer_lr_over_a_whole_run(recipe):
    """What the optimizer actually uses at every step of a run, and 0 once the run is done."""
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = make_optimizer([weight], recipe)
    scheduler = make_scheduler(optimizer, recipe, STEPS)
    warmup, total = round(recipe.warmup_epochs * STEPS), recipe.epochs * STEPS
    used = []
    for _ in range(total):
        used.append(optimizer.param_groups[0]["lr"])
        weight.grad = torch.ones(2)
        optimizer.step()
        scheduler.step()
    expected = [recipe.lr * _expected(s, warmup, total, recipe.warmup_start) for s in range(total)]
    assert used == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert used[0] == pytest.approx(recipe.lr * recipe.warmup_start) and max(used) == pytest.approx(recipe.lr)
    assert used.index(max(used)) == warmup  # the peak is reached exactly when the warm-up ends
    assert all(a < b for a, b in zip(used[:warmup], used[1:warmup + 1]))   # rising through the warm-up
    assert all(a > b for a, b in zip(used[warmup:], used[warmup + 1:]))    # falling ever after
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # after the last step


def test_a_resumed_scheduler_continues_the_same_schedule():
    recipe = CNN_FAST.replace(epochs=4)
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer([weight], recipe)
    scheduler = make_scheduler(optimizer, recipe, STEPS)
    for _ in range(15):  # into the second warm-up epoch
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()
    weight2 = torch.nn.Parameter(torch.zeros(1))
    optimizer2 = make_optimizer([weight2], recipe)
    scheduler2 = make_scheduler(optimizer2, recipe, STEPS)
    optimizer2.load_state_dict(saved[0])
    scheduler2.load_state_dict(saved[1])
    for step in range(15, 40):
        assert optimizer2.param_groups[0]["lr"] == pytest.approx(recipe.lr * lr_factor(step, recipe, STEPS))
        assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
        for opt, sched in ((optimizer, scheduler), (optimizer2, scheduler2)):
            opt.step()
            sched.step()
