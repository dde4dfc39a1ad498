"""3D features of the CT and their 2D counterparts (docs/design.md §3).

* :func:`extract_surface_points` -- initialisation step 1: bone surface points ``w_i`` of the region of
  interest and the 3D CT gradient ``g_i`` there (3D Canny edges, restricted to bone and to the ROI, sub-voxel
  positions, spatially uniform subsampling to a budget).
* :func:`contour_mask` -- update step 2: the surface points on the silhouette seen from the X-ray source
  (gradient perpendicular to the viewing ray).
* :func:`project_normals` -- the 2D image direction of the projected gradient, along which the 2D matching
  searches (update step 4).

Units: world millimetres, Hounsfield units (HU), gradients in HU/mm, image coordinates in pixels (u, v).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .geometry import Projection, rotate_vectors, transform_points
from .roi import ROI
from .volume import Volume

__all__ = ["SurfacePoints", "extract_surface_points", "contour_mask", "project_normals", "farthest_point_sampling"]


@dataclass(frozen=True)
class SurfacePoints:
    """Bone surface points of the CT with the CT intensity gradient at each.

    Attributes:
        points: ``(N, 3)`` float64 world positions (mm), in the CT's (unmoved) world frame.
        gradients: ``(N, 3)`` float64 gradient of the Gaussian-smoothed CT (HU/mm) at each point, in world
            coordinates; it points from soft tissue into bone (the outward surface normal is ``-g/|g|``).
    """

    points: torch.Tensor
    gradients: torch.Tensor

    def __post_init__(self) -> None:
        if self.points.ndim != 2 or self.points.shape[-1] != 3 or self.gradients.shape != self.points.shape:
            raise InputError(f"SurfacePoints needs points (N,3) and gradients (N,3), got "
                             f"{tuple(self.points.shape)} and {tuple(self.gradients.shape)}")

    def __len__(self) -> int:
        return int(self.points.shape[0])

    @property
    def normals(self) -> torch.Tensor:
        """``(N, 3)`` unit gradient directions (into the bone)."""
        return self.gradients / torch.linalg.norm(self.gradients, dim=-1, keepdim=True).clamp_min(1e-12)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SurfacePoints":
        return SurfacePoints(self.points.to(device=device, dtype=dtype), self.gradients.to(device=device, dtype=dtype))


# ----------------------------------------------------------------------------- subsampling


def farthest_point_sampling(points: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Indices ``(k,)`` of a spatially uniform subset of ``points`` ``(N, 3)`` (greedy farthest-point order).

    Deterministic for a given ``seed`` (it picks the first point). Returns all indices when ``k >= N``.
    """
    n = points.shape[0]
    if k >= n:
        return torch.arange(n, device=points.device)
    gen = torch.Generator().manual_seed(int(seed))
    first = int(torch.randint(n, (1,), generator=gen))
    # a sequential loop of tiny vector operations: numpy has no per-call threading overhead (torch's small ops
    # cost milliseconds each on a loaded multi-threaded CPU)
    x = points.detach().cpu().to(torch.float64).numpy()
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = first
    dist = ((x - x[first]) ** 2).sum(-1)
    for m in range(1, k):
        nxt = int(np.argmax(dist))
        chosen[m] = nxt
        np.minimum(dist, ((x - x[nxt]) ** 2).sum(-1), out=dist)
    return torch.from_numpy(chosen).to(points.device)


def _voxel_grid_reduce(points: torch.Tensor, target: int, seed: int) -> torch.Tensor:
    """Indices of at most about ``target`` points, one per cell of a regular grid (spatially uniform)."""
    n = points.shape[0]
    ext = (points.max(0).values - points.min(0).values).clamp_min(1e-6)
    # a surface of n points: the cell edge that gives about `target` occupied cells
    area = float(torch.prod(ext)) ** (2.0 / 3.0)
    h = math.sqrt(area / max(target, 1))
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    for _ in range(20):
        cell = torch.floor((points[perm] - points.min(0).values) / h).to(torch.int64)
        key = (cell[:, 0] * 1_000_003 + cell[:, 1]) * 1_000_033 + cell[:, 2]
        _, inv = torch.unique(key, return_inverse=True)
        first = torch.full((int(inv.max()) + 1,), n, dtype=torch.long)
        first.scatter_reduce_(0, inv, torch.arange(n), reduce="amin")
        if first.numel() <= 2 * target or h > float(ext.max()):
            return torch.sort(perm[first])[0]
        h *= 1.3
    return torch.sort(perm[first])[0]


# ----------------------------------------------------------------------------- extraction


def _sample(arr: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``arr`` (k, j, i) at continuous indices ``ijk`` (n, 3) as (i, j, k)."""
    from scipy import ndimage

    coords = np.stack([ijk[:, 2], ijk[:, 1], ijk[:, 0]])
    return ndimage.map_coordinates(arr, coords, order=1, mode="nearest")


def extract_surface_points(volume: Volume, roi: ROI | None = None, *, bone_threshold_hu: float = 150.0,
                           sigma_mm: float = 1.0, budget: int = 2000, roi_margin_mm: float = 5.0, seed: int = 0,
                           canny_thresholds_hu_per_mm: tuple[float, float] = (15.0, 40.0),
                           subvoxel: bool = True) -> SurfacePoints:
    """Bone surface points of the CT in the region of interest (docs/design.md §3, initialisation step 1).

    1. The CT is cropped to the ROI (dilated by ``roi_margin_mm``) plus a border for the filters.
    2. 3D Canny edges (SimpleITK ``CannyEdgeDetectionImageFilter``, Gaussian variance ``sigma_mm**2``,
       hysteresis thresholds on the gradient magnitude in HU/mm).
    3. Edge voxels are kept when they lie in the dilated ROI, their gradient magnitude reaches the lower
       threshold, and the CT on the bright side of the edge (0.5-1.5 voxel along the gradient) reaches
       ``bone_threshold_hu``.
    4. Sub-voxel positions: the gradient-magnitude peak along the gradient direction (parabolic fit).
    5. Gradients of the Gaussian-smoothed CT (sigma at least half a voxel) interpolated at the points and
       converted to world coordinates (exact for any ``ijk_to_world``).
    6. Spatially uniform subsampling to ``budget`` points (voxel grid + farthest-point sampling, seeded).

    Args:
        volume: the CT, in HU.
        roi: region of interest (a :class:`~PPCRegistrationLib.roi.BoxROI`, a
            :class:`~PPCRegistrationLib.roi.LabelROI`, ...); the whole CT when ``None``.
        bone_threshold_hu: minimum CT value (HU) on the bone side of an edge.
        sigma_mm: Gaussian smoothing (mm) of the edge detector and of the gradients.
        budget: maximum number of points returned.
        roi_margin_mm: the ROI is dilated by this margin (mm) so the bone surface at its border is kept.
        seed: seed of the subsampling (the result is deterministic).
        canny_thresholds_hu_per_mm: (lower, upper) hysteresis thresholds of the gradient magnitude (HU/mm).
        subvoxel: refine the positions to sub-voxel precision.
    Returns:
        :class:`SurfacePoints` with ``min(budget, #edges)`` points (float64, on ``volume.device``).
    Raises:
        InputError: empty ROI, bad parameters, or no edge point found.
    """
    import SimpleITK as sitk

    if budget < 1:
        raise InputError(f"the point budget must be at least 1, got {budget}")
    if sigma_mm < 0 or roi_margin_mm < 0:
        raise InputError("sigma_mm and roi_margin_mm must be non-negative (mm)")
    low_t, high_t = (float(x) for x in canny_thresholds_hu_per_mm)
    if not 0 <= low_t <= high_t:
        raise InputError(f"Canny thresholds must satisfy 0 <= lower <= upper, got {canny_thresholds_hu_per_mm}")
    if not torch.isfinite(volume.data).all():
        raise InputError("the CT contains NaN or infinite values")

    # --- ROI mask (dilated) and crop
    if roi is None:
        mask = torch.ones(volume.shape, dtype=torch.bool)
    else:
        mask = roi.mask_on(volume, margin_mm=roi_margin_mm).cpu()
    spacing = volume.spacing.cpu().numpy()  # (i, j, k)
    m = volume.ijk_to_world[:3, :3].cpu().numpy()
    minv = np.linalg.inv(m)
    sig_vox = np.maximum(sigma_mm / spacing, 0.5)  # (i, j, k)
    pad = int(np.ceil(3 * sig_vox.max())) + 2
    nz = torch.nonzero(mask)
    lo = (nz.min(0).values - pad).clamp_min(0).tolist()
    hi = (nz.max(0).values + pad + 1).tolist()
    hi = [min(h, s) for h, s in zip(hi, volume.shape)]
    sub = volume.data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].detach().cpu().numpy().astype(np.float32)
    msub = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].numpy()
    if min(sub.shape) < 2:
        raise InputError("the region of interest is too thin (less than 2 voxels in one direction) to find edges")

    # --- smoothed CT and its gradient (index space, then world)
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(sub, sigma=sig_vox[::-1], mode="nearest")
    gk, gj, gi = np.gradient(smooth)
    g_idx = np.stack([gi, gj, gk], -1)  # dI/d(i,j,k) per voxel step
    g_world = g_idx @ minv  # dI/dx = (M^-T g_idx) -> rows: g_idx @ M^-1
    gmag = np.linalg.norm(g_world, axis=-1)

    # --- 3D Canny (SimpleITK's thresholds act on per-voxel derivatives: convert, permissively, from HU/mm)
    img = sitk.GetImageFromArray(sub)
    img.SetSpacing([float(s) for s in spacing])
    canny = sitk.CannyEdgeDetectionImageFilter()
    canny.SetVariance([float(max(sigma_mm, 1e-3)) ** 2] * 3)
    smin = float(spacing.min())
    canny.SetLowerThreshold(low_t * smin)
    canny.SetUpperThreshold(high_t * smin)
    edges = sitk.GetArrayFromImage(canny.Execute(img)) > 0
    n_canny = int(edges.sum())
    edges &= msub & (gmag >= max(low_t, 1e-6))
    n_roi = int(edges.sum())
    kk, jj, ii = np.nonzero(edges)
    ijk = np.stack([ii, jj, kk], -1).astype(np.float64)
    g = g_world[kk, jj, ii]
    ghat = g / np.linalg.norm(g, axis=-1, keepdims=True).clip(1e-12)
    # direction of the gradient in index space, scaled to one voxel step
    d_idx = ghat @ minv.T
    d_idx /= np.linalg.norm(d_idx, axis=-1, keepdims=True).clip(1e-12)

    # --- bone restriction: the bright side of the edge must be bone
    bright = np.max(np.stack([_sample(smooth, ijk + a * d_idx) for a in (0.5, 1.0, 1.5)]), 0)
    keep = bright >= bone_threshold_hu
    ijk, d_idx = ijk[keep], d_idx[keep]
    if ijk.shape[0] == 0:
        where = "in the region of interest" if roi is not None else "in the CT"
        if n_canny == 0:
            hint = (f"lower canny_thresholds_hu_per_mm (now {canny_thresholds_hu_per_mm} HU/mm) or sigma_mm "
                    f"(now {sigma_mm} mm)")
        elif n_roi == 0:
            hint = (f"edges exist but none {where}: enlarge the ROI or roi_margin_mm (now {roi_margin_mm} mm), "
                    f"or lower canny_thresholds_hu_per_mm (now {canny_thresholds_hu_per_mm})")
        else:
            hint = (f"{n_roi} edge voxels {where} but none next to bone: lower bone_threshold_hu "
                    f"(now {bone_threshold_hu} HU); is the volume in Hounsfield units?")
        raise InputError(f"no bone surface points found {where}: {hint}")

    # --- sub-voxel refinement along the gradient (peak of the gradient magnitude)
    if subvoxel:
        gm = np.linalg.norm(g_world, axis=-1).astype(np.float32)
        for _ in range(2):
            fm = _sample(gm, ijk - d_idx)
            f0 = _sample(gm, ijk)
            fp = _sample(gm, ijk + d_idx)
            den = fm - 2 * f0 + fp
            off = np.where(den < -1e-9, 0.5 * (fm - fp) / np.where(den < -1e-9, den, -1.0), 0.0)
            off = np.clip(off, -0.5, 0.5)
            ijk = ijk + off[:, None] * d_idx

    # --- gradients at the refined positions (world)
    gw = np.stack([_sample(np.ascontiguousarray(g_world[..., c]), ijk) for c in range(3)], -1)

    # --- to world coordinates of the full volume
    ijk_full = ijk + np.array([lo[2], lo[1], lo[0]], dtype=np.float64)
    pts = torch.from_numpy(ijk_full) @ volume.ijk_to_world[:3, :3].cpu().T + volume.ijk_to_world[:3, 3].cpu()
    grads = torch.from_numpy(gw.astype(np.float64))

    # --- spatially uniform subsampling
    if pts.shape[0] > budget:
        idx = torch.arange(pts.shape[0])
        if pts.shape[0] > 10 * budget:
            idx = _voxel_grid_reduce(pts, 4 * budget, seed)
        idx = idx[farthest_point_sampling(pts[idx], budget, seed)]
        idx = torch.sort(idx)[0]
        pts, grads = pts[idx], grads[idx]
    return SurfacePoints(pts.to(volume.device), grads.to(volume.device))


# ----------------------------------------------------------------------------- contours and normals


def _batched(x: torch.Tensor, b: int) -> torch.Tensor:
    return x.expand(b, *x.shape) if x.ndim == 2 else x


def contour_mask(points: torch.Tensor, gradients: torch.Tensor, source: torch.Tensor, T: torch.Tensor,
                 theta_deg: float = 5.0) -> torch.Tensor:
    """Contour (silhouette) points of the moved CT (docs/design.md §3, update step 2).

    A point is on the contour when its rotated gradient is nearly perpendicular to the viewing ray from the
    source through the moved point: ``|g^ . r^| < sin(theta) = cos(90 deg - theta)``.

    Args:
        points: ``(B, N, 3)`` or ``(N, 3)`` surface points (world mm, unmoved CT).
        gradients: same shape, CT gradients (any scale) at the points.
        source: ``(B, 3)`` X-ray source positions (world mm), e.g. ``Projection.source``.
        T: ``(B, 4, 4)`` current registration transforms (moving the CT).
        theta_deg: angular tolerance (degrees).
    Returns:
        ``(B, N)`` bool. Points with a zero gradient are never contour points.
    """
    if T.ndim == 2:
        T = T[None]
    b = T.shape[0]
    dt = torch.promote_types(points.dtype, torch.float32)
    p = _batched(points, b).to(dt)
    g = _batched(gradients, b).to(dt)
    Td = T.to(device=p.device, dtype=dt)
    pm = transform_points(Td, p)
    gm = rotate_vectors(Td, g)
    ray = pm - source.to(device=p.device, dtype=dt).reshape(-1, 1, 3)
    gn = torch.linalg.norm(gm, dim=-1)
    rn = torch.linalg.norm(ray, dim=-1)
    cos = (gm * ray).sum(-1).abs() / (gn * rn).clamp_min(1e-12)
    return (cos < math.sin(math.radians(theta_deg))) & (gn > 1e-12)


def project_normals(proj: Projection, points: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Unit 2D image directions of the projected gradients (the search direction of the 2D matching).

    The direction is ``J g / |J g|`` with J the ``2x3`` Jacobian of the pinhole projection at the point
    (pixels per mm): the direction in which the projection of the point moves when the point moves along
    its gradient.

    Args:
        proj: the C-arm geometry (batch B).
        points: ``(B, N, 3)`` world points (mm), already moved by the current transform.
        gradients: ``(B, N, 3)`` gradients, already rotated by the current transform.
    Returns:
        ``(B, N, 2)`` unit (du, dv) directions, in the dtype of ``points``; zero where ``J g`` vanishes
        (gradient parallel to the ray).
    """
    dt = points.dtype
    R = proj.R.to(device=points.device, dtype=dt)
    K = proj.K.to(device=points.device, dtype=dt)
    xc = proj.to_camera(points)  # (B, N, 3)
    gc = gradients.to(dt) @ R.transpose(-1, -2)  # gradient in camera coordinates
    z = xc[..., 2:3]
    z = torch.where(z.abs() < 1e-9, torch.full_like(z, 1e-9), z)
    uvw = xc @ K.transpose(-1, -2)
    uv = uvw[..., :2] / z
    # d(uv)/dXc = (K[:2] - uv K[2]) / Z ; K[2] = (0, 0, 1)
    kg = gc @ K[:, :2, :].transpose(-1, -2)  # (B, N, 2) = K[:2] gc
    jg = (kg - uv * gc[..., 2:3]) / z
    n = torch.linalg.norm(jg, dim=-1, keepdim=True)
    return torch.where(n > 1e-12, jg / n.clamp_min(1e-12), torch.zeros_like(jg))
