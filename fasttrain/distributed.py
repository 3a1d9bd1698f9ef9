"""Data parallelism on PyTorch's own engine: torchrun's environment, DDP, and the few collectives a run needs.

`torchrun --nproc_per_node N -m fasttrain ...` sets RANK, WORLD_SIZE and LOCAL_RANK; every
process then trains on its shard of each epoch and rank 0 alone prints and writes. Without
torchrun (or with WORLD_SIZE=1) nothing here does any work.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from fasttrain.errors import RunError, UserError

TIMEOUT_ENV = "FASTTRAIN_DIST_TIMEOUT"  # seconds a collective may wait for a lost rank (default 300)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """The process's place in a torchrun job (a single process when not under torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(d: Dist, device: torch.device) -> None:
    """Join the process group: NCCL on CUDA (one GPU per process), gloo on the CPU."""
    if not d.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "300")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(d: Dist, device: torch.device) -> torch.device:
    """Under torchrun each process drives the GPU of its local rank."""
    if d.enabled and device.type == "cuda":
        if d.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {d.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                            f"lower --nproc_per_node")
        return torch.device("cuda", d.local_rank)
    return device


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any: ranks agree on stopping at the same step."""
    if not dist.is_initialized():
        return flag
    return bool(max_(torch.tensor(int(flag), device=device)).item())


def on_main(d: Dist, fn: Callable, device: torch.device):
    """Run fn on rank 0 only; a UserError there is raised on every rank, so none waits forever."""
    result, error = None, None
    if d.is_main:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    if d.enabled:
        box = [error]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        error = box[0]
        dist.barrier()
    if error is not None:
        raise UserError(error)
    return result


def lost_rank_error(exc: Exception) -> RunError:
    return RunError(f"a collective failed or timed out: another rank failed or was killed "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    f"torchrun --max-restarts N restarts the job, --resume continues it")
