"""The few nouns a researcher needs (re-exported by the package): read a CT, an X-ray, a geometry and a transform,
choose the region of interest, and register (docs/design.md §7).

Example (a simulated X-ray of the lumbar test CT; ``lumbar_dir`` is its folder):

>>> import PPCRegistrationLib as ppc
>>> ct = ppc.read_volume(f"{lumbar_dir}/ct.nii.gz")
>>> roi = ppc.vertebra_roi(f"{lumbar_dir}/labels.nii.gz", "L3", reference=ct)
>>> case = ppc.simulate_case(ct, roi, seed=3, mtre_mm=10.0)           # or: xray, geometry, T_init from files
>>> result = ppc.register(ct, case.xray, case.projection, case.T_init, roi=roi)
>>> print(result.status, result.T.shape, float(ppc.mtre(result.T, case.T_gt, case.targets)) < 2.0)
converged torch.Size([4, 4]) True

With files: ``xray = ppc.read_xray("xray.nrrd").image``, ``geometry = ppc.read_geometry("geometry.json")``,
``T_init = ppc.read_transform("T_init.json")`` (docs/formats.md; RAS files from Slicer are converted to the CT's LPS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .config import IterationState, RegistrationConfig, RegistrationResult
from .drr import DRRRenderer
from .formats import load_geometry, load_transform, projection_in_lps, transform_in_lps
from .geometry import Projection
from .io import read_label_map
from .registration import registration_surface
from .roi import LabelROI, roi_from_vertebra
from .simulation import SimulatedCase, ViewSampler, make_case
from .volume import Volume

__all__ = ["read_geometry", "read_transform", "vertebra_roi", "simulate_case", "register"]


def read_geometry(path: str | Path) -> Projection:
    """The C-arm geometry of a geometry file (docs/formats.md), in LPS."""
    return projection_in_lps(load_geometry(path), path)


def read_transform(path: str | Path) -> torch.Tensor:
    """The ``(4, 4)`` rigid transform of a transform file (docs/formats.md), in LPS (mm)."""
    return transform_in_lps(load_transform(path), path)


def vertebra_roi(labels: str | Path | Volume, vertebra: str, reference: Volume | None = None) -> LabelROI:
    """The region of interest of one vertebra (``"L3"``, ``"T8"``...) of a TotalSegmentator label map (a file, read
    on the grid of ``reference`` when given, or a :class:`~.volume.Volume`)."""
    lab = labels if isinstance(labels, Volume) else read_label_map(labels, reference=reference)
    return roi_from_vertebra(lab, vertebra)


def simulate_case(ct: Volume, roi=None, *, seed: int = 0, mtre_mm: float | tuple[float, float] = 10.0,
                  detector_px: int = 256) -> SimulatedCase:
    """A simulated X-ray of ``ct`` at a random C-arm view (docs/design.md §6), with the ground truth ``T_gt`` and an
    initial estimate ``T_init`` at ``mtre_mm`` (or uniform in a range) over the region's surface points."""
    surface = registration_surface(ct, roi)
    rng = (float(mtre_mm), float(mtre_mm)) if isinstance(mtre_mm, (int, float)) else tuple(map(float, mtre_mm))
    return make_case(DRRRenderer(ct), surface.points.to(torch.float64), seed, rng,
                     ViewSampler(detector_size_px=detector_px))


def register(ct: Volume, xray: torch.Tensor, projection: Projection, T_init: torch.Tensor, *, roi=None,
             method: str = "classic", config: RegistrationConfig | None = None, T_gt: torch.Tensor | None = None,
             callback: Callable[[IterationState], None] | None = None) -> RegistrationResult:
    """Register the CT to one X-ray: the whole pipeline of ``method`` (``classic``, a learned operator or a chained
    ``<learned>+classic``, :mod:`.methods`) from ``T_init`` (``(4, 4)``, moves the CT, mm).

    Args:
        ct: the CT (HU); xray: ``(H, W)`` attenuation-positive image; projection: its C-arm (batch 1, LPS).
        roi: the region of interest (:func:`vertebra_roi`, a ``BoxROI``) or None (the whole CT).
        config: settings (default :class:`~.config.RegistrationConfig`); T_gt: ground truth, for the history's mTRE.
        callback: called with every update's :class:`~.config.IterationState` (progress).
    Returns:
        :class:`~.config.RegistrationResult` (``T``, ``status``, ``history``, ``seconds``); the inputs are not
        modified.
    """
    from .methods import build_registration

    reg = build_registration(method, ct, xray, projection, T_init, roi, config=config, T_gt=T_gt)
    return reg.run(callback=callback)
