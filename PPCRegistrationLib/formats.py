"""JSON files for C-arm geometries, rigid transforms and registration results (described in docs/formats.md).

Every file is a JSON object with ``"format"`` (``"ppcreg-geometry"``, ``"ppcreg-transform"`` or
``"ppcreg-result"``) and ``"version": 1``.  Numbers are written with Python's shortest round-trip
representation, so saving and loading gives back bit-identical float64 values.  Non-finite numbers (allowed
only in result histories and metrics) are written as the strings ``"NaN"``, ``"Infinity"`` and
``"-Infinity"`` so that the files stay standard JSON.

Public API: :func:`save_geometry` / :func:`load_geometry`, :func:`save_transform` / :func:`load_transform`,
:func:`save_result` / :func:`load_result`, and the records they return.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .errors import InputError
from .geometry import Projection

__all__ = [
    "FORMAT_VERSION", "CarmParameters", "GeometryRecord", "TransformRecord", "ResultRecord",
    "save_geometry", "load_geometry", "save_transform", "load_transform", "save_result", "load_result",
    "validate_rigid",
]

FORMAT_VERSION = 1
GEOMETRY_FORMAT = "ppcreg-geometry"
TRANSFORM_FORMAT = "ppcreg-transform"
RESULT_FORMAT = "ppcreg-result"
_FRAMES_NOTE = "the world frame, e.g. 'LPS' (files read with SimpleITK) or 'RAS' (Slicer)"

# tolerances for "rigid": |R^T R - I| and |det R - 1|
RIGID_TOL = 1e-6


# ============================================================================= records


@dataclass(frozen=True)
class CarmParameters:
    """Optional C-arm description of a geometry (how it was made; the matrices are authoritative).

    Attributes:
        sdd: source-to-detector distance (mm).
        sid: source-to-isocentre distance (mm).
        primary_deg: LAO (+) / RAO (-) angle (degrees).
        secondary_deg: cranial (+) / caudal (-) angle (degrees).
        isocenter: ``(3,)`` world point (mm).
        frame: the world frame the angles refer to ("LPS" or "RAS").
    """

    sdd: float | None = None
    sid: float | None = None
    primary_deg: float | None = None
    secondary_deg: float | None = None
    isocenter: tuple[float, float, float] | None = None
    frame: str | None = None


@dataclass(frozen=True)
class GeometryRecord:
    """Contents of a ``ppcreg-geometry`` file: a batch-1 :class:`Projection` plus optional C-arm values."""

    projection: Projection
    carm: CarmParameters | None = None


@dataclass(frozen=True)
class TransformRecord:
    """Contents of a ``ppcreg-transform`` file.

    Attributes:
        matrix: ``(4, 4)`` float64 rigid transform that moves the CT, ``x' = T x``.
        frame: world frame of ``x`` (e.g. "LPS", "RAS").
        units: always "mm".
    """

    matrix: torch.Tensor
    frame: str
    units: str = "mm"


@dataclass
class ResultRecord:
    """Contents of a ``ppcreg-result`` file.

    Attributes:
        final_transform: ``(4, 4)`` float64 rigid transform (mm), the registration result.
        initial_transform: ``(4, 4)`` float64 rigid transform (mm) the registration started from, or None.
        method: name of the update operator / method (e.g. "classic", "ppc-flow-attention").
        frame: world frame of the transforms.
        history: one dict of floats per iteration (e.g. ``{"iteration": 1, "dv_norm": 0.3, "mtre": 4.1}``).
        metrics: summary numbers (e.g. ``{"mtre_initial": 20.1, "mtre_final": 1.2, "seconds": 3.4}``).
        config: the settings used (any JSON value: str, number, bool, None, list, dict; tuples come back as
            lists).
    """

    final_transform: torch.Tensor
    initial_transform: torch.Tensor | None = None
    method: str = ""
    frame: str = "LPS"
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


# ============================================================================= helpers


def _write_json(path: str | Path, obj: dict) -> Path:
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"cannot write {p}: a value is not JSON-serialisable ({exc})") from exc
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files; results are meant to be shared
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def _read_json(path: str | Path, expected_format: str) -> dict:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{expected_format} file not found: {p}")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{p} is not a JSON text file ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"{p} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{p} must contain a JSON object, found {type(obj).__name__}")
    fmt = obj.get("format")
    if fmt is None:
        raise InputError(f"{p} has no \"format\" field: it is not a PPCRegistration file "
                         f"(expected \"format\": \"{expected_format}\")")
    if fmt != expected_format:
        raise InputError(f"{p} is a {fmt!r} file, but a {expected_format!r} file is expected")
    ver = obj.get("version")
    if ver is None:
        raise InputError(f"{p} has no \"version\" field (expected {FORMAT_VERSION})")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver != FORMAT_VERSION:
        hint = " (written by a newer PPCRegistration: update it)" if isinstance(ver, int) and ver > FORMAT_VERSION \
            else ""
        raise InputError(f"{p} has {expected_format} version {ver!r}; this version reads version "
                         f"{FORMAT_VERSION}{hint}")
    return obj


def _need(obj: Mapping, key: str, path: Any, where: str = "") -> Any:
    if key not in obj:
        raise InputError(f"{path} is missing the key {key!r}{where}")
    return obj[key]


def _matrix(value: Any, shape: tuple[int, ...], name: str, path: Any) -> torch.Tensor:
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: {name!r} must be numbers of shape {shape} ({exc})") from exc
    if tuple(t.shape) != shape:
        raise InputError(f"{path}: {name!r} must have shape {shape}, got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError(f"{path}: {name!r} contains non-finite values")
    return t


def _float_or_none(value: Any, name: str, path: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{path}: {name!r} must be a finite number, got {value!r}")
    return float(value)


def _encode_float(v: Any, name: str) -> float | str:
    try:
        f = float(v.item() if isinstance(v, torch.Tensor) else v)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a number, got {v!r}") from exc
    if isinstance(v, bool):
        raise InputError(f"{name} must be a number, got the boolean {v!r}")
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "Infinity" if f > 0 else "-Infinity"
    return f


def _decode_float(v: Any, name: str, path: Any) -> float:
    if isinstance(v, str) and v in ("NaN", "Infinity", "-Infinity"):
        return float(v.replace("Infinity", "inf").replace("NaN", "nan"))
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InputError(f"{path}: {name} must be a number, got {v!r}")
    return float(v)


def _float_dict(d: Any, name: str, path: Any, decode: bool) -> dict[str, float]:
    if not isinstance(d, Mapping):
        raise InputError(f"{path}: {name} must be a dict of numbers, got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        if not isinstance(k, str):
            raise InputError(f"{path}: {name} keys must be strings, got {k!r}")
        out[k] = _decode_float(v, f"{name}[{k!r}]", path) if decode else _encode_float(v, f"{name}[{k!r}]")
    return out


def validate_rigid(matrix: Any, name: str = "transform") -> torch.Tensor:
    """Check that ``matrix`` is a ``(4, 4)`` rigid transform and return it as float64.

    Rigid means: finite, last row exactly ``0 0 0 1``, rotation block orthonormal (``|R^T R - I| < 1e-6``)
    with determinant +1 (no reflection, no scaling).

    Raises:
        InputError: saying which condition fails.
    """
    try:
        t = torch.as_tensor(matrix, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"the {name} is not a numeric 4x4 matrix ({exc})") from exc
    if tuple(t.shape) != (4, 4):
        raise InputError(f"the {name} must be a 4x4 matrix, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InputError(f"the {name} contains NaN or infinite values")
    if not torch.equal(t[3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)):
        raise InputError(f"the {name}'s last row must be 0 0 0 1, got {t[3].tolist()}")
    r = t[:3, :3]
    err = float((r.T @ r - torch.eye(3, dtype=torch.float64)).abs().max())
    if err > RIGID_TOL:
        raise InputError(f"the {name} is not rigid: its rotation part is not orthonormal (|R^T R - I| = {err:.3g}; "
                         "scaling or shear are not allowed)")
    det = float(torch.linalg.det(r))
    if abs(det - 1.0) > RIGID_TOL:
        raise InputError(f"the {name} is not rigid: det(R) = {det:.6g} (a reflection); a rotation needs det = +1")
    return t


def _check_frame(frame: Any, path: Any) -> str:
    if not isinstance(frame, str) or not frame.strip():
        raise InputError(f"{path}: 'frame' must be a non-empty string naming {_FRAMES_NOTE}")
    return frame


# ============================================================================= geometry


def save_geometry(path: str | Path, projection: Projection, carm: CarmParameters | None = None) -> Path:
    """Save one C-arm geometry (``projection.batch`` must be 1; use ``projection.index(i)`` for others).

    Stored: K ``(3, 3)`` (pixels), R ``(3, 3)``, t ``(3,)`` (mm), height, width, pixel_spacing ``(2,)``
    (mm, u then v), and optionally the C-arm parameters.
    """
    if projection.batch != 1:
        raise InputError(f"a geometry file holds one view, the projection has a batch of {projection.batch}: "
                         "save projection.index(i) for each view")
    p = projection.to("cpu", torch.float64)
    obj: dict[str, Any] = {
        "format": GEOMETRY_FORMAT, "version": FORMAT_VERSION,
        "height": int(p.height), "width": int(p.width),
        "K": p.K[0].tolist(), "R": p.R[0].tolist(), "t": p.t[0].tolist(),
        "pixel_spacing": p.pixel_spacing[0].tolist(),
    }
    if carm is not None:
        c: dict[str, Any] = {}
        for k in ("sdd", "sid", "primary_deg", "secondary_deg"):
            v = getattr(carm, k)
            if v is not None:
                c[k] = float(v)
        if carm.isocenter is not None:
            iso = [float(v) for v in torch.as_tensor(carm.isocenter, dtype=torch.float64).reshape(-1).tolist()]
            if len(iso) != 3:
                raise InputError(f"the C-arm isocenter must have 3 coordinates, got {len(iso)}")
            c["isocenter"] = iso
        if carm.frame is not None:
            c["frame"] = carm.frame
        obj["carm"] = c
    return _write_json(path, obj)


def load_geometry(path: str | Path) -> GeometryRecord:
    """Load a ``ppcreg-geometry`` file (see :func:`save_geometry`).

    Raises:
        InputError: missing file, wrong format/version, missing key, invalid values (non-rotation R, K not a
            pinhole intrinsic matrix, non-positive sizes or spacing, C-arm SDD inconsistent with K).
    """
    obj = _read_json(path, GEOMETRY_FORMAT)
    height, width = _need(obj, "height", path), _need(obj, "width", path)
    for n, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2:
            raise InputError(f"{path}: {n!r} must be an integer >= 2 (pixels), got {v!r}")
    K = _matrix(_need(obj, "K", path), (3, 3), "K", path)
    R = _matrix(_need(obj, "R", path), (3, 3), "R", path)
    t = _matrix(_need(obj, "t", path), (3,), "t", path)
    ps = _matrix(_need(obj, "pixel_spacing", path), (2,), "pixel_spacing", path)
    if (ps <= 0).any():
        raise InputError(f"{path}: 'pixel_spacing' must be positive (mm), got {ps.tolist()}")
    if not (K[1, 0] == 0 and K[2, 0] == 0 and K[2, 1] == 0 and K[2, 2] == 1 and K[0, 0] > 0 and K[1, 1] > 0):
        raise InputError(f"{path}: 'K' must be an intrinsic matrix [[fx, s, cx], [0, fy, cy], [0, 0, 1]] with "
                         f"positive focal lengths, got {K.tolist()}")
    validate_rigid(torch.cat([torch.cat([R, t[:, None]], 1), torch.tensor([[0.0, 0, 0, 1]], dtype=torch.float64)]),
                   name=f"camera pose (R, t) in {path}")
    proj = Projection(K[None], R[None], t[None], height, width, ps[None])
    carm = None
    if obj.get("carm") is not None:
        c = obj["carm"]
        if not isinstance(c, Mapping):
            raise InputError(f"{path}: 'carm' must be an object")
        iso = c.get("isocenter")
        if iso is not None:
            iso = tuple(_matrix(iso, (3,), "carm.isocenter", path).tolist())
        frame = c.get("frame")
        if frame is not None:
            _check_frame(frame, path)
        carm = CarmParameters(*(_float_or_none(c.get(k), f"carm.{k}", path)
                                for k in ("sdd", "sid", "primary_deg", "secondary_deg")), iso, frame)
        if carm.sdd is not None:
            sdd_k = float(K[0, 0] * ps[0])
            if abs(sdd_k - carm.sdd) > 1e-6 * max(1.0, carm.sdd):
                raise InputError(f"{path}: carm.sdd = {carm.sdd} mm disagrees with K and pixel_spacing "
                                 f"(K[0][0] * pixel_spacing[0] = {sdd_k} mm)")
    return GeometryRecord(proj, carm)


# ============================================================================= transform


def save_transform(path: str | Path, matrix: torch.Tensor | Sequence, frame: str = "LPS") -> Path:
    """Save a rigid transform ``(4, 4)`` (or ``(1, 4, 4)``) that moves the CT (``x' = T x``, mm, world ``frame``).

    Raises:
        InputError: when the matrix is not rigid (see :func:`validate_rigid`).
    """
    m = torch.as_tensor(matrix, dtype=torch.float64).detach().cpu()
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    m = validate_rigid(m)
    _check_frame(frame, "save_transform")
    return _write_json(path, {"format": TRANSFORM_FORMAT, "version": FORMAT_VERSION, "frame": frame, "units": "mm",
                              "convention": "x_moved = matrix @ x (moves the CT)", "matrix": m.tolist()})


def load_transform(path: str | Path) -> TransformRecord:
    """Load a ``ppcreg-transform`` file.

    Raises:
        InputError: missing file, wrong format/version, missing key, units other than "mm", non-rigid matrix.
    """
    obj = _read_json(path, TRANSFORM_FORMAT)
    m = _matrix(_need(obj, "matrix", path), (4, 4), "matrix", path)
    frame = _check_frame(_need(obj, "frame", path), path)
    units = _need(obj, "units", path)
    if units != "mm":
        raise InputError(f"{path}: units {units!r} are not supported; the translation must be in 'mm'")
    return TransformRecord(validate_rigid(m, name=f"transform in {path}"), frame, units)


# ============================================================================= result


def save_result(path: str | Path, result: ResultRecord) -> Path:
    """Save a registration result (see :class:`ResultRecord`); both transforms must be rigid."""
    final = validate_rigid(_squeeze(result.final_transform), "final transform")
    initial = None if result.initial_transform is None else validate_rigid(_squeeze(result.initial_transform),
                                                                          "initial transform")
    if not isinstance(result.method, str):
        raise InputError(f"the result's method must be a string, got {result.method!r}")
    _check_frame(result.frame, "save_result")
    if not isinstance(result.config, Mapping):
        raise InputError(f"the result's config must be a dict, got {type(result.config).__name__}")
    history = [_float_dict(h, f"history[{i}]", "save_result", decode=False) for i, h in enumerate(result.history)]
    obj = {
        "format": RESULT_FORMAT, "version": FORMAT_VERSION, "method": result.method, "frame": result.frame,
        "units": "mm", "final_transform": final.tolist(),
        "initial_transform": None if initial is None else initial.tolist(),
        "metrics": _float_dict(result.metrics, "metrics", "save_result", decode=False),
        "history": history, "config": dict(result.config),
    }
    return _write_json(path, obj)


def _squeeze(m: Any) -> torch.Tensor:
    t = torch.as_tensor(m, dtype=torch.float64).detach().cpu()
    return t[0] if t.ndim == 3 and t.shape[0] == 1 else t


def load_result(path: str | Path) -> ResultRecord:
    """Load a ``ppcreg-result`` file.

    Raises:
        InputError: missing file, wrong format/version, missing key, non-rigid transform, non-numeric history
            or metrics values.
    """
    obj = _read_json(path, RESULT_FORMAT)
    final = validate_rigid(_matrix(_need(obj, "final_transform", path), (4, 4), "final_transform", path),
                           f"final transform in {path}")
    init_raw = _need(obj, "initial_transform", path)
    initial = None if init_raw is None else validate_rigid(
        _matrix(init_raw, (4, 4), "initial_transform", path), f"initial transform in {path}")
    method = _need(obj, "method", path)
    if not isinstance(method, str):
        raise InputError(f"{path}: 'method' must be a string")
    frame = _check_frame(_need(obj, "frame", path), path)
    if obj.get("units", "mm") != "mm":
        raise InputError(f"{path}: units {obj.get('units')!r} are not supported; use 'mm'")
    hist_raw = _need(obj, "history", path)
    if not isinstance(hist_raw, list):
        raise InputError(f"{path}: 'history' must be a list of objects")
    history = [_float_dict(h, f"history[{i}]", path, decode=True) for i, h in enumerate(hist_raw)]
    metrics = _float_dict(_need(obj, "metrics", path), "metrics", path, decode=True)
    config = _need(obj, "config", path)
    if not isinstance(config, dict):
        raise InputError(f"{path}: 'config' must be an object")
    return ResultRecord(final, initial, method, frame, history, metrics, config)


#: diagonal of the LPS <-> RAS flip (x and y change sign)
_LPS_RAS = (-1.0, -1.0, 1.0)


def transform_in_lps(record: TransformRecord, path: Any = "transform") -> torch.Tensor:
    """The ``(4, 4)`` matrix of a transform record in LPS (the CT's frame as SimpleITK reads it), converted when the
    record says RAS (written from Slicer)."""
    frame = record.frame.strip().upper()
    if frame == "LPS":
        return record.matrix
    if frame == "RAS":
        f = torch.diag(torch.tensor(_LPS_RAS + (1.0,), dtype=torch.float64))
        return f @ record.matrix @ f
    raise InputError(f"{path}: transform frame {record.frame!r} is not supported; use 'LPS' or 'RAS'")


def projection_in_lps(record: GeometryRecord, path: Any = "geometry") -> Projection:
    """The C-arm of a geometry record in LPS, converted when its C-arm parameters say RAS."""
    frame = (record.carm.frame if record.carm is not None and record.carm.frame else "LPS").strip().upper()
    if frame == "LPS":
        return record.projection
    if frame == "RAS":
        f3 = torch.diag(torch.tensor(_LPS_RAS, dtype=torch.float64))
        return replace(record.projection, R=record.projection.R @ f3)
    raise InputError(f"{path}: geometry frame {record.carm.frame!r} is not supported; use 'LPS' or 'RAS'")
