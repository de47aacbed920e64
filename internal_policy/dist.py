"""Run-folder mechanics shared by profiling and generation: ranks, barriers, atomic files, resuming.

Under `torchrun` / `accelerate launch` both split their work by rank and write one file per
finished unit, each written to a temporary name and renamed, so a killed process never leaves a
half-written result; a resumed run must use the settings it was started with.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import InputError
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


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` then rename tmp → path, so `path` is either absent or complete (tmp removed on failure)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def check_resume(where: Path, saved: dict, settings: dict, keys, resume: bool,
                 describe: Callable[[str, object, object], str] = lambda key, saved, now: key) -> None:
    """Refuse to overwrite a started run without `resume`, and to resume it with other `keys` settings
    (`describe(key, saved, now)` names each difference in the one-line error)."""
    if not resume:
        raise InputError(f"{where} already holds a run; pass --resume to continue it or choose another --out")
    changed = [describe(k, saved.get(k), settings.get(k)) for k in keys if saved.get(k) != settings.get(k)]
    if changed:
        raise InputError(f"cannot resume {where}: settings differ from the run there in {'; '.join(changed)}; "
                         "use the same ones or another --out")
