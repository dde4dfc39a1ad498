"""The C-arm geometry in Slicer's world (RAS): an X-ray volume node on its detector plane <-> the library's
:class:`~PPCRegistrationLib.geometry.Projection`, C-arm angles, slice views facing the detector and DICOM C-arm
tags (docs/design.md §2)."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

from PPCRegistrationLib.geometry import Projection, carm_pose

from .nodes import ijkToRASArray, nodeToWorldArray, vtkMatrix4x4FromArray, xrayShape

#: node attribute: the source-to-detector distance (mm) of an X-ray (or DRR) node on its detector plane
ATTR_SDD = "PPCRegistration.SourceToDetectorDistance"


# ----------------------------------------------------------------------------- X-ray plane <-> projection


def xrayIJKToRAS(projection: Projection, sliceThicknessMM: float = 1.0) -> np.ndarray:
    """IJKToRAS of an X-ray image lying on the detector plane of ``projection`` (batch 1).

    Voxel (i, j, 0) = detector pixel (u, v) = (i, j) at depth SDD; the k axis points along the beam (away
    from the source) with length ``sliceThicknessMM``.
    """
    p = projection.index(0).to(dtype=torch.float64)
    uv = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64, device=p.device)
    w = p.detector_pixel_world(uv)[0].cpu().numpy()
    origin, du, dv = w[0], w[1] - w[0], w[2] - w[0]
    beam = p.world_from_camera[0, :3, 2].cpu().numpy()
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = du, dv, beam * sliceThicknessMM, origin
    return m


def projectionFromXrayPlane(ijkToRAS, height: int, width: int, sddMM: float,
                            principalPoint: tuple[float, float] | None = None) -> Projection:
    """The C-arm :class:`Projection` (batch 1) of an X-ray whose IJKToRAS places it on the detector plane.

    Inverse of :func:`xrayIJKToRAS`: the source lies at distance ``sddMM`` from the principal point
    (default: the detector centre) along the detector normal ``i x j``.
    """
    if not sddMM or sddMM <= 0:
        raise ValueError("the source-to-detector distance must be positive (mm)")
    m = np.asarray(ijkToRAS, dtype=np.float64)
    du, dv = m[:3, 0], m[:3, 1]
    su, sv = float(np.linalg.norm(du)), float(np.linalg.norm(dv))
    if su <= 0 or sv <= 0:
        raise ValueError("the X-ray has zero pixel spacing")
    x = du / su
    y = dv - np.dot(dv, x) * x
    if np.linalg.norm(y) < 1e-6 * sv:
        raise ValueError("the X-ray's row and column directions are parallel")
    y = y / np.linalg.norm(y)
    z = np.cross(x, y)
    if principalPoint is None:
        principalPoint = ((width - 1) / 2.0, (height - 1) / 2.0)
    pp = m[:3, 3] + principalPoint[0] * du + principalPoint[1] * dv
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2] = x, y, z
    pose[:3, 3] = pp - sddMM * z
    return Projection.from_carm(torch.from_numpy(pose)[None], float(sddMM), int(height), int(width),
                                (su, sv), principal_point=principalPoint)


def projectionFromXrayNode(xrayNode, sddMM: float | None = None) -> Projection:
    """Projection of an X-ray node that already lies on its detector plane.

    The SDD is ``sddMM`` or, when not given, the node's ``PPCRegistration.SourceToDetectorDistance``
    attribute (:data:`ATTR_SDD`, written on the nodes the module puts on the detector: the session's X-ray and DRR
    (``core.PPCRegistrationCoreLogic``), the simulated scenario and the workflow's cases).
    """
    if sddMM is None:
        attr = xrayNode.GetAttribute(ATTR_SDD)
        if not attr:
            raise ValueError(f"the source-to-detector distance of '{xrayNode.GetName()}' is unknown: enter it in "
                             "the C-arm geometry section")
        sddMM = float(attr)
    h, w = xrayShape(xrayNode)
    ijk = nodeToWorldArray(xrayNode) @ ijkToRASArray(xrayNode)
    return projectionFromXrayPlane(ijk, h, w, float(sddMM))


def projectionFromCArm(primaryDeg: float, secondaryDeg: float, sddMM: float, sidMM: float, isocenterRAS,
                       height: int, width: int, pixelSpacingMM: float | tuple[float, float]) -> Projection:
    """Projection from C-arm angles (LAO+/RAO-, CRA+/CAU-), distances and detector size, world = RAS."""
    pose = carm_pose(primaryDeg, secondaryDeg, sidMM, torch.as_tensor(np.asarray(isocenterRAS, dtype=np.float64)),
                     frame="RAS")
    return Projection.from_carm(pose, float(sddMM), int(height), int(width), pixelSpacingMM)


def sliceToRASForXray(projection: Projection) -> np.ndarray:
    """SliceToRAS that shows the X-ray plane as the image is stored: u to the right, v (rows) downwards.

    The slice normal points towards the source, so the view looks at the detector from the source side.
    """
    m = xrayIJKToRAS(projection)
    h, w = projection.height, projection.width
    x = m[:3, 0] / np.linalg.norm(m[:3, 0])
    y = -m[:3, 1] / np.linalg.norm(m[:3, 1])
    z = np.cross(x, y)
    centre = m[:3, 3] + (w - 1) / 2.0 * m[:3, 0] + (h - 1) / 2.0 * m[:3, 1]
    out = np.eye(4)
    out[:3, 0], out[:3, 1], out[:3, 2], out[:3, 3] = x, y, z, centre
    return out


def alignSliceNodeToXray(sliceNode, projection: Projection) -> None:
    """Reorient a slice view onto the detector plane and fit its field of view to the detector."""
    sliceNode.GetSliceToRAS().DeepCopy(vtkMatrix4x4FromArray(sliceToRASForXray(projection)))
    sliceNode.UpdateMatrices()
    ps = projection.pixel_spacing[0].cpu().numpy()
    fovW, fovH = projection.width * float(ps[0]), projection.height * float(ps[1])
    dims = sliceNode.GetDimensions()
    aspect = dims[1] / dims[0] if dims[0] > 0 else 1.0
    if fovH / max(fovW, 1e-6) > aspect:
        fovW = fovH / aspect
    else:
        fovH = fovW * aspect
    sliceNode.SetFieldOfView(fovW * 1.02, fovH * 1.02, 1.0)


def carmGeometryFromDicomTags(getTag: Callable[[str], str]) -> dict[str, float]:
    """C-arm geometry from an X-ray's DICOM tags; ``getTag('0018,1110')`` returns the tag's string ('' if
    absent), e.g. ``lambda t: slicer.dicomDatabase.fileValue(path, t)``.  Only the tags present are returned.

    Keys: sdd (0018,1110), sid (0018,1111), pixelSpacing (0018,1164 ImagerPixelSpacing, first value),
    primary (0018,1510), secondary (0018,1511).
    """
    out: dict[str, float] = {}
    tags = {"sdd": "0018,1110", "sid": "0018,1111", "pixelSpacing": "0018,1164",
            "primary": "0018,1510", "secondary": "0018,1511"}
    for key, tag in tags.items():
        try:
            value = getTag(tag)
        except Exception:  # noqa: BLE001 - a missing database or file just means "not available"
            value = ""
        if value:
            try:
                out[key] = float(str(value).split("\\")[0])
            except ValueError:
                logging.warning(f"PPCRegistration: cannot read DICOM tag {tag} = {value!r}")
    return out
