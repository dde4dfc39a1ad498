"""The CT volume type: voxel values plus the 4x4 index-to-world matrix.

Conventions (docs/design.md §2):

* ``data`` is a tensor of shape ``(K, J, I)`` -- slowest index first, the order SimpleITK's
  ``GetArrayFromImage`` and Slicer's ``arrayFromVolume`` give.  ``I`` is the fastest (column) index.
* ``ijk_to_world`` maps homogeneous voxel indices ``(i, j, k, 1)`` to world millimetres.  The world frame is
  whatever the source says (LPS for files read with SimpleITK, RAS for Slicer's IJKToRAS): the library never
  assumes one.  The matrix is kept in float64; voxel data in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import InputError


@dataclass(frozen=True)
class Volume:
    """A scalar 3D image in world coordinates.

    Attributes:
        data: ``(K, J, I)`` float tensor (HU for a CT, label ids for a label map).
        ijk_to_world: ``(4, 4)`` float64 tensor, voxel index (i, j, k) -> world (mm).
    """

    data: torch.Tensor
    ijk_to_world: torch.Tensor

    def __post_init__(self) -> None:
        if self.data.ndim != 3:
            raise InputError(
                f"a volume needs 3 dimensions (K, J, I), got shape {tuple(self.data.shape)}; "
                "a 2D image cannot be used as a CT")
        if min(self.data.shape) < 2:
            raise InputError(f"a volume needs at least 2 voxels along each axis, got shape {tuple(self.data.shape)}")
        m = torch.as_tensor(self.ijk_to_world, dtype=torch.float64)
        if m.shape != (4, 4):
            raise InputError(f"ijk_to_world must be 4x4, got {tuple(m.shape)}")
        if not torch.isfinite(m).all():
            raise InputError("ijk_to_world contains NaN or infinite values: the volume's spacing/origin is missing")
        det = torch.linalg.det(m[:3, :3])
        if abs(float(det)) < 1e-9:
            raise InputError(
                "ijk_to_world is singular (zero spacing?): set the voxel spacing of the volume before registering")
        object.__setattr__(self, "ijk_to_world", m.to(self.data.device))

    # ------------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(K, J, I)`` voxel counts."""
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> torch.Tensor:
        """``(3,)`` voxel spacing (mm) along i, j, k."""
        return torch.linalg.norm(self.ijk_to_world[:3, :3], dim=0)

    @property
    def world_to_ijk(self) -> torch.Tensor:
        """``(4, 4)`` float64 inverse of :attr:`ijk_to_world`."""
        return torch.linalg.inv(self.ijk_to_world)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def center_world(self) -> torch.Tensor:
        """``(3,)`` float64 world position (mm) of the volume's centre."""
        k, j, i = self.shape
        c = torch.tensor([(i - 1) / 2, (j - 1) / 2, (k - 1) / 2, 1.0], dtype=torch.float64, device=self.device)
        return (self.ijk_to_world @ c)[:3]

    def corners_world(self) -> torch.Tensor:
        """``(8, 3)`` float64 world positions (mm) of the centres of the 8 corner voxels."""
        k, j, i = self.shape
        idx = torch.tensor([[a, b, c, 1.0] for a in (0, i - 1) for b in (0, j - 1) for c in (0, k - 1)],
                           dtype=torch.float64, device=self.device)
        return (idx @ self.ijk_to_world.T)[:, :3]

    # ------------------------------------------------------------------ conversions
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Volume":
        """Copy to ``device`` (the matrix stays float64) and/or cast the voxel data to ``dtype``."""
        return Volume(self.data.to(device=device, dtype=dtype), self.ijk_to_world.to(device=device))

    def with_data(self, data: torch.Tensor) -> "Volume":
        """Same geometry, other voxel values (``data`` must have the same shape)."""
        if tuple(data.shape) != self.shape:
            raise InputError(f"new data has shape {tuple(data.shape)}, the volume has {self.shape}")
        return replace(self, data=data)

    def crop(self, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> "Volume":
        """Sub-volume of voxel indices ``lo <= (i, j, k) < hi`` with the matching ``ijk_to_world``."""
        (i0, j0, k0), (i1, j1, k1) = lo, hi
        if not (0 <= i0 < i1 <= self.shape[2] and 0 <= j0 < j1 <= self.shape[1] and 0 <= k0 < k1 <= self.shape[0]):
            raise InputError(f"crop box {lo}..{hi} is empty or outside the volume of shape (I,J,K)="
                             f"{self.shape[::-1]}")
        shift = torch.eye(4, dtype=torch.float64, device=self.device)
        shift[:3, 3] = torch.tensor([i0, j0, k0], dtype=torch.float64)
        return Volume(self.data[k0:k1, j0:j1, i0:i1], self.ijk_to_world @ shift)

    def world_to_index(self, points: torch.Tensor) -> torch.Tensor:
        """Continuous voxel indices ``(..., 3)`` (i, j, k) of world points ``(..., 3)`` (mm)."""
        m = self.world_to_ijk.to(points.dtype)
        return points @ m[:3, :3].T + m[:3, 3]

    def index_to_world(self, ijk: torch.Tensor) -> torch.Tensor:
        """World points ``(..., 3)`` (mm) of continuous voxel indices ``(..., 3)`` (i, j, k)."""
        m = self.ijk_to_world.to(ijk.dtype)
        return ijk @ m[:3, :3].T + m[:3, 3]


def hu_to_mu(hu: torch.Tensor, mu_water: float = 0.02, bone_boost: float = 1.0,
             bone_threshold: float = 300.0) -> torch.Tensor:
    """Linear attenuation (1/mm) from Hounsfield units.

    ``mu = mu_water * (1 + HU / 1000)``, clamped at 0 (air and padding such as -2048 give 0).  Above
    ``bone_threshold`` HU the excess can be scaled by ``bone_boost`` (1 = physical).  ``mu_water`` 0.02 /mm is
    water at about 70 keV.

    Args:
        hu: any shape, Hounsfield units.
    Returns:
        same shape, attenuation in 1/mm.
    """
    mu = mu_water * (1.0 + hu / 1000.0)
    if bone_boost != 1.0:
        excess = torch.clamp(hu - bone_threshold, min=0.0) / 1000.0 * mu_water
        mu = mu + (bone_boost - 1.0) * excess
    return torch.clamp(mu, min=0.0)
