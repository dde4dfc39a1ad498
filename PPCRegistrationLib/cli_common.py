"""Shared helpers of the ``ppcreg`` command line (:mod:`PPCRegistrationLib.cli`).

Output (``_say``), exit codes, argparse argument types, the CT / region-of-interest options and their loading,
the LPS/RAS conversions of transform and geometry files, and the surface targets and initial-mTRE range that
several sub-commands share.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable

from .errors import InputError

EXIT_OK = 0
EXIT_ERROR = 2
_FLIP = (-1.0, -1.0, 1.0)  # LPS <-> RAS


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _torch():
    import torch

    return torch


def _transform_to_lps(rec, path: str):
    """A TransformRecord's matrix in LPS (the CT's frame as read from file)."""
    from .formats import transform_in_lps

    return transform_in_lps(rec, path)


def _geometry_to_lps(rec, path: str):
    """A GeometryRecord's projection in LPS (converted when its C-arm record says RAS)."""
    from .formats import projection_in_lps

    return projection_in_lps(rec, path)


def _check_file(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{what} file not found: {p}")
    return str(p)


def _int_at_least(name: str, minimum: int, bound: str) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``; ``bound`` words the limit in the error ("at least 1")."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be {bound}, got {v}")
        return v

    return parse


def _positive_int(name: str) -> Callable[[str], int]:
    return _int_at_least(name, 1, "at least 1")


def _nonneg_int(name: str) -> Callable[[str], int]:
    return _int_at_least(name, 0, "0 or more")


def _nonneg_float(name: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (v >= 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number >= 0, got {text}")
        return v

    return parse


def _add_ct_roi_args(p: argparse.ArgumentParser, *, roi: bool = True, sample_default: str = "T8") -> None:
    g = p.add_argument_group("CT and region of interest")
    g.add_argument("--ct", metavar="CT", help="CT volume (NIfTI, NRRD, MHA, DICOM file or series directory), HU")
    g.add_argument("--sample", action="store_true",
                   help=f"use the sample chest CT (downloaded once, see `ppcreg sample-data`) with its label map; "
                        f"the vertebra defaults to {sample_default}")
    g.add_argument("--cache", metavar="DIR", help="sample data cache (default $PPCREG_CACHE or "
                                                  "~/.cache/ppcregistration)")
    if not roi:
        return
    g.add_argument("--labels", metavar="L", help="label map (TotalSegmentator v2 ids) on any grid, with --vertebra")
    g.add_argument("--vertebra", metavar="V", help="vertebra of the label map to register, e.g. L3, T8")
    g.add_argument("--roi-center", nargs=3, type=float, metavar=("X", "Y", "Z"),
                   help="centre of a box ROI (mm, world frame of the CT file: LPS; see --ras)")
    g.add_argument("--roi-size", nargs=3, type=float, metavar=("SX", "SY", "SZ"), help="size of the box ROI (mm)")
    g.add_argument("--ras", action="store_true", help="--roi-center is given in RAS (as Slicer shows it)")


def _load_ct_and_roi(args, *, sample_default: str = "T8", need_roi_args: bool = True):
    """(ct, roi, description dict) from the --ct/--sample/--labels/--vertebra/--roi-* options."""
    from . import io, roi as roi_mod

    labels_path = getattr(args, "labels", None)
    vertebra = getattr(args, "vertebra", None)
    center = getattr(args, "roi_center", None)
    size = getattr(args, "roi_size", None)
    if args.sample and args.ct:
        raise InputError("give either --ct or --sample, not both")
    if not args.sample and not args.ct:
        raise InputError("no CT given: pass --ct <file> or --sample")
    if args.sample:
        from . import sample_data

        paths = sample_data.fetch(cache_dir=args.cache, progress=True)
        ct_path = str(paths["ct"])
        if need_roi_args and labels_path is None and center is None:
            labels_path = str(paths["labels"])
            vertebra = vertebra or sample_default
    else:
        ct_path = _check_file(args.ct, "CT volume")
    if not need_roi_args:
        return io.read_volume(ct_path), None, {"ct": ct_path}
    if (center is None) != (size is None):
        raise InputError("a box ROI needs both --roi-center X Y Z and --roi-size SX SY SZ (mm)")
    if center is not None and (labels_path or vertebra):
        raise InputError("give either a box ROI (--roi-center/--roi-size) or a label ROI (--labels/--vertebra), "
                         "not both")
    if (labels_path is None) != (vertebra is None):
        raise InputError("a label ROI needs both --labels <label map> and --vertebra <name, e.g. L3>")
    if vertebra is not None:  # check the name before reading any file
        from .sample_data import vertebra_label_id

        vertebra_label_id(vertebra)
    labels_path = _check_file(labels_path, "label map")
    ct = io.read_volume(ct_path)
    desc: dict[str, Any] = {"ct": ct_path}
    if labels_path is not None:
        labels = io.read_label_map(labels_path, reference=ct)
        roi = roi_mod.roi_from_vertebra(labels, vertebra)
        desc.update(labels=labels_path, vertebra=vertebra)
    elif center is not None:
        c = list(center)
        if args.ras:
            c = [c[i] * _FLIP[i] for i in range(3)]
        roi = roi_mod.BoxROI(c, list(size))
        desc.update(roi_center_lps=c, roi_size=list(size))
    else:
        roi = None
        desc["roi"] = "whole CT"
    return ct, roi, desc


def _roi_cli_args(desc: dict) -> list[str]:
    """The command-line options that reproduce an ROI description (for the suggested register command)."""
    if "vertebra" in desc:
        return ["--labels", desc["labels"], "--vertebra", desc["vertebra"]]
    if "roi_center_lps" in desc:
        return ["--roi-center", *map(lambda v: f"{v:g}", desc["roi_center_lps"]),
                "--roi-size", *map(lambda v: f"{v:g}", desc["roi_size"])]
    return []


def _surface(ct, roi):
    """Surface points with the registration's default settings (so they equal the registration targets)."""
    from .registration import registration_surface

    s = registration_surface(ct, roi)
    if len(s) < 6:
        raise InputError(f"only {len(s)} bone surface points in the region of interest: enlarge the region "
                         "(is the CT in Hounsfield units?)")
    return s


def _mtre_range(args) -> tuple[float, float]:
    if getattr(args, "mtre", None) is not None:
        return float(args.mtre), float(args.mtre)
    lo, hi = args.mtre_range
    if not (0 <= lo <= hi) or not math.isfinite(hi):
        raise InputError(f"--mtre-range needs 0 <= LO <= HI (mm), got {lo:g} {hi:g}")
    return float(lo), float(hi)
