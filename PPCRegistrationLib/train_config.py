"""The settings of a training run of the learned operator (:class:`TrainConfig`) and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .devices import resolve_device
from .errors import InputError
from .learned_operator import CPU_FLOW_HPARAMS, LEARNED_METHODS
from .losses import POSE_LOSSES

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Training settings (defaults: the paper's optimiser; sizes for a CPU).

    method: one of ``flow``, ``ppc-flow``, ``ppc-flow-attention``.
    iterations: optimiser steps.
    batch_size, lr, weight_decay: Adam on mini-batches (the paper: 16, 1e-4, 1e-6).
    lambda_epe: weight of the EPE (pixels) in the PPC losses (mTRE in mm + lambda * EPE).
    out_of_plane: damping of the weakly observable directions in the PPC layer (see
        :func:`~PPCRegistrationLib.ppc.out_of_plane_damping`; the registration's ``plain_out_of_plane``).
    mtre_clip_mm: per-sample mTRE loss is capped there (a wildly wrong update should not dominate a batch).
    pose_loss: the pose error of the PPC losses: ``mtre`` (the paper's) or ``mrpd`` (see :func:`compute_loss`).
    grad_clip: gradient-norm clipping (0 = off).
    val_every, val_samples: validation period (steps) and number of validation samples.
    checkpoint_every: checkpoint period (steps).
    augment: mirror each training sample left-right and/or up-down at random (:func:`~PPCRegistrationLib.dataset.
        flip_samples`; exact, the geometry is mirrored too): four times the views of a small data set.
    zoom: with ``augment``, also magnify each sample by a factor uniform in [1, zoom] (:func:`~PPCRegistrationLib.
        dataset.zoom_samples`; exact): anatomy of other sizes (1 = off).
    evidence: ``ppc-flow-attention``'s attention also sees the local matching evidence of each correspondence
        (:func:`~PPCRegistrationLib.networks.match_evidence`), not only the paper's geometric point features.
    init: operator file to start from (fine-tuning, e.g. ``ppc-flow`` from a ``flow`` model): the parameters
        that exist in both are copied.
    flow: FlowNetC hyper-parameters.
    seed: seed of the initialisation and of the batch order.
    device: ``auto``, ``cpu`` or ``cuda``.
    """

    method: str = "ppc-flow-attention"
    iterations: int = 10000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-6
    lambda_epe: float = 1.0
    out_of_plane: float = 1.0
    mtre_clip_mm: float = 100.0
    grad_clip: float = 10.0
    val_every: int = 250
    val_samples: int = 400
    checkpoint_every: int = 250
    augment: bool = False
    zoom: float = 1.0
    pose_loss: str = "mtre"
    evidence: bool = True
    init: str | None = None
    flow: dict = field(default_factory=lambda: dict(CPU_FLOW_HPARAMS))
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in LEARNED_METHODS:
            raise InputError(f"unknown method {self.method!r}: use one of {', '.join(LEARNED_METHODS)}")
        for name in ("iterations", "batch_size", "val_every", "checkpoint_every", "val_samples"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.pose_loss not in POSE_LOSSES:
            raise InputError(f"unknown pose loss {self.pose_loss!r}: use one of {', '.join(POSE_LOSSES)}")
        if not (math.isfinite(float(self.zoom)) and float(self.zoom) >= 1):
            raise InputError(f"the largest zoom factor must be >= 1 (1 = no zoom), got {self.zoom}")
        for name in ("lr", "weight_decay", "lambda_epe", "mtre_clip_mm", "grad_clip"):
            v = float(getattr(self, name))
            if not (v >= 0 and math.isfinite(v)):
                raise InputError(f"{name} must be a non-negative number, got {v}")
        if self.lr <= 0:
            raise InputError("the learning rate must be positive")

    def resolved_device(self, local_rank: int | None = None) -> torch.device:
        """The torch device (:func:`~PPCRegistrationLib.devices.resolve_device`); with ``local_rank`` (a torchrun
        process) a plain ``cuda``/``auto`` on a GPU machine becomes ``cuda:<local_rank>``."""
        return resolve_device(self.device, local_rank)
