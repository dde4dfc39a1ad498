"""The training losses of the learned operator (docs/design.md §3): the EPE for ``flow``, the pose error after
the PPC layer (mTRE or mean re-projection distance, mm) + ``lambda_epe`` * EPE for the PPC models.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .errors import InputError

__all__ = ["compute_loss", "POSE_LOSSES"]

#: pose errors the PPC models can be trained on (through the PPC layer), see :func:`compute_loss`
POSE_LOSSES = ("mtre", "mrpd")


def compute_loss(method: str, step: Mapping[str, torch.Tensor], lambda_epe: float = 1.0,
                 mtre_clip_mm: float = 100.0, pose_loss: str = "mtre") -> torch.Tensor:
    """The training loss of a batch: EPE (``flow``) or pose error + ``lambda_epe`` * EPE (the PPC models).

    The pose error after the PPC layer is the mTRE (``pose_loss="mtre"``, the paper's) or the mean re-projection
    distance (``"mrpd"``: the part of the error a single view observes; the depth error, which one damped update
    does not correct, then does not dilute the gradient). Samples whose PPC system is rank deficient contribute
    their EPE only; each sample's pose error is capped at ``mtre_clip_mm``.
    """
    epe = step["epe"].mean()
    if method == "flow":
        return epe
    if pose_loss not in POSE_LOSSES:
        raise InputError(f"unknown pose loss {pose_loss!r}: use one of {', '.join(POSE_LOSSES)}")
    ok = ~step["rank_deficient"]
    m = step[f"{pose_loss}_after"].clamp(max=float(mtre_clip_mm))
    m = torch.where(ok, m, torch.zeros_like(m))
    return m.sum() / ok.sum().clamp_min(1) + float(lambda_epe) * epe.to(m.dtype)
