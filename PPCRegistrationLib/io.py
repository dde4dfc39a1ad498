"""Reading and writing CT volumes and label maps (SimpleITK underneath); X-ray images are read and written by
:mod:`.xray_io`, whose names this module also offers (``io.read_xray``), so that one module reads every input.

Conventions (docs/design.md §2): a CT comes back as a :class:`~PPCRegistrationLib.volume.Volume`: ``data`` float32
``(K, J, I)`` exactly as SimpleITK's ``GetArrayFromImage`` gives it, ``ijk_to_world`` float64 ``(4, 4)`` built from
the file's origin, spacing and direction.  That is ITK's physical frame, i.e. **LPS** millimetres for every format
(SimpleITK converts NIfTI's RAS to LPS on reading).  Slicer's IJKToRAS differs from it by ``diag(-1, -1, 1)``.

Errors that the user can fix (missing file, corrupt file, wrong dimensionality, NaN voxels, missing spacing)
are raised as :class:`~PPCRegistrationLib.errors.InputError` with a message saying what to do.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .file_checks import check_exists, header_spacing_problem, positive, sitk_error, sitk_module, suffix, write_sitk
from .volume import Volume
from .xray_io import XRayGeometry, XRayImage, projection_from_xray, read_xray, save_png, write_xray

__all__ = [
    "XRayGeometry", "XRayImage", "read_volume", "read_label_map", "write_volume", "read_xray", "write_xray",
    "save_png", "projection_from_xray", "volume_to_sitk", "sitk_to_volume", "resample_isotropic",
]


def _read_dicom_series(directory: Path):
    """The largest DICOM series in ``directory`` (slices sorted along the slice normal by GDCM)."""
    sitk = sitk_module()
    reader = sitk.ImageSeriesReader()
    try:
        ids = reader.GetGDCMSeriesIDs(str(directory))
    except RuntimeError as exc:
        raise InputError(f"cannot scan the DICOM directory {directory}: {exc}") from exc
    if not ids:
        raise InputError(f"no DICOM series found in the directory {directory} "
                         "(pass a directory of .dcm slices, or a NIfTI/NRRD/MHA file)")
    series = [(sid, reader.GetGDCMSeriesFileNames(str(directory), sid)) for sid in ids]
    sid, files = max(series, key=lambda s: len(s[1]))
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise sitk_error(directory, exc, f"DICOM series {sid} in") from exc
    return image, len(files)


def sitk_to_volume(image: Any, source: str = "image") -> Volume:
    """Convert a 3D scalar ``SimpleITK.Image`` to a :class:`Volume` (float32 ``(K, J, I)``, ITK/LPS matrix)."""
    size = image.GetSize()
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{source} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(colour/vector image); a scalar CT is expected")
    if image.GetDimension() == 2 or (image.GetDimension() == 3 and min(size) == 1):
        raise InputError(f"{source} is a 2D image of size {'x'.join(map(str, size))}, but a CT volume is expected "
                         "(for a DICOM series pass the directory that holds all slices)")
    if image.GetDimension() != 3:
        raise InputError(f"{source} has {image.GetDimension()} dimensions (size {size}); a 3D CT is expected")
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    if not positive(list(spacing)):
        raise InputError(f"{source} has zero or invalid voxel spacing {tuple(spacing)}: set the spacing (mm)")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = direction * spacing[None, :]
    m[:3, 3] = origin
    if not np.isfinite(m).all():
        raise InputError(f"{source} has a non-finite origin/direction/spacing")
    sitk = sitk_module()
    arr = sitk.GetArrayFromImage(image)
    data = np.ascontiguousarray(arr, dtype=np.float32)
    if np.isnan(data).any():
        raise InputError(f"{source} contains {int(np.isnan(data).sum())} NaN voxels; fill them (e.g. with -1000 HU) "
                         "before registering")
    return Volume(torch.from_numpy(data), torch.from_numpy(m))


def volume_to_sitk(volume: Volume, pixel_type: Any = None) -> Any:
    """Convert a :class:`Volume` to a ``SimpleITK.Image`` (origin, spacing, direction from ``ijk_to_world``).

    The matrix columns must be orthogonal (no shear), as ITK images cannot represent a sheared grid.
    ``pixel_type``: a numpy dtype for the voxels (default: the tensor's dtype).
    """
    sitk = sitk_module()
    m = volume.ijk_to_world.detach().cpu().double().numpy()
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction = m[:3, :3] / spacing[None, :]
    if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-6:
        raise InputError("the volume's ijk_to_world has non-orthogonal (sheared) axes; it cannot be written "
                         "as an ITK image")
    arr = volume.data.detach().cpu().numpy()
    if pixel_type is not None:
        arr = arr.astype(pixel_type)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(v) for v in m[:3, 3]))
    img.SetDirection(tuple(float(v) for v in direction.reshape(-1)))
    return img


# ============================================================================= volumes


def _read_sitk_volume_image(path: Path, what: str):
    sitk = sitk_module()
    if path.is_dir():
        image, _ = _read_dicom_series(path)
        return image
    problem = header_spacing_problem(path, 3)
    if problem:
        raise InputError(f"{path} has a zero or missing voxel spacing ({problem}); fix the header "
                         f"(e.g. set the spacing in Slicer and save again) before using it as a {what}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise sitk_error(path, exc, what) from exc


def read_volume(path: str | Path) -> Volume:
    """Read a CT volume.

    Args:
        path: a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, a multi-frame DICOM
            file, or a directory holding a DICOM series (the series with the most files is used; GDCM sorts
            the slices along the slice normal by ImagePositionPatient).
    Returns:
        Volume with ``data`` float32 ``(K, J, I)`` (HU after RescaleSlope/Intercept) and ``ijk_to_world``
        float64 ``(4, 4)`` in the ITK physical frame (LPS, mm).
    Raises:
        InputError: missing file, unreadable/corrupt file, a 2D image, NaN voxels, zero/missing spacing.
    """
    p = check_exists(path, "CT volume")
    image = _read_sitk_volume_image(p, "CT volume")
    return sitk_to_volume(image, source=f"the CT {p}")


def read_label_map(path: str | Path, reference: Volume | None = None) -> Volume:
    """Read an integer label map (e.g. TotalSegmentator), optionally resampled onto a reference grid.

    Args:
        path: any format :func:`read_volume` accepts.
        reference: when given and its grid (shape or ``ijk_to_world``) differs from the label map's, the labels
            are resampled nearest-neighbour onto it (voxels outside the label map get 0).  Both must be in the
            same world frame (the reference read with :func:`read_volume`, i.e. LPS).
    Returns:
        Volume with ``data`` int32 ``(K, J, I)`` label ids (0 = background).
    Raises:
        InputError: as :func:`read_volume`, or when the voxels are not integers.
    """
    p = check_exists(path, "label map")
    image = _read_sitk_volume_image(p, "label map")
    vol = sitk_to_volume(image, source=f"the label map {p}")
    data = vol.data
    rounded = torch.round(data)
    if not torch.equal(rounded, data):
        raise InputError(f"the label map {p} has non-integer values (e.g. {float(data[rounded != data][0])}); "
                         "is it a label map or an intensity image?")
    labels = Volume(rounded.to(torch.int32), vol.ijk_to_world)
    if reference is None:
        return labels
    ref_m = reference.ijk_to_world.detach().cpu().double()
    if tuple(reference.shape) == labels.shape and torch.allclose(ref_m, labels.ijk_to_world, atol=1e-4, rtol=0):
        return Volume(labels.data, ref_m.clone())
    return Volume(_resample_nearest(labels, reference.shape, ref_m), ref_m.clone())


def resample_isotropic(volume: Volume, spacing_mm: float, background: float = -1024.0) -> Volume:
    """A CT on isotropic voxels of ``spacing_mm``, as a scanner reconstructing coarser voxels would give it.

    Each axis is first smoothed by a Gaussian of FWHM ``sqrt(spacing_mm^2 - s^2)`` (s: that axis' voxel size; none
    where the voxels are already as coarse), then sampled linearly on the new grid: same origin and direction,
    covering the same extent. Used to train the learned operator on CTs of the resolution of the test CT.

    Args:
        volume: the CT (HU), any grid without shear.
        spacing_mm: the new voxel size (mm, > 0).
        background: HU outside the original grid.
    Returns:
        Volume ``(K', J', I')`` float32 HU with the new ``ijk_to_world``.
    """
    if not (math.isfinite(float(spacing_mm)) and float(spacing_mm) > 0):
        raise InputError(f"the voxel size to resample to must be positive (mm), got {spacing_mm}")
    sitk = sitk_module()
    img = volume_to_sitk(volume, np.float32)
    sp = float(spacing_mm)
    sigmas = [math.sqrt(max(0.0, sp * sp - s * s)) / 2.3548 for s in img.GetSpacing()]
    if max(sigmas) > 0:
        img = sitk.SmoothingRecursiveGaussian(img, [max(s, 1e-6) for s in sigmas])
    size = [max(1, int(round(n * s / sp))) for n, s in zip(img.GetSize(), img.GetSpacing())]
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing([sp] * 3)
    f.SetSize(size)
    f.SetOutputOrigin(img.GetOrigin())
    f.SetOutputDirection(img.GetDirection())
    f.SetInterpolator(sitk.sitkLinear)
    f.SetDefaultPixelValue(float(background))
    return sitk_to_volume(f.Execute(img), source=f"the CT resampled to {sp:g} mm")


def _resample_nearest(labels: Volume, shape: tuple[int, int, int], ref_m: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour resampling of ``labels`` onto the grid ``shape`` / ``ref_m`` (slice by slice)."""
    k_n, j_n, i_n = shape
    m = (labels.world_to_ijk @ ref_m).numpy()  # reference ijk -> label ijk
    src = labels.data.numpy()
    sk, sj, si = src.shape
    out = np.zeros(shape, dtype=np.int32)
    jj, ii = np.meshgrid(np.arange(j_n, dtype=np.float64), np.arange(i_n, dtype=np.float64), indexing="ij")
    base = m[:3, 0, None, None] * ii + m[:3, 1, None, None] * jj + m[:3, 3, None, None]
    for k in range(k_n):
        idx = np.rint(base + m[:3, 2, None, None] * k).astype(np.int64)
        ok = ((idx[0] >= 0) & (idx[0] < si) & (idx[1] >= 0) & (idx[1] < sj) & (idx[2] >= 0) & (idx[2] < sk))
        out[k][ok] = src[idx[2][ok], idx[1][ok], idx[0][ok]]
    return torch.from_numpy(out)


def write_volume(path: str | Path, volume: Volume) -> Path:
    """Write a volume (NIfTI, NRRD, MHA/MHD), keeping its geometry.

    ``ijk_to_world`` is taken as the ITK/LPS frame (as :func:`read_volume` returns it).  Float data is written
    as float32, integer data (label maps) with its integer type.  Returns the path.
    """
    p = Path(path).expanduser()
    if suffix(p) not in (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"):
        raise InputError(f"cannot write a volume as '{p.name}': use .nii.gz, .nrrd or .mha")
    dtype = None if not volume.data.is_floating_point() else np.float32
    img = volume_to_sitk(volume, dtype)
    return write_sitk(img, p)
