"""The torch device a setting names (``auto``, ``cpu``, ``cuda``, ``cuda:N``), with a clear error when CUDA is
asked for but absent."""

from __future__ import annotations

import torch

from .errors import InputError

__all__ = ["resolve_device"]


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device of a setting.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        local_rank: a torchrun process's ``LOCAL_RANK``: a plain ``cuda`` (or ``auto`` on a GPU machine)
            becomes ``cuda:<local_rank>``.
    Raises:
        InputError: CUDA requested but not available, or ``local_rank`` beyond this node's GPUs.
    """
    if name == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        if local_rank is None:
            return torch.device(dev)
    else:
        dev = name
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available: use 'cpu' or 'auto'")
    if dev == "cuda" and local_rank is not None:
        n = torch.cuda.device_count()
        if not 0 <= local_rank < n:
            raise InputError(f"LOCAL_RANK is {local_rank} but this node has {n} GPU(s): start at most {n} "
                             "processes per node (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    return torch.device(dev)
