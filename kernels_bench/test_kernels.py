"""Micro-benchmarks of what dominates a training step, each read against the machine's limits.

- `kernel-cnn-conv1..4`: the seed CNN's conv-BN-ReLU blocks, forward and backward;
- `kernel-cnn-linear`: its 32768 -> 2048 linear layer (94% of the model's weights), forward and backward;
- `kernel-resnet-layer1..4`: ResNet-18's stages at 224 px, forward and backward;
- `kernel-augment`: crop + flip + normalise of a uint8 HWC batch, DALI's crop_mirror_normalize
  against the same torch ops.

Variants are `<layout>-<precision>-<mode>`: NCHW or NHWC; fp32, tf32, bf16 or fp16 (tf32 and fp16
on CUDA only); eager, or compiled (CUDA only, for the fast recipe's NHWC bf16). fp32 rows run with
TF32 off for matmuls and cuDNN, tf32 rows with it on for both. Compute rows report TFLOP/s and
their share of the measured peak of the same precision (benchmarks.common.measure_peaks: the faster
of a large matmul and a large 3x3 convolution, under the same TF32 settings), with the datasheet
peak beside it; the augmentation rows report GB/s (bytes read plus written) and their share of the
measured device copy bandwidth. Each call's output shape and gradient are checked, so a plain
`pytest` run fails on a kernel that computes the wrong thing.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models import resnet18

from benchmarks.common import CUDA, DEVICE, SIZES, needs_dali, run, tf32
from fasttrain.device import maybe_compile

PRECISIONS = ["fp32", "tf32", "bf16", "fp16"] if CUDA else ["fp32", "bf16"]
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONV_BLOCKS = {1: (3, 64, 32), 2: (64, 128, 32), 3: (128, 256, 16), 4: (256, 512, 16)}  # c_in, c_out, side
RESNET_INPUTS = {1: (64, 56), 2: (64, 56), 3: (128, 28), 4: (256, 14)}                   # channels, side
RESNET_OUTPUTS = {1: (64, 56, 56), 2: (128, 28, 28), 3: (256, 14, 14), 4: (512, 7, 7)}  # one sample's output


def variants():
    out = [(layout, precision, "eager") for layout in ("nchw", "nhwc") for precision in PRECISIONS]
    return out + ([("nhwc", "bf16", "compiled")] if CUDA else [])


@functools.lru_cache(maxsize=None)
def train_flops(make_module, shape: tuple) -> float:
    """Forward plus backward FLOPs of one sample, counted on the CPU in fp32."""
    module = make_module()
    x = torch.randn(1, *shape, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        module(x).float().sum().backward()
    return counter.get_total_flops()


def _bench_module(benchmark, peaks, group, make_module, shape, layout, precision, mode, out_shape):
    """Time forward plus backward of a batch; out_shape: one sample's output, checked every call."""
    batch = SIZES.kernel_batch
    memory_format = torch.channels_last if layout == "nhwc" and len(shape) == 3 else torch.contiguous_format
    dtype = DTYPES[precision]
    module = make_module().to(DEVICE, dtype=dtype, memory_format=memory_format).train()
    x = torch.randn(batch, *shape, device=DEVICE, dtype=dtype).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    fn = maybe_compile(module, mode == "compiled")
    flops = batch * train_flops(make_module, shape)
    assert flops > 0
    outputs = []

    def step():  # fp32 means fp32: TF32 off for matmuls and cuDNN (whose default is on) unless the variant asks
        with tf32(precision == "tf32"):
            out = fn(x)
            out.sum().backward()
        outputs.append(out.shape)

    run(benchmark, step, pipeline=group, variant=f"{layout}-{precision}-{mode}", batch_size=batch,
        images=batch, flops=flops, peak=peaks, precision=precision)
    assert set(outputs) == {(batch, *out_shape)}, outputs
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def _conv_block(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@pytest.mark.parametrize("layout, precision, mode", variants())
@pytest.mark.parametrize("block", list(CONV_BLOCKS))
def test_cnn_conv_block(benchmark, peaks, block, layout, precision, mode):
    c_in, c_out, side = CONV_BLOCKS[block]
    _bench_module(benchmark, peaks, f"kernel-cnn-conv{block}", functools.partial(_conv_block, c_in, c_out),
                  (c_in, side, side), layout, precision, mode, (c_out, side, side))


@pytest.mark.parametrize("precision, mode", [(p, m) for _, p, m in variants() if _ == "nchw" or m == "compiled"])
def test_cnn_linear(benchmark, peaks, precision, mode):
    _bench_module(benchmark, peaks, "kernel-cnn-linear", functools.partial(nn.Linear, 32768, 2048), (32768,),
                  "nchw" if mode == "eager" else "nhwc", precision, mode, (2048,))


def _resnet_stage(stage):
    return getattr(resnet18(weights=None), f"layer{stage}")


@pytest.mark.parametrize("layout, precision, mode", [("nchw", "fp32", "eager"), ("nhwc", "bf16", "eager")] +
                         ([("nhwc", "bf16", "compiled")] if CUDA else []))
@pytest.mark.parametrize("stage", list(RESNET_INPUTS))
def test_resnet_stage(benchmark, peaks, stage, layout, precision, mode):
    channels, side = RESNET_INPUTS[stage]
    _bench_module(benchmark, peaks, f"kernel-resnet-layer{stage}", functools.partial(_resnet_stage, stage),
                  (channels, side, side), layout, precision, mode, RESNET_OUTPUTS[stage])


# ---- augmentation ---------------------------------------------------------------------------

AUG_SIDE, AUG_CROP = 256, 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _augment_bytes(batch: int) -> int:
    return batch * AUG_CROP * AUG_CROP * 3 * (1 + 4)  # uint8 crop read, float32 written


@pytest.fixture(scope="module")
def uint8_batch():
    batch = SIZES.kernel_batch
    return torch.randint(0, 256, (batch, AUG_SIDE, AUG_SIDE, 3), dtype=torch.uint8, device=DEVICE)


def test_augment_torch(benchmark, peaks, uint8_batch):
    batch = uint8_batch.shape[0]
    mean = torch.tensor(MEAN, device=DEVICE) * 255
    scale = 1 / (torch.tensor(STD, device=DEVICE) * 255)
    offset = (AUG_SIDE - AUG_CROP) // 2
    flip = torch.arange(batch, device=DEVICE) % 2 == 0  # every other image, as a fair coin would

    def augment():
        x = uint8_batch[:, offset:offset + AUG_CROP, offset:offset + AUG_CROP]
        x = torch.where(flip[:, None, None, None], x.flip(2), x)
        return ((x.float() - mean) * scale).permute(0, 3, 1, 2)  # channels_last NCHW view

    run(benchmark, augment, pipeline="kernel-augment", variant="torch", batch_size=batch, images=batch,
        bytes_moved=_augment_bytes(batch), peak=peaks)
    out = augment()
    assert out.shape == (batch, 3, AUG_CROP, AUG_CROP) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    # image by image, as written by hand: the centre crop, flipped left-right or not, normalised, CHW
    for i, flipped in enumerate(flip.tolist()):
        crop = uint8_batch[i, offset:offset + AUG_CROP, offset:offset + AUG_CROP].float()
        crop = crop.flip(1) if flipped else crop
        torch.testing.assert_close(out[i], ((crop - mean) * scale).permute(2, 0, 1))


@needs_dali()
def test_augment_dali(benchmark, peaks, uint8_batch):
    from nvidia.dali import fn, pipeline_def, types

    batch = uint8_batch.shape[0]
    host = uint8_batch.cpu().numpy()
    gpu = CUDA

    @pipeline_def
    def pipeline():
        images = fn.external_source(source=lambda: uint8_batch if gpu else host, device="gpu" if gpu else "cpu",
                                    layout="HWC", batch=True)
        return fn.crop_mirror_normalize(images, crop=(AUG_CROP, AUG_CROP), mirror=fn.random.coin_flip(),
                                        mean=[255 * m for m in MEAN], std=[255 * s for s in STD],
                                        dtype=types.FLOAT, output_layout="HWC")

    pipe = pipeline(batch_size=batch, num_threads=2, device_id=DEVICE.index or 0 if gpu else None, seed=0,
                    prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    pipe.build()

    def augment():
        (out,) = pipe.run()
        return out.as_tensor() if not gpu else out

    run(benchmark, augment, pipeline="kernel-augment", variant="dali-gpu" if gpu else "dali-cpu", batch_size=batch,
        images=batch, bytes_moved=_augment_bytes(batch), peak=peaks)
    assert np.asarray(pipe.run()[0].as_cpu().as_tensor() if gpu else pipe.run()[0].as_tensor()).shape == \
        (batch, AUG_CROP, AUG_CROP, 3)
