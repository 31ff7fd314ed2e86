"""Process-group setup shared by every stage: one code path for 1 process or N under torchrun.

`setup()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it the stage runs
as a single process and no process group is created. The backend is NCCL when CUDA is present,
gloo otherwise (CPU tests run real multi-process gloo groups).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sitctl.errors import SitctlError


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank, the world size, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> Dist:
    """Initialise the process group if launched by torchrun; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = torch.device(rank_device(device, local_rank, world_size, torch.cuda.is_available()))
    use_cuda = torch_device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            device_id=torch_device if use_cuda else None,
        )
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def rank_device(device: str | None, local_rank: int, world_size: int, cuda_available: bool) -> str:
    """The device of this rank for --device (cpu, cuda, cuda:N or None: cuda when present).

    One process honours cuda:N; under torchrun each rank takes cuda:LOCAL_RANK, so a single named
    GPU, which would put every rank on it, is refused in one line.
    """
    if device == "cpu" or (device is None and not cuda_available):
        return "cpu"
    if device is not None and device.startswith("cuda:"):
        if world_size > 1:
            raise SitctlError(f"--device {device} names one GPU, but this job has {world_size} processes, each on "
                              "cuda:LOCAL_RANK; pass --device cuda (or leave it out)")
        return device
    return f"cuda:{local_rank}"


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def all_reduce_sum(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op for one process) and return it."""
    if d.active:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_agree(d: Dist, ok: bool) -> bool:
    """Whether `ok` holds on every rank (a collective: every rank must call it)."""
    refusals = torch.tensor([0.0 if ok else 1.0], device=d.device)  # on the device: NCCL needs it there
    return all_reduce_sum(d, refusals).item() == 0.0


def stop_signal(d: Dist, signum: int | None, finished: bool) -> int:
    """The signal every rank stops on (the highest number any rank received: SIGTERM over SIGINT), or 0.

    0 also when every rank has `finished` its share: a signal after the last unit of work loses
    nothing, so the stage completes. A collective: every rank calls it at the same point.
    """
    state = torch.tensor([float(signum or 0), 0.0 if finished else 1.0], device=d.device)
    if d.active:
        dist.all_reduce(state, op=dist.ReduceOp.MAX)
    return int(state[0]) if state[1] > 0 else 0


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which a scheduler or taskset narrows)."""
    return len(os.sched_getaffinity(0))


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
