"""The files a training run starts from: its checkpoint (written atomically, read back to resume) and, for
fine-tuning, the parameters of an operator file copied into a new operator (``TrainConfig.init``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .learned_operator import LearnedOperator
from .model_files import operator_from_file


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)


def _load_checkpoint(path: Path, method: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        ck = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise InputError(f"cannot read the checkpoint {path} ({type(exc).__name__}: {str(exc)[:200]}); delete it "
                         "or start afresh without resuming") from exc
    if not isinstance(ck, dict) or not {"model", "optimizer", "iteration"} <= set(ck):
        raise InputError(f"{path} is not a training checkpoint; delete it or use another output folder")
    if ck.get("config", {}).get("method") != method:
        raise InputError(f"{path} is a checkpoint of {ck.get('config', {}).get('method')!r}, not "
                         f"{method!r}: use another output folder")
    return ck


def _init_from(op: LearnedOperator, path: str, device: torch.device) -> list[str]:
    """Copy the parameters ``op`` shares (same name and shape) with the operator file ``path``.

    Refinement levels of the flow network are matched by their stride, not by their position, so that a network
    with a coarser correlation level (e.g. stride 16 with refinement levels 8, 4) starts its stride-4 level from the
    stride-4 level of the file (e.g. a stride-8 network with one refinement level at stride 4).
    """
    src, _ = operator_from_file(path, device)
    theirs = _refinements_by_stride(src.state_dict(), src.flow_net.refine_strides, op.flow_net.refine_strides)
    mine = op.state_dict()
    copied = [k for k in mine if k in theirs and theirs[k].shape == mine[k].shape]
    op.load_state_dict({**mine, **{k: theirs[k] for k in copied}})
    return copied


def _refinement_prefix(i: int) -> str:
    return f"flow_net.refinements.{i}."


def _refinements_by_stride(state: dict[str, torch.Tensor], strides: list[int],
                           target_strides: list[int]) -> dict[str, torch.Tensor]:
    """``state`` with the parameters of its flow refinement level of stride ``strides[i]`` renamed to the index that
    stride has in ``target_strides`` (levels of strides the target does not have are left out)."""
    out = {k: v for k, v in state.items() if not k.startswith("flow_net.refinements.")}
    for i, stride in enumerate(strides):
        if stride in target_strides:
            src, dst = _refinement_prefix(i), _refinement_prefix(list(target_strides).index(stride))
            out.update({dst + k[len(src):]: v for k, v in state.items() if k.startswith(src)})
    return out
