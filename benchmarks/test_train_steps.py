"""Training steps with inputs already on the device: the seed's setting against each speed setting.

Groups `train-cnn`, `train-resnet-frozen`, `train-resnet-finetune`; variants add one setting each:
`seed` (fp32, eager, NCHW, the report's batch 32), `channels-last`, `amp` (bf16 autocast, or
fp16 with a GradScaler), `compiled` (torch.compile) and `fast` (all of them at the fast recipe's
batch). FLOPs per image are counted once with torch's FlopCounterMode, so each row also reads as
a share of the machine's measured matmul peak for its precision.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import CUDA, DEVICE, SIZES, run
from fasttrain.device import choose_precision, maybe_compile, prepare_model
from fasttrain.models import build_model, trainable_parameters
from fasttrain.recipes import get_recipe
from fasttrain.train import make_optimizer

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
    model = prepare_model(build_model(model_name, num_classes, recipe, weights="none"), DEVICE, channels_last)
    model.train()
    optimizer = make_optimizer(trainable_parameters(model), recipe)
    precision = choose_precision(DEVICE, amp)
    scaler = precision.grad_scaler()
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    compiled = maybe_compile(model, compile_)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, recipe.image_size, recipe.image_size, device=DEVICE)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (batch,), device=DEVICE)

    def steps():
        for _ in range(SIZES.train_steps):
            with precision.autocast():
                loss = loss_fn(compiled(images), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    name = precision.name
    if name == "fp32" and DEVICE.type == "cuda" and torch.backends.cudnn.allow_tf32:
        name = "tf32"  # PyTorch's default runs fp32 convolutions on TF32 tensor cores: the seed's setting too
    return steps, batch, name


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("pipeline", list(MODELS))
def test_train_step(benchmark, pipeline, variant, peaks):
    if VARIANTS[variant][2] and not CUDA:
        pytest.skip("needs a CUDA GPU: torch.compile's CPU backend takes minutes to build on 2 cores")
    model_name, finetune = MODELS[pipeline]
    steps, batch, precision = make_step(model_name, finetune, variant)
    images = SIZES.train_steps * batch
    run(benchmark, steps, pipeline=pipeline, variant=variant, batch_size=batch, images=images,
        flops=images * flops_per_image(model_name, finetune), peak=peaks, precision=precision,
        flops_per_image=flops_per_image(model_name, finetune))
