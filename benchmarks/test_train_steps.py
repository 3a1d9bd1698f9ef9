"""Training steps with inputs already on the device: the seed's setting against each speed setting.

Groups `train-cnn`, `train-resnet-frozen`, `train-resnet-finetune`; variants add one setting each:
`seed` (fp32, eager, NCHW, the report's batch 32), `channels-last`, `amp` (bf16 autocast, or
fp16 with a GradScaler), `compiled` (torch.compile of model and loss, fused SGD on CUDA) and
`fast` (all of them at the fast recipe's batch). Each row times the trainer's own step
(fasttrain.train.TrainStep: forward, loss, backward, optimizer, schedule, the running sums and the
non-finite guard), built as the trainer builds it. FLOPs per image are counted once with torch's
FlopCounterMode, so each row also reads as a share of the machine's peak for what it runs.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import CUDA, DEVICE, SIZES, precision_label, run
from fasttrain.device import choose_precision, compiler, configure_backends, prepare_model
from fasttrain.models import build_model, trainable_parameters
from fasttrain.recipes import get_recipe
from fasttrain.train import ForwardLoss, Tally, TrainStep, make_optimizer, make_scheduler

# variant -> (channels_last, amp, compile, fast batch)
VARIANTS = {
    "seed": (False, False, False, False),
    "channels-last": (True, False, False, False),
    "amp": (True, True, False, False),
    "compiled": (True, True, True, False),
    "fast": (True, True, True, True),
}
MODELS = {"train-cnn": ("cnn", False), "train-resnet-frozen": ("resnet", False),
          "train-resnet-finetune": ("resnet", True)}


@functools.lru_cache(maxsize=None)
def flops_per_image(model_name: str, finetune: bool) -> float:
    """Forward plus backward FLOPs of one training image (fp32, batch 2, on the CPU)."""
    recipe = get_recipe(model_name, "seed", finetune)
    model = build_model(model_name, 100 if model_name == "cnn" else 200, recipe, weights="none").train()
    size = recipe.image_size
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, size, size)).sum().backward()
    return counter.get_total_flops() / 2


def make_step(model_name: str, finetune: bool, variant: str):
    channels_last, amp, compile_, fast = VARIANTS[variant]
    recipe = get_recipe(model_name, "fast" if fast else "seed", finetune)
    batch = {("cnn", False): SIZES.cnn_seed_batch, ("cnn", True): SIZES.cnn_fast_batch,
             ("resnet", False): SIZES.resnet_seed_batch, ("resnet", True): SIZES.resnet_fast_batch}[(model_name, fast)]
    num_classes = 100 if model_name == "cnn" else 200
    configure_backends(DEVICE)  # cudnn.benchmark, as the trainer sets it
    model = prepare_model(build_model(model_name, num_classes, recipe, weights="none"), DEVICE, channels_last)
    model.train()
    optimizer = make_optimizer(trainable_parameters(model), recipe, fused=DEVICE.type == "cuda")
    scheduler = make_scheduler(optimizer, recipe, SIZES.train_steps)
    precision = choose_precision(DEVICE, amp)
    compile_ = compiler(compile_)
    forward_loss = ForwardLoss(model, nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing))
    step = TrainStep(compile_(forward_loss) if compile_ else forward_loss, optimizer, scheduler,
                     precision.grad_scaler(), precision)
    tally = Tally(DEVICE, compile_)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, recipe.image_size, recipe.image_size, device=DEVICE)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (batch,), device=DEVICE)

    def steps():
        for _ in range(SIZES.train_steps):
            step(images, labels, tally)

    return steps, batch, precision_label(precision.name), tally


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pipeline", list(MODELS))
def test_train_step(benchmark, pipeline, variant, peaks):
    if VARIANTS[variant][2] and not CUDA:
        pytest.skip("needs a CUDA GPU: torch.compile's CPU backend takes minutes to build on 2 cores")
    model_name, finetune = MODELS[pipeline]
    steps, batch, precision, tally = make_step(model_name, finetune, variant)
    images = SIZES.train_steps * batch
    run(benchmark, steps, pipeline=pipeline, variant=variant, batch_size=batch, images=images,
        flops=images * flops_per_image(model_name, finetune), peak=peaks, precision=precision,
        flops_per_image=flops_per_image(model_name, finetune))
    # every timed (and warm-up) step went through the shipped step: its running sums saw each one
    assert int(tally.steps) >= SIZES.train_steps and int(tally.steps) % SIZES.train_steps == 0
    assert torch.isfinite(tally.loss_sum).item() and int(tally.worst_streak) == 0
