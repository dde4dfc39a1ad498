"""Distributed training under ``torchrun`` (several GPUs / nodes): this process's rank and device, the
process group, and the two collective steps the loop needs (a rank-0 result for every rank, sums over the ranks).
See the :mod:`PPCRegistrationLib.training` docstring for how the batches are shared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError, PPCError
from .train_config import TrainConfig

__all__ = ["DistInfo", "distributed_env", "init_distributed"]


@dataclass
class DistInfo:
    """This process's place in a ``torchrun`` launch (rank 0 of 1 in a plain process).

    rank, world_size, local_rank: as torchrun sets them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
    backend: ``nccl`` or ``gloo`` (None without a process group).
    owns_group: :func:`init_distributed` created the process group (and :func:`train` destroys it at the end).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def distributed_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the environment torchrun sets; ``(0, 1, 0)`` without it."""

    def get(name: str, default: int) -> int:
        text = os.environ.get(name, "")
        try:
            return int(text) if text.strip() else default
        except ValueError:
            raise InputError(f"environment variable {name}={text!r} is not an integer") from None

    return get("RANK", 0), max(1, get("WORLD_SIZE", 1)), get("LOCAL_RANK", 0)


def init_distributed(config: TrainConfig) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1) and pick this rank's device.

    ``nccl`` on CUDA (GPU ``LOCAL_RANK``), ``gloo`` on the CPU; the rendezvous is torchrun's (``env://``:
    ``MASTER_ADDR``, ``MASTER_PORT``). A process group that already exists is used as it is.
    """
    rank, world, local = distributed_env()
    if world <= 1:
        return DistInfo(), config.resolved_device()
    import torch.distributed as dist

    if not dist.is_available():
        raise InputError("WORLD_SIZE > 1 (a torchrun launch) but this torch build has no torch.distributed")
    device = config.resolved_device(local_rank=local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()), False), device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, backend, True), device


def _on_main(dinfo: DistInfo, fn: Any) -> Any:
    """Run ``fn()`` on rank 0 and give its result to every rank; an error the user can fix (PPCError) on rank 0
    is raised on every rank, so that all of them stop with the same message."""
    result, error = None, None
    if dinfo.is_main:
        try:
            result = fn()
        except PPCError as exc:
            error = exc
    if dinfo.distributed:
        import torch.distributed as dist

        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise error
    return result


def _all_sum(dinfo: DistInfo, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over the ranks (the values themselves in a plain process)."""
    if not dinfo.distributed:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]
