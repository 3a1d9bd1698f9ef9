"""What every benchmark suite shares: the device, sizes that fit it, honest timing, the machine's limits.

Sizes are full on CUDA and small on the CPU, so `pytest --benchmark-only` finishes in minutes on
a 2-core machine. Timed functions synchronise the device before they return; compilation and
warm-up run in untimed warm-up rounds and are reported separately where they matter.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass

import torch

from fasttrain.device import device_name, synchronize

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

needs_cuda = __import__("pytest").mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def needs_dali():
    from fasttrain.data.dali_loader import dali_available
    return __import__("pytest").mark.skipif(not dali_available(),
                                            reason="needs NVIDIA DALI (pip install nvidia-dali-cuda130)")


@dataclass(frozen=True)
class Sizes:
    """How much work one benchmark call does on this device."""

    cifar_images: int       # CIFAR-like uint8 arrays per loader epoch
    cifar_batch: int
    photos: int             # generated 500x375 JPEGs per loader epoch
    photo_batch: int
    train_steps: int        # optimizer steps per timed call
    cnn_seed_batch: int     # the report's batch, or less on a CPU
    resnet_seed_batch: int
    cnn_fast_batch: int
    resnet_fast_batch: int
    e2e_cnn_images: int
    e2e_resnet_images: int
    kernel_batch: int       # images per kernel call
    rounds: int             # timed rounds per benchmark
    warmup: int             # untimed rounds first (compile, autotuning, allocator)


SIZES = Sizes(cifar_images=50_000, cifar_batch=512, photos=2048, photo_batch=64, train_steps=10,
              cnn_seed_batch=32, resnet_seed_batch=32, cnn_fast_batch=512, resnet_fast_batch=256,
              e2e_cnn_images=50_000, e2e_resnet_images=2048, kernel_batch=256, rounds=5, warmup=2) if CUDA else \
    Sizes(cifar_images=2048, cifar_batch=256, photos=192, photo_batch=32, train_steps=1,
          cnn_seed_batch=32, resnet_seed_batch=4, cnn_fast_batch=64, resnet_fast_batch=8,
          e2e_cnn_images=128, e2e_resnet_images=16, kernel_batch=8, rounds=2, warmup=1)


def run(benchmark, fn, *, pipeline: str, variant: str, batch_size: int, images: int | None = None,
        flops: float | None = None, bytes_moved: float | None = None, peak: "Peaks | None" = None,
        precision: str = "fp32", rounds: int | None = None, warmup: int | None = None, **extra) -> float:
    """Time fn (device-synchronised), record the standard extra_info fields, return seconds per call.

    images: per call, for images_per_sec; flops / bytes_moved: per call, for TFLOP/s or GB/s and
    their share of the machine's measured peak.
    """
    last = {}

    def timed():
        start = time.perf_counter()
        result = fn()
        synchronize(DEVICE)
        last["seconds"] = time.perf_counter() - start
        return result

    benchmark.group = pipeline
    benchmark.pedantic(timed, rounds=rounds or SIZES.rounds, warmup_rounds=SIZES.warmup if warmup is None else warmup,
                       iterations=1)
    seconds = benchmark.stats.stats.mean if benchmark.stats is not None else last["seconds"]
    info = {"pipeline": pipeline, "variant": variant, "device": device_name(DEVICE), "batch_size": batch_size,
            "precision": precision, "timed": benchmark.stats is not None, **extra}
    if images:
        info["images_per_sec"] = images / seconds
    if flops:
        info["tflops"] = flops / seconds / 1e12
        if peak is not None:
            info["peak_tflops"] = peak.tflops(precision)
            info["fraction_of_peak"] = info["tflops"] / info["peak_tflops"]
    if bytes_moved:
        info["gb_per_sec"] = bytes_moved / seconds / 1e9
        if peak is not None:
            info["peak_gb_per_sec"] = peak.copy_gb_per_sec
            info["fraction_of_peak_bandwidth"] = info["gb_per_sec"] / peak.copy_gb_per_sec
    benchmark.extra_info.update(info)
    return seconds


@dataclass
class Peaks:
    """The machine's measured limits: dense TFLOP/s per precision (the best of a large matmul and a
    large convolution), device copy GB/s (bytes read plus written)."""

    matmul: dict
    copy_gb_per_sec: float

    def tflops(self, precision: str) -> float:
        return self.matmul.get(precision, self.matmul["fp32"])


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 on or off for both matmuls and cuDNN (whose default is on), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _time(fn, repeats: int) -> float:
    fn()
    synchronize(DEVICE)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(DEVICE)
    return (time.perf_counter() - start) / repeats


def _dense_tflops(dtype: torch.dtype) -> float:
    """The best of a large matmul and a large 3x3 convolution: on some CPUs torch's matmul path is
    slower than oneDNN's convolutions, and a ceiling that kernels beat is no ceiling."""
    n = 8192 if CUDA else 2048
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    matmul = 2 * n**3 / _time(lambda: a @ b, 10 if CUDA else 3)
    batch, c, side = (256, 256, 32) if CUDA else (16, 256, 16)
    x = torch.randn(batch, c, side, side, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(DEVICE, dtype=dtype, memory_format=torch.channels_last)
    with torch.no_grad():
        conv_flops = 2 * batch * side * side * c * c * 9 / _time(lambda: conv(x), 10 if CUDA else 3)
    return max(matmul, conv_flops) / 1e12


@functools.lru_cache(maxsize=1)
def measure_peaks() -> Peaks:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if CUDA:
        dtypes["fp16"] = torch.float16
    with tf32(False):  # fp32 means fp32, as the fp32 variants run
        matmul = {name: _dense_tflops(dtype) for name, dtype in dtypes.items()}
    if CUDA:
        with tf32(True):
            matmul["tf32"] = _dense_tflops(torch.float32)
    src = torch.empty(2**28 if CUDA else 2**25, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), 20 if CUDA else 5)
    return Peaks(matmul, 2 * src.numel() / seconds / 1e9)  # bytes read plus bytes written
