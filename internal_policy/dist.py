"""torch.distributed for profiling and generation: joining the process group, ranks, barriers.

Under `torchrun` / `accelerate launch` both split their work by rank; what each rank writes into
the run folder goes through `runs.RunDir`.
"""

from __future__ import annotations

import os

import torch

from .models import resolve_device


def init(device: str | None) -> str:
    """Under WORLD_SIZE > 1 join the process group (nccl on GPUs, gloo on CPU); return this rank's device.

    A device this machine lacks (`cuda` without a GPU, `mps`, a typo) is an InputError.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return resolve_device(device)
    if device is not None:
        resolve_device(device)  # only checked: each rank takes its LOCAL_RANK GPU
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return f"cuda:{local}" if cuda else "cpu"


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if rank_world()[1] > 1:
        torch.distributed.barrier()
