"""What every benchmark suite shares: the device, sizes that fit it, honest timing, the machine's limits.

Sizes are full on CUDA and small on the CPU, so `pytest --benchmark-only` finishes in minutes on
a 2-core machine. Timed functions synchronise the device before they return; compilation and
warm-up run in untimed warm-up rounds and are reported separately where they matter. The suites
run with the trainer's backend settings (`fasttrain.device.configure_backends`: cuDNN autotuning
on CUDA), set when this module is imported.

Compute rows are read against two peaks of the row's precision label (`precision_label` says what
a plain fp32 model really runs): `peak_tflops`, measured on this machine (`measure_peaks`: the
faster of a large matmul and a large 3x3 convolution; the row's `peak` field says which settings),
and `datasheet_peak_tflops`, NVIDIA's dense figure for the GPU (`datasheet_tflops`; None where the
device is not in the table, a CPU included). `fraction_of_peak` is of the measured one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass

import torch

from fasttrain.device import configure_backends, device_name, synchronize

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
configure_backends(DEVICE)  # as the trainer does: cudnn.benchmark on CUDA, so convolutions are autotuned

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
        counted: bool = False, flops: float | None = None, bytes_moved: float | None = None,
        peak: "Peaks | None" = None, precision: str = "fp32", rounds: int | None = None, warmup: int | None = None,
        **extra) -> float:
    """Time fn (device-synchronised), record the standard extra_info fields, return seconds per call.

    images: per call, for images_per_sec. counted=True: fn returns how many images it received,
    images_per_sec is what the timed calls received, and each call must receive exactly `images`
    (when given) or the benchmark fails. flops / bytes_moved: per call, for TFLOP/s or GB/s and their
    share of the machine's measured peak for `precision` (see `Peaks`). Under plain pytest (timing
    disabled) fn runs once and the numbers are from that one call; either way they must be positive
    and finite.
    """
    calls = []  # (seconds, result) of every call, warm-up rounds first

    def timed():
        start = time.perf_counter()
        result = fn()
        synchronize(DEVICE)
        calls.append((time.perf_counter() - start, result))
        return result

    benchmark.group = pipeline
    rounds = rounds or SIZES.rounds
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=SIZES.warmup if warmup is None else warmup,
                       iterations=1)
    is_timed = benchmark.stats is not None
    measured = calls[-rounds:] if is_timed else calls[-1:]
    seconds = benchmark.stats.stats.mean if is_timed else measured[-1][0]
    assert math.isfinite(seconds) and seconds > 0, f"{pipeline}/{variant}: {seconds} s per call"
    info = {"pipeline": pipeline, "variant": variant, "device": device_name(DEVICE), "batch_size": batch_size,
            "precision": precision, "timed": is_timed, "cudnn_benchmark": torch.backends.cudnn.benchmark, **extra}
    if counted:
        received = [result for _, result in measured]
        assert all(isinstance(n, int) for n in received), f"{pipeline}/{variant}: fn returned {received}, not counts"
        if images is not None:
            assert received == [images] * len(received), \
                f"{pipeline}/{variant}: expected {images} images a call, received {received}"
        info["images_per_call"] = sum(received) / len(received)
        info["images_per_sec"] = info["images_per_call"] / seconds
    elif images:
        info["images_per_sec"] = images / seconds
    if flops:
        info["tflops"] = flops / seconds / 1e12
        if peak is not None:
            info["peak_tflops"] = peak.tflops(precision)
            info["peak"] = peak.describe(precision)
            info["fraction_of_peak"] = info["tflops"] / info["peak_tflops"]
            info["datasheet_peak_tflops"] = datasheet_tflops(device_name(DEVICE), precision)
    if bytes_moved:
        info["gb_per_sec"] = bytes_moved / seconds / 1e9
        if peak is not None:
            info["peak_gb_per_sec"] = peak.copy_gb_per_sec
            info["fraction_of_peak_bandwidth"] = info["gb_per_sec"] / peak.copy_gb_per_sec
    for key in ("images_per_sec", "tflops", "gb_per_sec"):
        if key in info:
            assert math.isfinite(info[key]) and info[key] > 0, f"{pipeline}/{variant}: {key} = {info[key]}"
    benchmark.extra_info.update(info)
    return seconds


# ---- precision labels and peaks -------------------------------------------------------------

FP32_CONV_TF32 = "fp32 (convs may use TF32)"
FP32_MATMUL_TF32 = "fp32 (matmuls may use TF32)"


def precision_label(name: str = "fp32") -> str:
    """What a model of Precision `name` really runs here, with torch's current TF32 settings.

    Only plain fp32 on CUDA depends on them: PyTorch's defaults leave TF32 off for matmuls
    (`torch.backends.cuda.matmul.allow_tf32`, so a linear layer is true fp32) and on for cuDNN
    (`torch.backends.cudnn.allow_tf32`, so convolutions may run on TF32 tensor cores): the seed
    recipe's fp32 is then FP32_CONV_TF32, and `tf32` only when both are on. Every label has its
    own measured peak (`measure_peaks`) and datasheet peak.
    """
    if name != "fp32" or not CUDA:
        return name
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    return {(True, True): "tf32", (False, True): FP32_CONV_TF32, (True, False): FP32_MATMUL_TF32,
            (False, False): "fp32"}[matmul, conv]


# NVIDIA datasheet dense (not 2:4 sparse) tensor-core TFLOP/s, and plain FP32; fp16 = bf16 on these
_HOPPER = {"fp32": 67.0, "tf32": 494.7, "bf16": 989.5, "fp16": 989.5}   # H100 SXM5, H200 SXM
_A100 = {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}     # A100 SXM4
DATASHEET_TFLOPS = [  # (test on torch.cuda.get_device_name(), peaks); first match wins
    (lambda name: "H200" in name and "NVL" not in name, _HOPPER),
    (lambda name: "H100" in name and ("SXM" in name or "HBM3" in name) and "NVL" not in name, _HOPPER),
    (lambda name: "A100" in name and "SXM" in name, _A100),
]


def datasheet_tflops(device: str, precision: str) -> float | None:
    """The datasheet's dense TFLOP/s for a device name and precision label, None when not known.

    A mixed label is bounded by its faster part: fp32 whose convolutions or matmuls may use TF32
    gets the TF32 figure.
    """
    key = "tf32" if precision in (FP32_CONV_TF32, FP32_MATMUL_TF32) else precision
    for matches, peaks in DATASHEET_TFLOPS:
        if matches(device):
            return peaks.get(key)
    return None


@dataclass
class Peaks:
    """The machine's measured limits.

    dense: TFLOP/s per precision label, each the faster of a large matmul and a large 3x3
    convolution in that dtype under that label's TF32 settings (`measure_peaks`); described: what
    was measured, per label, for the `peak` field. copy_gb_per_sec: a device copy, bytes read
    plus bytes written.
    """

    dense: dict
    described: dict
    copy_gb_per_sec: float

    def tflops(self, precision: str) -> float:
        """The measured peak for a precision label; a label without one is an error, not fp32's."""
        if precision not in self.dense:
            raise KeyError(f"no measured peak for precision {precision!r}; measured: {sorted(self.dense)}")
        return self.dense[precision]

    def describe(self, precision: str) -> str:
        return self.described[precision]


@contextlib.contextmanager
def tf32(enabled: bool, conv: bool | None = None):
    """TF32 on or off for matmuls and for cuDNN (conv: cuDNN's own setting, default `enabled`),
    restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled if conv is None else conv
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


MATMUL_N = 8192 if CUDA else 2048
CONV_SHAPE = (256, 256, 32) if CUDA else (16, 256, 16)  # batch, channels in = out, side


def _dense_tflops(dtype: torch.dtype) -> tuple[float, str]:
    """The best of a large matmul and a large 3x3 convolution (forward), and which it was: on some
    CPUs torch's matmul path is slower than oneDNN's convolutions, and a ceiling that kernels beat
    is no ceiling."""
    n = MATMUL_N
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    matmul = 2 * n**3 / _time(lambda: a @ b, 10 if CUDA else 3)
    batch, c, side = CONV_SHAPE
    x = torch.randn(batch, c, side, side, device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(DEVICE, dtype=dtype, memory_format=torch.channels_last)
    with torch.no_grad():
        conv_flops = 2 * batch * side * side * c * c * 9 / _time(lambda: conv(x), 10 if CUDA else 3)
    return max(matmul, conv_flops) / 1e12, "matmul" if matmul >= conv_flops else "convolution"


def _what(dtype: str, settings: str, best: str) -> str:
    batch, c, side = CONV_SHAPE
    return (f"measured on this machine: the faster of a {MATMUL_N}x{MATMUL_N} matmul and a 3x3 convolution "
            f"forward ({c} to {c} channels, {side}x{side}, batch {batch}, channels_last), {dtype}{settings}; "
            f"the {best} was faster")


@functools.lru_cache(maxsize=1)
def measure_peaks() -> Peaks:
    """Dense TFLOP/s for every precision label a row can carry, and the device copy bandwidth."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if CUDA:
        dtypes["fp16"] = torch.float16
    names = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    dense, described = {}, {}
    with tf32(False):  # fp32 means fp32, as the fp32 variants run
        for label, dtype in dtypes.items():
            dense[label], best = _dense_tflops(dtype)
            described[label] = _what(names[dtype], ", TF32 off for matmuls and cuDNN" if CUDA and label == "fp32" else "",
                                     best)
    if CUDA:
        for label, (matmul, conv), settings in (
                ("tf32", (True, True), "TF32 on for matmuls and cuDNN"),
                (FP32_CONV_TF32, (False, True), "TF32 off for matmuls, on for cuDNN (PyTorch's defaults)"),
                (FP32_MATMUL_TF32, (True, False), "TF32 on for matmuls, off for cuDNN")):
            with tf32(matmul, conv=conv):
                dense[label], best = _dense_tflops(torch.float32)
            described[label] = _what("float32", ", " + settings, best)
    src = torch.empty(2**28 if CUDA else 2**25, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), 20 if CUDA else 5)
    return Peaks(dense, described, 2 * src.numel() / seconds / 1e9)  # bytes read plus bytes written
