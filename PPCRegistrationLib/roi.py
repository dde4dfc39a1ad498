"""Regions of interest: which part of the CT is registered (docs/design.md §3, initialisation step 1).

Two kinds, both in world coordinates (mm) so they work on any CT grid:

* :class:`BoxROI`: an (optionally oriented) box, e.g. from a Slicer ROI markup.
* :class:`LabelROI`: a set of label ids of a label map (e.g. a TotalSegmentator vertebra); the label map may
  have a different grid than the CT, it is resampled (nearest neighbour) through world coordinates.

Every ROI gives :meth:`ROI.mask_on` -- a ``(K, J, I)`` bool mask on a volume's grid, optionally dilated by a
margin in mm -- and :meth:`ROI.bounds_world` -- its axis-aligned world bounding box.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch

from .errors import InputError
from .sample_data import vertebra_label_id
from .volume import Volume

__all__ = ["ROI", "BoxROI", "LabelROI", "roi_from_vertebra", "dilate_mask"]

def _as_f64(x, shape: tuple[int, ...], what: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    if tuple(t.shape) != shape:
        raise InputError(f"{what} must have shape {shape}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError(f"{what} contains NaN or infinite values")
    return t


def dilate_mask(mask: torch.Tensor, volume: Volume, margin_mm: float) -> torch.Tensor:
    """Dilate a ``(K, J, I)`` bool mask on ``volume``'s grid by ``margin_mm`` (Euclidean, in mm).

    Uses the voxel spacing (exact for axis-aligned grids, an approximation for sheared ones).
    """
    if margin_mm <= 0 or not bool(mask.any()):
        return mask
    from scipy import ndimage

    m = mask.detach().cpu().numpy()
    sp = volume.spacing.cpu().numpy()[::-1]  # (k, j, i) order
    pad = np.ceil(margin_mm / sp).astype(int) + 1
    nz = np.nonzero(m)
    lo = np.maximum(np.array([a.min() for a in nz]) - pad, 0)
    hi = np.minimum(np.array([a.max() for a in nz]) + pad + 1, m.shape)
    sub = m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    dist = ndimage.distance_transform_edt(~sub, sampling=sp)
    out = m.copy()
    out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = dist <= margin_mm + 1e-6
    return torch.from_numpy(out).to(mask.device)


class ROI(ABC):
    """A region of interest in world coordinates (mm)."""

    @abstractmethod
    def _raw_mask(self, volume: Volume) -> torch.Tensor:
        """``(K, J, I)`` bool mask on ``volume``'s grid (CPU), not dilated."""

    @abstractmethod
    def bounds_world(self) -> torch.Tensor:
        """``(2, 3)`` float64: axis-aligned world bounding box (min row, max row) in mm."""

    def mask_on(self, volume: Volume, margin_mm: float = 0.0) -> torch.Tensor:
        """Voxels of ``volume`` inside the ROI (dilated by ``margin_mm``).

        Args:
            volume: the CT (any grid; only its shape and ``ijk_to_world`` are used).
            margin_mm: dilation of the region (mm), 0 for the region itself.
        Returns:
            ``(K, J, I)`` bool tensor on ``volume.device``.
        Raises:
            InputError: when the region contains no voxel of the volume.
        """
        mask = self._raw_mask(volume)
        if margin_mm > 0:
            mask = dilate_mask(mask, volume, margin_mm)
        if not bool(mask.any()):
            b = self.bounds_world().numpy()
            lo_v, hi_v = volume.corners_world().min(0).values.cpu().numpy(), \
                volume.corners_world().max(0).values.cpu().numpy()
            raise InputError(
                f"the region of interest contains no voxels of the CT: {self!r} spans world "
                f"{np.round(b[0], 1).tolist()}..{np.round(b[1], 1).tolist()} mm, the CT spans "
                f"{np.round(lo_v, 1).tolist()}..{np.round(hi_v, 1).tolist()} mm. Check that the ROI and the CT "
                "use the same world frame (RAS vs LPS) and that the ROI lies inside the CT")
        return mask.to(volume.device)


class BoxROI(ROI):
    """An oriented box in world coordinates.

    Args:
        center: ``(3,)`` world position of the box centre (mm).
        size: ``(3,)`` full edge lengths (mm) along the box axes.
        axes: optional ``(3, 3)`` matrix whose *columns* are the box axes in world coordinates (orthonormal);
            identity (world-axis aligned) when omitted.
    """

    def __init__(self, center: Sequence[float] | torch.Tensor, size: Sequence[float] | torch.Tensor,
                 axes: Sequence[Sequence[float]] | torch.Tensor | None = None) -> None:
        self.center = _as_f64(center, (3,), "BoxROI center")
        self.size = _as_f64(size, (3,), "BoxROI size")
        if (self.size <= 0).any():
            raise InputError(f"BoxROI size must be positive in all three directions (mm), got {self.size.tolist()}")
        if axes is None:
            self.axes = torch.eye(3, dtype=torch.float64)
        else:
            a = _as_f64(axes, (3, 3), "BoxROI axes")
            n = torch.linalg.norm(a, dim=0)
            if (n < 1e-9).any():
                raise InputError("BoxROI axes must be non-zero vectors (columns of a 3x3 matrix)")
            a = a / n
            if not torch.allclose(a.T @ a, torch.eye(3, dtype=torch.float64), atol=1e-4):
                raise InputError("BoxROI axes must be orthogonal (columns of a rotation matrix)")
            self.axes = a

    def __repr__(self) -> str:
        return (f"BoxROI(center={np.round(self.center.numpy(), 2).tolist()}, "
                f"size={np.round(self.size.numpy(), 2).tolist()})")

    def corners_world(self) -> torch.Tensor:
        """``(8, 3)`` float64 world corners of the box (mm)."""
        s = torch.tensor([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], dtype=torch.float64)
        return self.center + (s * self.size / 2) @ self.axes.T

    def bounds_world(self) -> torch.Tensor:
        c = self.corners_world()
        return torch.stack([c.min(0).values, c.max(0).values])

    def contains(self, points: torch.Tensor) -> torch.Tensor:
        """``(..., 3)`` world points (mm) -> ``(...)`` bool, inside the box (boundary included)."""
        local = (points.to(torch.float64) - self.center.to(points.device)) @ self.axes.to(points.device)
        return (local.abs() <= self.size.to(points.device) / 2 + 1e-9).all(-1)

    def _raw_mask(self, volume: Volume) -> torch.Tensor:
        shape = volume.shape
        mask = torch.zeros(shape, dtype=torch.bool)
        ijk = volume.world_to_index(self.corners_world().to(volume.device)).cpu()
        lo = torch.floor(ijk.min(0).values).long().clamp_min(0)
        hi = torch.ceil(ijk.max(0).values).long() + 1
        hi = torch.minimum(hi, torch.tensor([shape[2], shape[1], shape[0]]))
        if (hi <= lo).any():
            return mask
        ii, jj, kk = (torch.arange(int(lo[d]), int(hi[d]), dtype=torch.float64) for d in range(3))
        grid = torch.stack(torch.meshgrid(kk, jj, ii, indexing="ij")[::-1], -1)  # (k, j, i, 3) as (i, j, k)
        world = volume.index_to_world(grid.to(volume.device)).cpu()
        mask[int(lo[2]):int(hi[2]), int(lo[1]):int(hi[1]), int(lo[0]):int(hi[0])] = self.contains(world)
        return mask


class LabelROI(ROI):
    """The voxels of a label map whose value is one of ``label_ids``.

    Args:
        labels: the label map (any grid, values are integer ids).
        label_ids: the ids that make up the region (e.g. ``[29]`` for L3 in TotalSegmentator v2).
    """

    def __init__(self, labels: Volume, label_ids: Sequence[int] | int) -> None:
        ids = [int(label_ids)] if isinstance(label_ids, (int, np.integer)) else [int(i) for i in label_ids]
        if not ids:
            raise InputError("LabelROI needs at least one label id")
        self.labels = labels.to("cpu")
        self.label_ids = ids
        self._own = torch.isin(torch.round(self.labels.data).to(torch.int64), torch.tensor(ids))
        if not bool(self._own.any()):
            present = torch.unique(torch.round(self.labels.data).to(torch.int64))
            present = [int(p) for p in present if p != 0]
            raise InputError(
                f"the region of interest contains no voxels of the CT: the label map has no voxel with id {ids} "
                f"(ids present: {present[:40]}{' ...' if len(present) > 40 else ''})")

    def __repr__(self) -> str:
        return f"LabelROI(label_ids={self.label_ids})"

    def bounds_world(self) -> torch.Tensor:
        nz = torch.nonzero(self._own)  # (n, 3) as (k, j, i)
        lo = nz.min(0).values.flip(0).to(torch.float64) - 0.5
        hi = nz.max(0).values.flip(0).to(torch.float64) + 0.5
        corners = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=torch.float64)
        idx = lo + corners * (hi - lo)
        w = self.labels.index_to_world(idx)
        return torch.stack([w.min(0).values, w.max(0).values])

    def _raw_mask(self, volume: Volume) -> torch.Tensor:
        lab = self.labels
        if lab.shape == volume.shape and torch.allclose(lab.ijk_to_world, volume.ijk_to_world.cpu(), atol=1e-4):
            return self._own.clone()
        # different grids: nearest-neighbour lookup of the CT voxels inside the label bounding box
        box = BoxROI((self.bounds_world()[0] + self.bounds_world()[1]) / 2,
                     self.bounds_world()[1] - self.bounds_world()[0] + 1e-6)
        shape = volume.shape
        mask = torch.zeros(shape, dtype=torch.bool)
        ijk = volume.world_to_index(box.corners_world().to(volume.device)).cpu()
        lo = torch.floor(ijk.min(0).values).long().clamp_min(0)
        hi = torch.minimum(torch.ceil(ijk.max(0).values).long() + 1, torch.tensor([shape[2], shape[1], shape[0]]))
        if (hi <= lo).any():
            return mask
        ii, jj, kk = (torch.arange(int(lo[d]), int(hi[d]), dtype=torch.float64) for d in range(3))
        grid = torch.stack(torch.meshgrid(kk, jj, ii, indexing="ij")[::-1], -1)
        world = volume.index_to_world(grid.to(volume.device)).cpu()
        lidx = torch.round(lab.world_to_index(world)).long()  # (k, j, i, 3) as (i, j, k) in the label grid
        K, J, I = lab.shape
        inside = ((lidx[..., 0] >= 0) & (lidx[..., 0] < I) & (lidx[..., 1] >= 0) & (lidx[..., 1] < J)
                  & (lidx[..., 2] >= 0) & (lidx[..., 2] < K))
        lidx = torch.where(inside[..., None], lidx, torch.zeros_like(lidx))
        sub = self._own[lidx[..., 2], lidx[..., 1], lidx[..., 0]] & inside
        mask[int(lo[2]):int(hi[2]), int(lo[1]):int(hi[1]), int(lo[0]):int(hi[0])] = sub
        return mask


def roi_from_vertebra(labels: Volume, name: str) -> LabelROI:
    """ROI of one vertebra of a TotalSegmentator (v2) label map.

    Args:
        labels: the label map.
        name: "L3", "T12", "C7", "S1", "sacrum" (case-insensitive; "vertebrae_L3" also accepted).
    Raises:
        InputError: unknown name, or the vertebra is absent from the label map.
    """
    lid = vertebra_label_id(name)
    try:
        return LabelROI(labels, [lid])
    except InputError as exc:
        raise InputError(f"vertebra {name} (label id {lid}) is not in the label map: {exc}") from None

