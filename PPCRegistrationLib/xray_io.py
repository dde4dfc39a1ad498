"""Reading and writing X-ray images (SimpleITK underneath) and the C-arm geometry their DICOM tags give.

An X-ray comes back as an :class:`XRayImage`: ``image`` float32 ``(H, W)`` (rows = v, columns = u), and
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

The logarithm is taken only when the DICOM PixelIntensityRelationship (0028,1040) is ``LIN`` (pixel values
linear in the exposure, e.g. raw detector data): the values become ``-log((E + 1) / (max E + 1))`` of the exposure
``E`` (the stored values), line integrals up to an offset.  Otherwise a processed clinical image is
treated as already (roughly) log-scaled; the
registration compares gradients with normalised similarity, so any increasing affine map of the line
integral is acceptable.  RescaleSlope/RescaleIntercept are applied by SimpleITK (GDCM) when reading.

Errors that the user can fix (missing file, corrupt file, wrong dimensionality, NaN voxels, missing spacing)
are raised as :class:`~PPCRegistrationLib.errors.InputError` with a message saying what to do.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError
from .file_checks import (SPACING_SUFFIXES, check_exists, header_spacing_problem, is_dicom_file, parse_floats, positive,
                          sitk_error, sitk_module, suffix, write_sitk)

__all__ = ["XRayGeometry", "XRayImage", "read_xray", "write_xray", "save_png", "projection_from_xray",
           "exposure_to_line_integrals"]

#: the largest side (pixels) of the grid a real X-ray is registered on (:meth:`XRayImage.downsampled`)
REGISTRATION_GRID_PX = 512

_XRAY_WRITE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd", ".png")

# DICOM tags (group|element) read from X-ray files
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
TAG_INTENSITY_RELATIONSHIP = "0028|1040"  # PixelIntensityRelationship: LIN (linear in exposure), LOG, DISP

# metadata keys used to keep the C-arm geometry in NRRD / MHA headers written by write_xray
_META_PREFIX = "ppcreg_"


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
        log_applied: whether :func:`read_xray` took the logarithm (pixel data linear in the exposure).
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
    log_applied: bool = False


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

    def downsampled(self, max_px: int | None = None) -> "XRayImage":
        """The image on a registration grid of at most ``max_px`` pixels per side: averaged over blocks of
        ``f x f`` detector pixels (``f`` the smallest integer that fits; anti-aliased), the pixel spacing ``f``
        times larger, the rows and columns that do not fill a block dropped at the far end (a radiograph of
        1955 x 1841 px at 0.2 mm becomes 488 x 460 px at 0.8 mm).  The same image when it already fits.
        Default ``max_px``: :data:`REGISTRATION_GRID_PX`."""
        max_px = REGISTRATION_GRID_PX if max_px is None else max_px
        if int(max_px) < 8:
            raise InputError(f"the registration grid needs at least 8 pixels per side, got max_px={max_px}")
        f = max(1, -(-max(self.height, self.width) // int(max_px)))
        if f == 1:
            return self
        h, w = (self.height // f) * f, (self.width // f) * f
        img = torch.nn.functional.avg_pool2d(self.image[None, None, :h, :w], f)[0, 0]
        return XRayImage(img, self.pixel_spacing * f, self.geometry, self.path)


def _meta(reader: Any, key: str) -> str | None:
    if reader.HasMetaDataKey(key):
        v = reader.GetMetaData(key).strip().strip("\x00").strip()
        return v or None
    return None


def _meta_float(reader: Any, key: str) -> float | None:
    vals = parse_floats(_meta(reader, key))
    if vals and math.isfinite(vals[0]):
        return vals[0]
    return None


def _spacing_uv(reader: Any, key: str) -> tuple[float, float] | None:
    vals = parse_floats(_meta(reader, key))
    if vals is None or not positive(vals):
        return None
    if len(vals) == 1:
        return (vals[0], vals[0])
    return (vals[1], vals[0])  # DICOM row\column spacing = (v, u)


@functools.lru_cache(maxsize=1)
def _sitk_converts_monochrome1() -> bool:
    """Whether the installed SimpleITK turns MONOCHROME1 pixels into MONOCHROME2 while reading (probed once
    on a tiny uncompressed DICOM written to a temporary directory)."""
    import tempfile

    sitk = sitk_module()
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
    sitk = sitk_module()
    p = check_exists(path, "X-ray image")
    if p.is_dir():
        raise InputError(f"{p} is a directory; pass the X-ray image file itself")
    is_dicom = is_dicom_file(p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
        image = reader.Execute()
    except RuntimeError as exc:
        raise sitk_error(p, exc, "X-ray image") from exc

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
    spacing_note = "" if suffix(p) in SPACING_SUFFIXES else f" ({suffix(p) or 'such'} files never do)"
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
            v = parse_floats(reader.GetMetaData(k)) if k in keys else None
            return v[0] if v and math.isfinite(v[0]) else None

        modality = reader.GetMetaData(_META_PREFIX + "modality").strip() if _META_PREFIX + "modality" in keys else None
        geom = XRayGeometry(modality=modality or None, sdd=mf("sdd"), sid=mf("sid"), primary_deg=mf("primary_deg"),
                            secondary_deg=mf("secondary_deg"))
        if suffix(p) in SPACING_SUFFIXES:  # PNG/JPEG/TIFF...: no trustworthy spacing
            problem = header_spacing_problem(p, 2)
            sp = image.GetSpacing()[:2]
            if problem is None and positive(list(sp)):
                file_spacing = (float(sp[0]), float(sp[1]))
        if file_spacing is not None:
            geom = replace(geom, imager_pixel_spacing=file_spacing)
    stored = arr  # the pixel values as stored (before any inversion)
    if is_dicom and todo:
        arr = arr.max() + arr.min() - arr
    elif is_dicom and inverted:  # SimpleITK inverted MONOCHROME1 as 2^BitsStored - 1 - v
        bits = _meta_float(reader, "0028|0101")
        stored = (2.0 ** (bits if bits else 16) - 1) - arr
    if invert:
        arr = arr.max() + arr.min() - arr
        inverted = not inverted
    geom = replace(geom, inverted=inverted)
    if is_dicom and (_meta(reader, TAG_INTENSITY_RELATIONSHIP) or "").upper() == "LIN":
        # linear in the exposure: the stored values are the exposure (high where little is attenuated; the
        # photometric interpretation only says how to display them); -log makes them line integrals up to an
        # offset, like a DRR
        arr = exposure_to_line_integrals(stored)
        geom = replace(geom, log_applied=True)

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


def exposure_to_line_integrals(exposure: np.ndarray) -> np.ndarray:
    """Pixel values linear in the exposure ``E (H, W)`` (raw detector counts, >= 0) -> ``-log((E + 1) / (max E + 1))``:
    line integrals up to an offset (attenuation-positive, 0 at the brightest pixel), as a DRR.  The intake of a
    DICOM whose PixelIntensityRelationship is ``LIN`` (:func:`read_xray`) and of the physics simulator's linear
    detector images (:mod:`.physics_simulation`).  Negative values (offset noise) count as 0."""
    e = np.clip(np.asarray(exposure, dtype=np.float64), 0, None)
    return -np.log((e + 1.0) / (float(e.max()) + 1.0))


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
    sitk = sitk_module()
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
    suf = suffix(p)
    if suf not in _XRAY_WRITE_SUFFIXES:
        raise InputError(f"cannot write an X-ray as '{p.name}': use .nrrd, .nii.gz, .mha or .png")
    if suf == ".png":
        return save_png(p, xray.image, window)
    sitk = sitk_module()
    img = sitk.GetImageFromArray(np.ascontiguousarray(xray.image.detach().cpu().numpy().astype(np.float32)))
    img.SetSpacing(tuple(float(v) for v in xray.pixel_spacing.tolist()))
    g = xray.geometry
    for name in ("sdd", "sid", "primary_deg", "secondary_deg"):
        v = getattr(g, name)
        if v is not None:
            img.SetMetaData(_META_PREFIX + name, repr(float(v)))
    if g.modality:
        img.SetMetaData(_META_PREFIX + "modality", g.modality)
    return write_sitk(img, p)


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
