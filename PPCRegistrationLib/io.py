"""Reading and writing CT volumes, label maps and X-ray images (SimpleITK underneath).

Conventions (docs/design.md §2):

* A CT comes back as a :class:`~PPCRegistrationLib.volume.Volume`: ``data`` float32 ``(K, J, I)`` exactly as
  SimpleITK's ``GetArrayFromImage`` gives it, ``ijk_to_world`` float64 ``(4, 4)`` built from the file's
  origin, spacing and direction.  That is ITK's physical frame, i.e. **LPS** millimetres for every format
  (SimpleITK converts NIfTI's RAS to LPS on reading).  Slicer's IJKToRAS differs from it by ``diag(-1, -1, 1)``.
* An X-ray comes back as an :class:`XRayImage`: ``image`` float32 ``(H, W)`` (rows = v, columns = u), and
  ``pixel_spacing`` ``(2,)`` mm along ``(u, v)`` (note: DICOM's PixelSpacing is stored ``row\\column``, i.e.
  ``(v, u)``; it is swapped here).

**X-ray polarity.**  The library's convention is *attenuation-positive*: bone is bright (high values), like a
DRR line-integral image.  What :func:`read_xray` does:

* DICOM ``PhotometricInterpretation`` MONOCHROME2 (the minimum is displayed black): kept as is.
* DICOM MONOCHROME1 (the minimum is displayed white, i.e. bone has *low* stored values): inverted.  SimpleITK
  (ITK >= 5.x GDCMImageIO) already does this while reading (stored value ``v`` becomes ``2^bits - 1 - v``); a
  one-off probe at the first MONOCHROME1 file checks that the installed SimpleITK does, and otherwise the
  image is inverted here with ``image = max + min - image`` (``min``/``max`` of the image itself).
* DICOM ``PresentationLUTShape`` (2050,0020) ``INVERSE`` toggles that decision once more (it asks the viewer to
  invert the display).
* RGB(A) images (PNG, secondary captures) are converted to grey as the mean of the colour channels.
* PNG, NRRD, NIfTI and MHA have no polarity information: kept as is (they are assumed to show bone bright).
* ``invert=True`` inverts once more (``image = max + min - image``) after all of the above, for sources known
  to be stored the other way.

``XRayGeometry.inverted`` records whether the returned values are inverted relative to the stored pixels.

No logarithm is taken: a processed clinical image is treated as already (roughly) log-scaled; the
registration compares gradients with normalised similarity, so any increasing affine map of the line
integral is acceptable.  RescaleSlope/RescaleIntercept are applied by SimpleITK (GDCM) when reading.

Errors that the user can fix (missing file, corrupt file, wrong dimensionality, NaN voxels, missing spacing)
are raised as :class:`~PPCRegistrationLib.errors.InputError` with a message saying what to do.
"""

from __future__ import annotations

import functools
import gzip
import math
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError
from .volume import Volume

__all__ = [
    "XRayGeometry", "XRayImage", "read_volume", "read_label_map", "write_volume", "read_xray", "write_xray",
    "save_png", "projection_from_xray", "volume_to_sitk", "sitk_to_volume", "resample_isotropic",
]

_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
_SPACING_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")  # formats that carry a spacing
_XRAY_WRITE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd", ".png")

# DICOM tags (SimpleITK metadata keys)
TAG_MODALITY = "0008|0060"
TAG_SDD = "0018|1110"            # DistanceSourceToDetector (mm)
TAG_SID = "0018|1111"            # DistanceSourceToPatient (mm, source to isocentre)
TAG_IMAGER_SPACING = "0018|1164"  # ImagerPixelSpacing (row\column, mm, at the detector)
TAG_PRIMARY = "0018|1510"        # PositionerPrimaryAngle (deg, LAO +, RAO -)
TAG_SECONDARY = "0018|1511"      # PositionerSecondaryAngle (deg, CRA +, CAU -)
TAG_PIXEL_SPACING = "0028|0030"  # PixelSpacing (row\column, mm)
TAG_PHOTOMETRIC = "0028|0004"
TAG_PRESENTATION_LUT = "2050|0020"
TAG_PATIENT_ORIENTATION = "0020|0020"

# metadata keys used to keep the C-arm geometry in NRRD / MHA headers written by write_xray
_META_PREFIX = "ppcreg_"


def _sitk():
    import SimpleITK as sitk  # local import keeps `import PPCRegistrationLib` light

    return sitk


# ============================================================================= helpers


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _is_dicom_file(path: Path) -> bool:
    if _suffix(path) in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def _check_exists(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} file not found: {p}")
    return p


def _sitk_error(path: Path, exc: Exception, what: str) -> InputError:
    msg = str(exc).strip().splitlines()
    last = next((line for line in reversed(msg) if line.strip()), "")
    if "Unable to determine ImageIO reader" in str(exc):
        last = "the file is not in a known image format (or is corrupt)"
    elif "Zero-valued spacing" in str(exc):
        last = "the file has a zero voxel spacing"
    return InputError(f"cannot read the {what} {path}: {last.strip()} "
                      f"(supported: NIfTI .nii/.nii.gz, NRRD, MHA/MHD, DICOM; is the file complete?)")


def _parse_floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.replace(",", "\\").split("\\") if p.strip()]
    try:
        return [float(p) for p in parts]
    except ValueError:
        return None


def _positive(values: Sequence[float] | None) -> bool:
    return values is not None and len(values) > 0 and all(math.isfinite(v) and v > 0 for v in values)


def _header_spacing_problem(path: Path, ndim: int) -> str | None:
    """Look at the raw header of NIfTI / NRRD / MetaImage files for a zero or missing spacing.

    SimpleITK silently substitutes 1 mm when a header has no spacing (or, for NIfTI, a zero pixdim), which
    would give a wrong geometry without any warning.  Returns a description of the problem, or None.
    """
    suf = _suffix(path)
    try:
        if suf in (".nii", ".nii.gz"):
            opener = gzip.open if suf == ".nii.gz" else open
            with opener(path, "rb") as f:
                hdr = f.read(348)
            if len(hdr) < 348:
                return None  # let the reader report the corrupt file
            endian = "<" if struct.unpack("<i", hdr[:4])[0] == 348 else ">"
            dims = struct.unpack(endian + "8h", hdr[40:56])
            pixdim = struct.unpack(endian + "8f", hdr[76:108])
            n = min(max(int(dims[0]), 1), 7, ndim)
            sp = list(pixdim[1:1 + n])
            if not _positive(sp):
                return f"the NIfTI header's pixdim (voxel spacing) is {sp}"
            return None
        if suf in (".nrrd", ".nhdr"):
            with open(path, "rb") as f:
                raw = f.read(65536)
            head = raw.split(b"\n\n", 1)[0].decode("latin-1", "replace").lower()
            fields = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip()
                      for ln in head.splitlines()[1:] if ":" in ln and not ln.startswith("#")}
            if "space directions" in fields:
                return None
            if "spacings" not in fields:
                return "the NRRD header has neither 'spacings' nor 'space directions'"
            sp = [float(v) for v in fields["spacings"].split() if v != "nan"] if fields["spacings"] else []
            if len(sp) < min(ndim, len(fields["spacings"].split())) or not _positive(sp):
                return f"the NRRD header's spacings are '{fields['spacings']}'"
            return None
        if suf in (".mha", ".mhd"):
            with open(path, "rb") as f:
                raw = f.read(65536)
            lines = raw.decode("latin-1", "replace").splitlines()
            fields = {}
            for ln in lines:
                if "=" not in ln:
                    continue
                k, v = ln.split("=", 1)
                fields[k.strip().lower()] = v.strip()
                if k.strip().lower() == "elementdatafile":
                    break
            key = "elementspacing" if "elementspacing" in fields else (
                "elementsize" if "elementsize" in fields else None)
            if key is None:
                return "the MetaImage header has no ElementSpacing"
            sp = _parse_floats(fields[key].replace(" ", "\\"))
            if not _positive(sp):
                return f"the MetaImage header's ElementSpacing is '{fields[key]}'"
            return None
    except (OSError, ValueError, struct.error, EOFError):
        return None  # unreadable header: the image reader reports it
    return None


def _read_dicom_series(directory: Path):
    """The largest DICOM series in ``directory`` (slices sorted along the slice normal by GDCM)."""
    sitk = _sitk()
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
        raise _sitk_error(directory, exc, f"DICOM series {sid} in") from exc
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
    if not _positive(list(spacing)):
        raise InputError(f"{source} has zero or invalid voxel spacing {tuple(spacing)}: set the spacing (mm)")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = direction * spacing[None, :]
    m[:3, 3] = origin
    if not np.isfinite(m).all():
        raise InputError(f"{source} has a non-finite origin/direction/spacing")
    sitk = _sitk()
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
    sitk = _sitk()
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
    sitk = _sitk()
    if path.is_dir():
        image, _ = _read_dicom_series(path)
        return image
    problem = _header_spacing_problem(path, 3)
    if problem:
        raise InputError(f"{path} has a zero or missing voxel spacing ({problem}); fix the header "
                         f"(e.g. set the spacing in Slicer and save again) before using it as a {what}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _sitk_error(path, exc, what) from exc


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
    p = _check_exists(path, "CT volume")
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
    p = _check_exists(path, "label map")
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
    sitk = _sitk()
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


def _write_sitk(img: Any, p: Path) -> Path:
    """Write a SimpleITK image (compressed), creating the folder; a write failure becomes an InputError."""
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        _sitk().WriteImage(img, str(p), True)
    except RuntimeError as exc:
        raise InputError(f"cannot write {p}: {str(exc).strip().splitlines()[-1]}") from exc
    return p


def write_volume(path: str | Path, volume: Volume) -> Path:
    """Write a volume (NIfTI, NRRD, MHA/MHD), keeping its geometry.

    ``ijk_to_world`` is taken as the ITK/LPS frame (as :func:`read_volume` returns it).  Float data is written
    as float32, integer data (label maps) with its integer type.  Returns the path.
    """
    p = Path(path).expanduser()
    if _suffix(p) not in (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"):
        raise InputError(f"cannot write a volume as '{p.name}': use .nii.gz, .nrrd or .mha")
    dtype = None if not volume.data.is_floating_point() else np.float32
    img = volume_to_sitk(volume, dtype)
    return _write_sitk(img, p)


# ============================================================================= X-ray images


@dataclass(frozen=True)
class XRayGeometry:
    """Optional C-arm values that came with an X-ray (DICOM tags, or the header written by :func:`write_xray`).

    Attributes:
        modality: DICOM Modality (0008,0060), e.g. "XA", "RF", "DX", "CR".
        sdd: DistanceSourceToDetector (0018,1110), mm.
        sid: DistanceSourceToPatient (0018,1111), mm: source to isocentre.
        primary_deg: PositionerPrimaryAngle (0018,1510), degrees, LAO positive / RAO negative.
        secondary_deg: PositionerSecondaryAngle (0018,1511), degrees, cranial positive / caudal negative.
        imager_pixel_spacing: ImagerPixelSpacing (0018,1164) as ``(u, v)`` mm (swapped from DICOM's row\\col).
        photometric: PhotometricInterpretation (0028,0004) of the source, e.g. "MONOCHROME1".
        inverted: whether :func:`read_xray` inverted the stored values to make bone bright.
        patient_orientation: PatientOrientation (0020,0020), e.g. "L\\F" (columns towards the patient's left,
            rows towards the feet).
    """

    modality: str | None = None
    sdd: float | None = None
    sid: float | None = None
    primary_deg: float | None = None
    secondary_deg: float | None = None
    imager_pixel_spacing: tuple[float, float] | None = None
    photometric: str | None = None
    inverted: bool = False
    patient_orientation: str | None = None


@dataclass(frozen=True)
class XRayImage:
    """A single X-ray (fluoroscopy / radiograph) image.

    Attributes:
        image: ``(H, W)`` float32 tensor, attenuation-positive (bone bright); rows = v, columns = u.
        pixel_spacing: ``(2,)`` float64 tensor, detector pixel size in mm along ``(u, v)``.
        geometry: optional C-arm values (:class:`XRayGeometry`).
        path: where it was read from, if anywhere.
    """

    image: torch.Tensor
    pixel_spacing: torch.Tensor
    geometry: XRayGeometry = field(default_factory=XRayGeometry)
    path: str | None = None

    def __post_init__(self) -> None:
        img = torch.as_tensor(self.image)
        if img.ndim != 2:
            raise InputError(f"an X-ray image must be 2D (H, W), got shape {tuple(img.shape)}")
        if min(img.shape) < 2:
            raise InputError(f"the X-ray image of shape {tuple(img.shape)} is too small")
        img = img.to(torch.float32)
        if not torch.isfinite(img).all():
            raise InputError("the X-ray image contains NaN or infinite pixels")
        ps = torch.as_tensor(self.pixel_spacing, dtype=torch.float64).reshape(-1)
        if ps.numel() == 1:
            ps = ps.expand(2).clone()
        if ps.numel() != 2 or not torch.isfinite(ps).all() or (ps <= 0).any():
            raise InputError(f"the X-ray pixel spacing must be two positive numbers (mm), got {ps.tolist()}")
        object.__setattr__(self, "image", img)
        object.__setattr__(self, "pixel_spacing", ps)

    @property
    def height(self) -> int:
        """Rows (v)."""
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        """Columns (u)."""
        return int(self.image.shape[1])

    def mirrored_u(self) -> "XRayImage":
        """The image flipped left-right (u -> W-1-u), e.g. to go from radiological display (seen from the
        detector) to the "seen from the source" orientation that :func:`geometry.carm_pose` uses."""
        return XRayImage(torch.flip(self.image, dims=[1]), self.pixel_spacing, self.geometry, self.path)


def _meta(reader: Any, key: str) -> str | None:
    if reader.HasMetaDataKey(key):
        v = reader.GetMetaData(key).strip().strip("\x00").strip()
        return v or None
    return None


def _meta_float(reader: Any, key: str) -> float | None:
    vals = _parse_floats(_meta(reader, key))
    if vals and math.isfinite(vals[0]):
        return vals[0]
    return None


def _spacing_uv(reader: Any, key: str) -> tuple[float, float] | None:
    vals = _parse_floats(_meta(reader, key))
    if vals is None or not _positive(vals):
        return None
    if len(vals) == 1:
        return (vals[0], vals[0])
    return (vals[1], vals[0])  # DICOM row\column spacing = (v, u)


@functools.lru_cache(maxsize=1)
def _sitk_converts_monochrome1() -> bool:
    """Whether the installed SimpleITK turns MONOCHROME1 pixels into MONOCHROME2 while reading (probed once
    on a tiny uncompressed DICOM written to a temporary directory)."""
    import tempfile

    sitk = _sitk()
    ramp = np.array([[0, 100], [200, 300]], dtype=np.uint16)
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "probe.dcm"
        sitk.WriteImage(sitk.GetImageFromArray(ramp), str(f))
        raw = f.read_bytes()
        if raw.count(b"MONOCHROME2") != 1:
            return False
        f.write_bytes(raw.replace(b"MONOCHROME2", b"MONOCHROME1"))
        back = sitk.GetArrayFromImage(sitk.ReadImage(str(f))).reshape(2, 2).astype(np.int64)
    return bool(back[0, 0] > back[1, 1])


def read_xray(path: str | Path, pixel_spacing: float | Sequence[float] | None = None, *, invert: bool = False,
              frame: int | None = None) -> XRayImage:
    """Read a 2D X-ray image.

    Args:
        path: PNG, NRRD, NIfTI, MHA/MHD, or a DICOM file (XA, RF, DX, CR, ...).  A 3D image with a single slice
            ``(H, W, 1)`` is accepted as 2D.
        pixel_spacing: detector pixel size in mm, a number or ``(u, v)``; when given it is used instead of the
            file's.  Required for PNG (which carries no spacing) and for files whose spacing is zero/missing.
            DICOM spacing: ImagerPixelSpacing (0018,1164) if present, else PixelSpacing (0028,0030).
        invert: invert the values once more after the automatic polarity handling (see the module doc).
        frame: for a multi-frame image (an X-ray sequence), the index of the frame to take.
    Returns:
        XRayImage with ``image`` float32 ``(H, W)``, bone bright.
    Raises:
        InputError: missing/corrupt file, a true 3D volume, no usable spacing, unsupported pixel type.
    """
    sitk = _sitk()
    p = _check_exists(path, "X-ray image")
    if p.is_dir():
        raise InputError(f"{p} is a directory; pass the X-ray image file itself")
    is_dicom = _is_dicom_file(p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
        image = reader.Execute()
    except RuntimeError as exc:
        raise _sitk_error(p, exc, "X-ray image") from exc

    # ---- pixels -> (H, W)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:  # colour: channels last; drop alpha, average RGB
        arr = arr[..., : min(ncomp, 3)].mean(-1) if ncomp != 2 else arr[..., 0]
    size = image.GetSize()
    if arr.ndim == 3:
        n = arr.shape[0]
        if frame is not None:
            if not 0 <= frame < n:
                raise InputError(f"frame {frame} requested but {p} has {n} frames (0..{n - 1})")
            arr = arr[frame]
        elif n == 1:
            arr = arr[0]
        else:
            raise InputError(f"expected a 2D X-ray, got a 3D volume of size {'x'.join(map(str, size))} from {p}; "
                             "for a multi-frame X-ray sequence pass frame=<index> to pick one frame")
    elif arr.ndim != 2:
        raise InputError(f"expected a 2D X-ray, got an image of size {size} from {p}")
    if not np.isfinite(arr).all():
        raise InputError(f"the X-ray {p} has NaN or infinite pixels")

    # ---- geometry, spacing and polarity
    file_spacing: tuple[float, float] | None = None
    inverted = todo = False
    spacing_note = "" if _suffix(p) in _SPACING_SUFFIXES else f" ({_suffix(p) or 'such'} files never do)"
    if is_dicom:
        photometric = (_meta(reader, TAG_PHOTOMETRIC) or "").upper() or None
        imager = _spacing_uv(reader, TAG_IMAGER_SPACING)
        file_spacing = imager or _spacing_uv(reader, TAG_PIXEL_SPACING)
        spacing_note = (f" (ImagerPixelSpacing (0018,1164) is {_meta(reader, TAG_IMAGER_SPACING)!r}, "
                        f"PixelSpacing (0028,0030) is {_meta(reader, TAG_PIXEL_SPACING)!r})")
        geom = XRayGeometry(
            modality=_meta(reader, TAG_MODALITY), sdd=_meta_float(reader, TAG_SDD), sid=_meta_float(reader, TAG_SID),
            primary_deg=_meta_float(reader, TAG_PRIMARY), secondary_deg=_meta_float(reader, TAG_SECONDARY),
            imager_pixel_spacing=imager, photometric=photometric,
            patient_orientation=_meta(reader, TAG_PATIENT_ORIENTATION))
        if photometric is not None and not photometric.startswith("MONOCHROME") and ncomp == 1:
            raise InputError(f"the DICOM X-ray {p} has PhotometricInterpretation {photometric}; a grey-scale "
                             "(MONOCHROME1/MONOCHROME2) image is expected")
        inverted = photometric == "MONOCHROME1"  # relative to the stored pixel values
        # what is still to be done here, given what SimpleITK did
        todo = inverted and not _sitk_converts_monochrome1()
        if (_meta(reader, TAG_PRESENTATION_LUT) or "").upper() == "INVERSE":
            inverted, todo = not inverted, not todo
    else:
        keys = set(reader.GetMetaDataKeys())

        def mf(name: str) -> float | None:
            k = _META_PREFIX + name
            v = _parse_floats(reader.GetMetaData(k)) if k in keys else None
            return v[0] if v and math.isfinite(v[0]) else None

        modality = reader.GetMetaData(_META_PREFIX + "modality").strip() if _META_PREFIX + "modality" in keys else None
        geom = XRayGeometry(modality=modality or None, sdd=mf("sdd"), sid=mf("sid"), primary_deg=mf("primary_deg"),
                            secondary_deg=mf("secondary_deg"))
        if _suffix(p) in _SPACING_SUFFIXES:  # PNG/JPEG/TIFF...: no trustworthy spacing
            problem = _header_spacing_problem(p, 2)
            sp = image.GetSpacing()[:2]
            if problem is None and _positive(list(sp)):
                file_spacing = (float(sp[0]), float(sp[1]))
        if file_spacing is not None:
            geom = replace(geom, imager_pixel_spacing=file_spacing)
    if is_dicom and todo:
        arr = arr.max() + arr.min() - arr
    if invert:
        arr = arr.max() + arr.min() - arr
        inverted = not inverted
    geom = replace(geom, inverted=inverted)

    if pixel_spacing is not None:
        try:
            given = np.asarray(pixel_spacing, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise InputError(f"pixel_spacing must be a number or (u, v) in mm, got {pixel_spacing!r}") from exc
        if given.size not in (1, 2):
            raise InputError(f"pixel_spacing must be a number or (u, v) in mm, got {given.size} values")
        ps = (float(given[0]), float(given[-1]))
    elif file_spacing is not None:
        ps = file_spacing
    else:
        raise InputError(f"the X-ray {p} does not say its pixel spacing{spacing_note}: pass it with --pixel-spacing "
                         "<mm> (pixel_spacing=... in Python), the detector pixel size in millimetres")
    return XRayImage(torch.from_numpy(np.ascontiguousarray(arr)), torch.tensor(ps, dtype=torch.float64), geom, str(p))


def _window(arr: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
    else:
        finite = arr[np.isfinite(arr)]
        if finite.size == 0:
            return 0.0, 1.0
        lo, hi = (float(v) for v in np.percentile(finite, [0.5, 99.5]))
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def save_png(path: str | Path, array: torch.Tensor | np.ndarray, window: tuple[float, float] | None = None) -> Path:
    """Save a picture as an 8-bit PNG.

    Args:
        path: output file (.png).
        array: ``(H, W)`` grey image (any values), or ``(H, W, 3)`` / ``(H, W, 4)`` colour: uint8, or floats
            in [0, 1].
        window: ``(lo, hi)`` grey values mapped to 0 and 255 (clipped); default: the 0.5 and 99.5 percentiles.
            Ignored for colour images.
    Returns:
        the path written.
    """
    sitk = _sitk()
    a = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    if a.ndim == 2:
        a = a.astype(np.float64)
        lo, hi = _window(a, window)
        u8 = np.clip(np.nan_to_num((a - lo) / (hi - lo) * 255.0, nan=0.0), 0, 255).round().astype(np.uint8)
        img = sitk.GetImageFromArray(u8)
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        u8 = a if a.dtype == np.uint8 else (np.clip(np.nan_to_num(a.astype(np.float64)), 0, 1) * 255).round().astype(
            np.uint8)
        img = sitk.GetImageFromArray(np.ascontiguousarray(u8), isVector=True)
    else:
        raise InputError(f"save_png needs an (H, W) or (H, W, 3|4) array, got shape {a.shape}")
    sitk.WriteImage(img, str(p))
    return p


def write_xray(path: str | Path, xray: XRayImage, window: tuple[float, float] | None = None) -> Path:
    """Write an X-ray image.

    NRRD / NIfTI / MHA: float32 pixels with the pixel spacing (u, v); NRRD and MHA also keep the C-arm values
    of ``xray.geometry`` (modality, sdd, sid, angles) in ``ppcreg_*`` header fields, which :func:`read_xray`
    reads back.  PNG: an 8-bit windowed picture (see :func:`save_png`), which loses the values and spacing.
    """
    p = Path(path).expanduser()
    suf = _suffix(p)
    if suf not in _XRAY_WRITE_SUFFIXES:
        raise InputError(f"cannot write an X-ray as '{p.name}': use .nrrd, .nii.gz, .mha or .png")
    if suf == ".png":
        return save_png(p, xray.image, window)
    sitk = _sitk()
    img = sitk.GetImageFromArray(np.ascontiguousarray(xray.image.detach().cpu().numpy().astype(np.float32)))
    img.SetSpacing(tuple(float(v) for v in xray.pixel_spacing.tolist()))
    g = xray.geometry
    for name in ("sdd", "sid", "primary_deg", "secondary_deg"):
        v = getattr(g, name)
        if v is not None:
            img.SetMetaData(_META_PREFIX + name, repr(float(v)))
    if g.modality:
        img.SetMetaData(_META_PREFIX + "modality", g.modality)
    return _write_sitk(img, p)


# ============================================================================= C-arm geometry from DICOM


def projection_from_xray(xray: XRayImage, isocenter: torch.Tensor | Sequence[float], frame: str = "LPS", *,
                         sdd: float | None = None, sid: float | None = None, primary_deg: float | None = None,
                         secondary_deg: float | None = None):
    """The C-arm :class:`~PPCRegistrationLib.geometry.Projection` (batch 1) described by an X-ray's DICOM tags.

    Uses :func:`geometry.carm_pose` (PositionerPrimaryAngle = LAO+/RAO-, PositionerSecondaryAngle = CRA+/CAU-,
    source-to-isocentre distance = DistanceSourceToPatient) and :meth:`Projection.from_carm` (SDD =
    DistanceSourceToDetector, the image size, ``xray.pixel_spacing``, principal point at the image centre).
    Keyword arguments override (or supply) the tag values.

    Note: ``carm_pose`` models the image *as seen from the source* (at AP, columns run towards the patient's
    right).  Radiographs are usually displayed as seen from the detector side (PatientOrientation "L\\F" for a
    frontal view); such an image must be flipped with :meth:`XRayImage.mirrored_u` to match this geometry.

    Args:
        xray: the image (its size, spacing and ``geometry``).
        isocenter: ``(3,)`` world point (mm) the beam axis passes through, e.g. the CT centre
            (``volume.center_world()``), in the world frame ``frame``.
        frame: "LPS" (volumes from :func:`read_volume`) or "RAS" (Slicer).
    Raises:
        InputError: naming every missing value and how to provide it.
    """
    from .geometry import Projection, carm_pose

    g = xray.geometry
    values = {
        "sdd": (sdd if sdd is not None else g.sdd, "DistanceSourceToDetector (0018,1110)", "sdd=<mm>"),
        "sid": (sid if sid is not None else g.sid, "DistanceSourceToPatient (0018,1111)", "sid=<mm>"),
        "primary_deg": (primary_deg if primary_deg is not None else g.primary_deg,
                        "PositionerPrimaryAngle (0018,1510)", "primary_deg=<degrees, LAO +>"),
        "secondary_deg": (secondary_deg if secondary_deg is not None else g.secondary_deg,
                          "PositionerSecondaryAngle (0018,1511)", "secondary_deg=<degrees, CRA +>"),
    }
    missing = [f"{tag} (pass {how})" for v, tag, how in values.values() if v is None]
    if missing:
        src = f" {xray.path}" if xray.path else ""
        raise InputError(f"the X-ray{src} lacks the C-arm geometry: missing " + "; ".join(missing)
                         + ". Provide these values, or load a geometry file (ppcreg-geometry JSON) instead")
    s, d, a1, a2 = (float(values[k][0]) for k in ("sdd", "sid", "primary_deg", "secondary_deg"))
    if not d < s:
        raise InputError(f"the source-to-isocentre distance ({d} mm) must be smaller than the source-to-detector "
                         f"distance ({s} mm)")
    iso = torch.as_tensor(isocenter, dtype=torch.float64).reshape(3)
    pose = carm_pose(a1, a2, d, iso, frame)
    return Projection.from_carm(pose, s, xray.height, xray.width, xray.pixel_spacing)
