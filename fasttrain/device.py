"""Device, precision, memory format and compilation: decided once per run and passed in."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from fasttrain.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


@dataclass(frozen=True)
class Precision:
    """Autocast settings: bf16 where the device has it, fp16 with a GradScaler otherwise."""

    device_type: str
    dtype: torch.dtype | None   # None: plain fp32

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        # loss scaling is only needed for fp16's narrow exponent range
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)


def choose_precision(device: torch.device, amp: bool) -> Precision:
    if not amp:
        return Precision(device.type, None)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision("cuda", torch.float16)
    return Precision(device.type, torch.bfloat16)


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        # fixed shapes: the autotuned kernels are reused every step. TF32 matmuls stay at
        # PyTorch's default (off) so the seed recipe is true fp32; --amp runs them in bf16.
        torch.backends.cudnn.benchmark = True


def prepare_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return model.to(device=device, memory_format=memory_format)



def compiler(enabled: bool, mode: str = "default"):
    """torch.compile with static shapes (the loaders guarantee fixed batch shapes), or None when off.

    mode: torch.compile's mode ("reduce-overhead" replays CUDA graphs). The backend is inductor,
    or $FASTTRAIN_COMPILE_BACKEND ("eager", "aot_eager": Dynamo's graph capture without code
    generation, which needs no C++ toolchain; the tests use it to count graphs on a CPU).
    Compiled code is cached on disk (torch's FX graph and AOT autograd caches, in
    $TORCHINDUCTOR_CACHE_DIR, by default under fasttrain's cache folder), so a second run of the
    same recipe compiles much faster.
    """
    if not enabled:
        return None
    import functools
    import os

    from fasttrain.data.index import cache_dir

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    backend = os.environ.get("FASTTRAIN_COMPILE_BACKEND", "inductor")
    options = {"mode": mode} if backend == "inductor" and mode != "default" else {}
    return functools.partial(torch.compile, dynamic=False, backend=backend, **options)


def maybe_compile(model: nn.Module, enabled: bool, mode: str = "default") -> nn.Module:
    """The model compiled (see `compiler`), or the model itself when compiling is off."""
    compile_ = compiler(enabled, mode)
    return compile_(model) if compile_ is not None else model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall time of a region, synchronised with the device on both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start
