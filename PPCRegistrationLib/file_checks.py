"""Shared file plumbing of the readers and writers (:mod:`.io`, :mod:`.xray_io`): the lazy SimpleITK import, file
suffixes, DICOM detection, existence checks, SimpleITK error messages a user can act on, and the raw-header check
that catches a zero or missing voxel spacing which SimpleITK would silently replace by 1 mm."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path
from typing import Any, Sequence

from .errors import InputError

__all__ = ["SPACING_SUFFIXES", "sitk_module", "suffix", "is_dicom_file", "check_exists", "sitk_error", "parse_floats",
           "positive", "header_spacing_problem", "write_sitk"]

#: formats whose header carries a voxel / pixel spacing
SPACING_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def sitk_module():
    import SimpleITK as sitk  # local import keeps `import PPCRegistrationLib` light

    return sitk


def suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_dicom_file(path: Path) -> bool:
    if suffix(path) in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def check_exists(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} file not found: {p}")
    return p


def sitk_error(path: Path, exc: Exception, what: str) -> InputError:
    msg = str(exc).strip().splitlines()
    last = next((line for line in reversed(msg) if line.strip()), "")
    if "Unable to determine ImageIO reader" in str(exc):
        last = "the file is not in a known image format (or is corrupt)"
    elif "Zero-valued spacing" in str(exc):
        last = "the file has a zero voxel spacing"
    return InputError(f"cannot read the {what} {path}: {last.strip()} "
                      f"(supported: NIfTI .nii/.nii.gz, NRRD, MHA/MHD, DICOM; is the file complete?)")


def parse_floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.replace(",", "\\").split("\\") if p.strip()]
    try:
        return [float(p) for p in parts]
    except ValueError:
        return None


def positive(values: Sequence[float] | None) -> bool:
    return values is not None and len(values) > 0 and all(math.isfinite(v) and v > 0 for v in values)


def header_spacing_problem(path: Path, ndim: int) -> str | None:
    """Look at the raw header of NIfTI / NRRD / MetaImage files for a zero or missing spacing.

    SimpleITK silently substitutes 1 mm when a header has no spacing (or, for NIfTI, a zero pixdim), which
    would give a wrong geometry without any warning.  Returns a description of the problem, or None.
    """
    suf = suffix(path)
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
            if not positive(sp):
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
            if len(sp) < min(ndim, len(fields["spacings"].split())) or not positive(sp):
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
            sp = parse_floats(fields[key].replace(" ", "\\"))
            if not positive(sp):
                return f"the MetaImage header's ElementSpacing is '{fields[key]}'"
            return None
    except (OSError, ValueError, struct.error, EOFError):
        return None  # unreadable header: the image reader reports it
    return None


def write_sitk(img: Any, p: Path) -> Path:
    """Write a SimpleITK image (compressed), creating the folder; a write failure becomes an InputError."""
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        sitk_module().WriteImage(img, str(p), True)
    except RuntimeError as exc:
        raise InputError(f"cannot write {p}: {str(exc).strip().splitlines()[-1]}") from exc
    return p
