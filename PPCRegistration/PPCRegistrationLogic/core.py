"""Qt-free logic of the PPCRegistration module: MRML nodes <-> PPCRegistrationLib objects, and the
registration session (step / run / stop / reset) that writes its results into output nodes.

This file imports only ``slicer`` (MRML classes and ``slicer.util`` array helpers), ``vtk``, ``numpy`` and
``torch``, so it runs unchanged inside the Slicer application and on a headless ``vtkMRMLScene`` from the
``slicer-core`` package (docs/design.md §8).  It never modifies its input nodes; it creates (or reuses) output
nodes, and puts the CT under the registration transform node.

Conventions (docs/design.md §2): world = RAS (Slicer's frame).  The CT is passed to the library with its
IJKToRAS matrix; the registration transform T moves the CT (x' = T x), exactly what a Slicer linear
transform node does to its children.  The X-ray is a single-slice scalar volume whose IJKToRAS places its
pixel (i, j) = detector pixel (u, v) = (column, row) on the detector plane, at depth SDD from the source.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import torch
import vtk

import slicer
from vtk.util import numpy_support

from PPCRegistrationLib.geometry import Projection, carm_pose
from PPCRegistrationLib.methods import CHAINED_METHODS, LEARNED_METHODS, METHOD_LABELS  # noqa: F401
from PPCRegistrationLib.volume import Volume

# Methods offered by the module: library name -> label shown to the user (PPCRegistrationLib.methods; the
# learned ones load Resources/Models/<learned>.pt unless a model file is given).
METHODS = dict(METHOD_LABELS)
DEVICES = ("auto", "cpu", "cuda")

# Node attributes written on the nodes the module creates.
ATTR_SDD = "PPCRegistration.SourceToDetectorDistance"
ATTR_ROLE = "PPCRegistration.Role"
WEIGHT_ARRAY = "weight"
WEIGHT_COLOR_NODE_NAME = "PPCRegistration weight"

# Output node names (the role attribute identifies them, the names are for the user).
OUTPUT_NAMES = {
    "transform": "PPC registration",
    "drr": "PPC DRR",
    "contour2d": "PPC contour points (X-ray)",
    "contour3d": "PPC contour points (CT)",
    "flow": "PPC flow vectors",
    "carm": "PPC C-arm geometry",
    "xray": "PPC X-ray (detector)",
    "foreign": "PPC foreign objects (X-ray)",
}

# Contour points and flow vectors are drawn this far in front of the detector (towards the source), so that
# they are not hidden by the X-ray drawn on the detector plane in the 3D view.
OVERLAY_OFFSET_MM = 1.0


# ----------------------------------------------------------------------------- matrices


def arrayFromVTKMatrix4x4(m: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtkMatrix4x4FromArray(a) -> vtk.vtkMatrix4x4:
    a = np.asarray(a, dtype=np.float64)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def ijkToRASArray(volumeNode) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return arrayFromVTKMatrix4x4(m)


def setIJKToRAS(volumeNode, a) -> None:
    volumeNode.SetIJKToRASMatrix(vtkMatrix4x4FromArray(a))


def nodeToWorldArray(node) -> np.ndarray:
    """4x4 matrix from the node's local frame to world (identity when not transformed).

    Raises ValueError when the node is under a non-linear transform (the registration needs a rigid one).
    """
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise ValueError(f"'{node.GetName()}' is under a non-linear transform: harden or remove it first")
    return transformToWorldArray(parent)


def transformToWorldArray(transformNode) -> np.ndarray:
    """4x4 matrix of a linear transform node (including its parents) to world."""
    if transformNode is None:
        return np.eye(4)
    if not transformNode.IsTransformToWorldLinear():
        raise ValueError(f"transform '{transformNode.GetName()}' is not linear")
    m = vtk.vtkMatrix4x4()
    transformNode.GetMatrixTransformToWorld(m)
    return arrayFromVTKMatrix4x4(m)


def setTransformMatrix(transformNode, T) -> None:
    transformNode.SetMatrixTransformToParent(vtkMatrix4x4FromArray(_np(T)))


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------- volumes


def volumeFromNode(volumeNode, dtype=torch.float32) -> Volume:
    """A library :class:`Volume` (data (K, J, I), ijk_to_world = IJKToRAS) from a scalar volume node.

    The node's parent transform is *not* applied: the volume is in the node's own (local) frame.
    """
    if volumeNode is None or volumeNode.GetImageData() is None:
        raise ValueError("the volume node has no image data")
    arr = slicer.util.arrayFromVolume(volumeNode)
    if arr.ndim != 3:
        raise ValueError(f"'{volumeNode.GetName()}' is not a scalar volume (array shape {arr.shape})")
    data = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).to(dtype)
    return Volume(data, torch.from_numpy(ijkToRASArray(volumeNode)))


def xrayImageFromNode(xrayNode) -> torch.Tensor:
    """The X-ray image ``(H, W)`` float32 (rows = j, columns = i) of a single-slice volume node."""
    if xrayNode is None or xrayNode.GetImageData() is None:
        raise ValueError("the X-ray node has no image data")
    arr = slicer.util.arrayFromVolume(xrayNode)
    if arr.ndim == 4:  # RGB(A) image: use the mean of the colour channels
        arr = arr[..., :3].mean(-1)
    if arr.ndim != 3 or arr.shape[0] != 1:
        raise ValueError(f"the X-ray '{xrayNode.GetName()}' must be a single-slice image, got {arr.shape[0]} "
                         "slices: select one frame (e.g. with the Crop Volume or Sequences module)")
    return torch.from_numpy(np.ascontiguousarray(arr[0], dtype=np.float32))


def xrayShape(xrayNode) -> tuple[int, int]:
    """(height, width) in pixels of the X-ray node."""
    dims = xrayNode.GetImageData().GetDimensions()
    return int(dims[1]), int(dims[0])


def _setVolumeArray(volumeNode, array3d: np.ndarray) -> None:
    slicer.util.updateVolumeFromArray(volumeNode, np.ascontiguousarray(array3d, dtype=np.float32))


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
    attribute (written by :func:`placeXrayOnDetector` and by the module's simulation).
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


# ----------------------------------------------------------------------------- regions of interest


def roiFromMarkupsROI(roiNode, worldToCT=None):
    """A :class:`BoxROI` in the CT's frame from a markups ROI node (world coordinates, possibly rotated)."""
    from PPCRegistrationLib.roi import BoxROI

    worldToCT = np.eye(4) if worldToCT is None else np.asarray(worldToCT, dtype=np.float64)
    c = [0.0, 0.0, 0.0]
    roiNode.GetCenterWorld(c)
    size = [0.0, 0.0, 0.0]
    roiNode.GetSizeWorld(size) if hasattr(roiNode, "GetSizeWorld") else roiNode.GetSize(size)
    o2w = arrayFromVTKMatrix4x4(roiNode.GetObjectToWorldMatrix())[:3, :3]
    axes = o2w / np.linalg.norm(o2w, axis=0, keepdims=True)
    centre = worldToCT[:3, :3] @ np.asarray(c) + worldToCT[:3, 3]
    axes = worldToCT[:3, :3] @ axes
    return BoxROI(torch.tensor(centre), torch.tensor(size, dtype=torch.float64), torch.tensor(axes))


def roiFromLabelmapNode(labelNode, labelIds):
    """A :class:`LabelROI` from a label map volume node (in its own frame) and the label values."""
    from PPCRegistrationLib.roi import LabelROI

    ids = [int(i) for i in (labelIds if isinstance(labelIds, (list, tuple)) else [labelIds])]
    return LabelROI(volumeFromNode(labelNode), ids)


def roiFromSegment(scene, segmentationNode, segmentId: str, referenceVolumeNode):
    """A :class:`LabelROI` from one segment of a segmentation, rasterised on the reference (CT) grid."""
    if not segmentId:
        raise ValueError("select a segment of the segmentation")
    colorIDs = _nodeIDs(scene, "vtkMRMLColorTableNode")
    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__PPCRegistration_tmp_label__")
    try:
        ids = vtk.vtkStringArray()
        ids.InsertNextValue(segmentId)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentationNode, ids, labelNode, referenceVolumeNode)
        if not ok:
            raise ValueError(f"could not rasterise segment '{segmentId}' on the CT grid")
        return roiFromLabelmapNode(labelNode, [1])
    finally:
        if labelNode.GetDisplayNode() is not None:
            scene.RemoveNode(labelNode.GetDisplayNode())
        scene.RemoveNode(labelNode)
        for nodeID in _nodeIDs(scene, "vtkMRMLColorTableNode") - colorIDs:  # the export's colour table
            scene.RemoveNode(scene.GetNodeByID(nodeID))


def _nodeIDs(scene, className: str) -> set:
    col = scene.GetNodesByClass(className)
    return {col.GetItemAsObject(i).GetID() for i in range(col.GetNumberOfItems())}


#: DRR pixels below this are outside the rendered window: transparent over the X-ray
DRR_TRANSPARENT_BELOW = 1e-6
#: Slicer's red colour table for the DRR overlay (used when the scene has it: the application's scenes do)
DRR_COLOR_NODE_ID = "vtkMRMLColorTableNodeRed"
#: pixels: line thickness of the contour points and flow vectors in slice views
SLICE_THICKNESS_PX = 3

# ----------------------------------------------------------------------------- poly data helpers


def _pointsPolyData(points: np.ndarray, weights: np.ndarray | None) -> vtk.vtkPolyData:
    """Vertices (one cell per point) with a 'weight' point scalar array."""
    pd = vtk.vtkPolyData()
    pts = vtk.vtkPoints()
    pts.SetData(numpy_support.numpy_to_vtk(np.ascontiguousarray(points, dtype=np.float64), deep=True))
    pd.SetPoints(pts)
    n = len(points)
    cells = vtk.vtkCellArray()
    conn = np.arange(n, dtype=np.int64)
    offsets = np.arange(n + 1, dtype=np.int64)
    cells.SetData(numpy_support.numpy_to_vtkIdTypeArray(offsets, deep=True),
                  numpy_support.numpy_to_vtkIdTypeArray(conn, deep=True))
    pd.SetVerts(cells)
    if weights is not None:
        _addWeights(pd, weights)
    return pd


def _segmentsPolyData(starts: np.ndarray, ends: np.ndarray, weights: np.ndarray | None) -> vtk.vtkPolyData:
    """Line segments start_i -> end_i (points 2i, 2i+1), with 'weight' on both end points."""
    n = len(starts)
    pts_np = np.empty((2 * n, 3), dtype=np.float64)
    pts_np[0::2], pts_np[1::2] = starts, ends
    pd = vtk.vtkPolyData()
    pts = vtk.vtkPoints()
    pts.SetData(numpy_support.numpy_to_vtk(pts_np, deep=True))
    pd.SetPoints(pts)
    cells = vtk.vtkCellArray()
    cells.SetData(numpy_support.numpy_to_vtkIdTypeArray(np.arange(0, 2 * n + 1, 2, dtype=np.int64), deep=True),
                  numpy_support.numpy_to_vtkIdTypeArray(np.arange(2 * n, dtype=np.int64), deep=True))
    pd.SetLines(cells)
    if weights is not None:
        _addWeights(pd, np.repeat(np.asarray(weights, dtype=np.float64), 2))
    return pd


def _addWeights(pd: vtk.vtkPolyData, weights) -> None:
    w = np.clip(np.nan_to_num(np.asarray(weights, dtype=np.float32).reshape(-1), nan=0.0), 0.0, 1.0)
    arr = numpy_support.numpy_to_vtk(np.ascontiguousarray(w), deep=True)
    arr.SetName(WEIGHT_ARRAY)
    pd.GetPointData().AddArray(arr)
    pd.GetPointData().SetActiveScalars(WEIGHT_ARRAY)


def carmPolyData(projection: Projection, sourceRadiusMM: float = 8.0) -> vtk.vtkPolyData:
    """The C-arm in world coordinates: a sphere at the source, the detector outline, the four edges of the
    beam pyramid and the central ray."""
    p = projection.index(0).to(dtype=torch.float64)
    h, w = p.height, p.width
    corners_uv = torch.tensor([[[-0.5, -0.5], [w - 0.5, -0.5], [w - 0.5, h - 0.5], [-0.5, h - 0.5]]],
                              dtype=torch.float64)
    corners = p.detector_pixel_world(corners_uv)[0].numpy()
    pp = p.detector_pixel_world(p.K[:, :2, 2][:, None, :])[0, 0].numpy()
    src = p.source[0].numpy()
    append = vtk.vtkAppendPolyData()
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*src)
    sphere.SetRadius(sourceRadiusMM)
    sphere.SetThetaResolution(16)
    sphere.SetPhiResolution(12)
    sphere.Update()
    append.AddInputData(sphere.GetOutput())
    starts = np.concatenate([corners, np.repeat(src[None], 4, 0), src[None]])
    ends = np.concatenate([np.roll(corners, -1, 0), corners, pp[None]])
    append.AddInputData(_segmentsPolyData(starts, ends, None))
    append.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(append.GetOutput())
    return out


# ----------------------------------------------------------------------------- display helpers


def weightColorNode(scene):
    """A 256-entry colour table for the correspondence weight, 0 (dark purple) -> 1 (yellow), viridis-like."""
    node = scene.GetFirstNodeByName(WEIGHT_COLOR_NODE_NAME)
    if node is not None and node.IsA("vtkMRMLColorTableNode"):
        return node
    anchors = np.array([[0.267, 0.005, 0.329], [0.230, 0.322, 0.546], [0.128, 0.567, 0.551],
                        [0.369, 0.789, 0.383], [0.993, 0.906, 0.144]])
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", WEIGHT_COLOR_NODE_NAME)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    x = np.linspace(0, 1, len(anchors))
    for i in range(256):
        t = i / 255.0
        rgb = [float(np.interp(t, x, anchors[:, c])) for c in range(3)]
        node.SetColor(i, f"{t:.2f}", *rgb, 1.0)
    node.SetAttribute("Category", "PPCRegistration")
    node.SetHideFromEditors(False)
    return node


def _ensureModelNode(scene, role: str, name: str):
    node = _findOutput(scene, role)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
        node.SetAttribute(ATTR_ROLE, role)
        node.CreateDefaultDisplayNodes()
    return node


def _findOutput(scene, role: str):
    """The output node of this role created earlier in the scene (reused so that re-runs do not pile up)."""
    col = scene.GetNodes()
    for i in range(col.GetNumberOfItems()):
        n = col.GetItemAsObject(i)
        if n is not None and n.GetAttribute(ATTR_ROLE) == role:
            return n
    return None


def _styleWeightDisplay(displayNode, colorNode, pointSize: float = 5.0, lineWidth: float = 2.0,
                        projection2D: bool = True) -> None:
    displayNode.SetScalarVisibility(True)
    displayNode.SetActiveScalarName(WEIGHT_ARRAY)
    displayNode.SetActiveAttributeLocation(vtk.vtkAssignAttribute.POINT_DATA)
    displayNode.SetAndObserveColorNodeID(colorNode.GetID())
    displayNode.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseManualScalarRange)
    displayNode.SetScalarRange(0.0, 1.0)
    displayNode.SetPointSize(pointSize)
    displayNode.SetLineWidth(lineWidth)
    # slice views draw models with the slice intersection thickness (1 px by default), not the point size or
    # line width: thicker, so that the points and vectors can be seen on the X-ray
    displayNode.SetSliceIntersectionThickness(SLICE_THICKNESS_PX)
    displayNode.SetVisibility2D(True)
    if projection2D and hasattr(displayNode, "SetSliceDisplayModeToProjection"):
        displayNode.SetSliceDisplayModeToProjection()


def showXrayInSliceViews(scene, xrayNode, drrNode=None, opacity: float = 0.5, sliceNodes=None) -> None:
    """Put the X-ray as background and the DRR as foreground (with ``opacity``) in the slice views."""
    composites = []
    col = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(col.GetNumberOfItems()):
        cn = col.GetItemAsObject(i)
        if sliceNodes is None or cn.GetLayoutName() in [s.GetLayoutName() for s in sliceNodes]:
            composites.append(cn)
    for cn in composites:
        cn.SetBackgroundVolumeID(xrayNode.GetID() if xrayNode else None)
        cn.SetForegroundVolumeID(drrNode.GetID() if drrNode else None)
        cn.SetForegroundOpacity(float(opacity))


# ----------------------------------------------------------------------------- the registration session


def resolveDevice(device: str) -> str:
    device = (device or "auto").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA was selected but this torch has no CUDA device: choose 'auto' or 'CPU'")
    return device


def normalizeMethod(method: str) -> str:
    """The library's name of a method (``"PPC_Flow"`` -> ``"ppc-flow"``); ValueError for an unknown one."""
    from PPCRegistrationLib.methods import normalize_method

    return normalize_method(method or "classic")


def resolveMethod(method: str = "classic", modelPath: str | None = None, device: str = "auto"):
    """The library :class:`~PPCRegistrationLib.methods.Method`, with the learned operator loaded from
    ``modelPath`` (default: ``Resources/Models/<learned>.pt`` shipped with the module) on ``device``.

    Raises ValueError (unknown method, no CUDA) or ModelFileError (missing or damaged model file; the message
    names the file and how to get one)."""
    from PPCRegistrationLib.methods import resolve_method

    return resolve_method(normalizeMethod(method), model_path=modelPath or None, device=resolveDevice(device))


#: Levenberg-Marquardt iterations of the intensity refinement per timer tick of Run (seven DRRs each), so that the
#: views show its progress and the GUI stays responsive; the iterations per scale are the library's default
REFINE_ITERATIONS_PER_UPDATE = 2


def baseConfig(maxIterations: int = 30, toleranceMM: float = 0.05, device: str = "auto",
               intensityRefinement: bool = True, foreignObjects: bool = True):
    """The library RegistrationConfig of the module's settings (before a method's overrides).
    ``foreignObjects``: the library's foreign-object passes (``foreign.passes``, default one) or none."""
    from PPCRegistrationLib.registration import RegistrationConfig

    default = RegistrationConfig()
    return RegistrationConfig(device=resolveDevice(device)).updated({
        "guards.max_iterations": int(maxIterations), "guards.tolerance_mm": float(toleranceMM),
        "refine.iterations": default.refine.iterations if intensityRefinement else 0,
        "refine.iterations_per_update": REFINE_ITERATIONS_PER_UPDATE,
        "foreign.passes": default.foreign.passes if foreignObjects else 0})


def makeConfig(method: str = "classic", maxIterations: int = 30, toleranceMM: float = 0.05,
               device: str = "auto", modelPath: str | None = None, intensityRefinement: bool = True,
               foreignObjects: bool = True):
    """The library RegistrationConfig of a method (of its learned phase for a chained method).  The model file
    is not part of the settings: see :func:`resolveMethod`."""
    from PPCRegistrationLib.methods import method_config

    return method_config(normalizeMethod(method),
                         baseConfig(maxIterations, toleranceMM, device, intensityRefinement, foreignObjects))


def _tensor(x, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", dtype)


def stateSummary(state) -> dict[str, Any]:
    """A plain dict of an IterationState's scalar fields (for the status line and the logs)."""
    out = {}
    for key in ("iteration", "update_mm", "update_deg", "n_contour", "mean_weight", "seconds", "mtre_mm", "status",
                "operator"):
        v = getattr(state, key, None)
        out[key] = float(v) if isinstance(v, torch.Tensor) else v
    return out


def formatStatus(state) -> str:
    """One line for the status label."""
    s = stateSummary(state)
    parts = [f"iteration {s['iteration']}" + (f" ({s['operator']})" if s.get("operator") else ""),
             f"update {s['update_mm']:.2f} mm / {s['update_deg']:.2f}°" if s["update_mm"] is not None else "",
             f"{s['n_contour']} contour points" if s["n_contour"] is not None else "",
             f"mean weight {s['mean_weight']:.2f}" if s["mean_weight"] is not None else "",
             f"{s['seconds']:.2f} s/update" if s["seconds"] is not None else "",
             f"mTRE {s['mtre_mm']:.2f} mm" if s["mtre_mm"] is not None else "",
             str(s["status"] or "")]
    return " | ".join(p for p in parts if p)


class PPCRegistrationCoreLogic:
    """The module's logic without Qt: builds a library Registration from MRML nodes, steps/runs/stops/resets
    it and writes every result into output nodes of ``scene``.

    Outputs (created on :meth:`setup`, reused by later setups in the same scene):
      * ``transformNode``: linear transform holding T (applied to the CT, and to the 3D contour points);
      * ``drrNode``: the DRR at the estimate of the last update, on the detector plane;
      * ``contour2DNode``: the projected contour points on the detector plane, 'weight' point scalars;
      * ``contour3DNode``: the 3D contour points (CT frame, under the transform), 'weight' point scalars;
      * ``flowNode``: line segments p_i -> p'_i on the detector plane, 'weight' point scalars;
      * ``carmNode``: source, detector outline and beam pyramid;
      * ``xrayDisplayNode``: the X-ray on its detector plane (the input itself when it already lies there);
      * ``foreignMaskNode``: a label map on the detector plane of the X-ray pixels the foreign-object pass found
        unexplained by the CT and inpainted (metal, collimator shadows), created when a pass is made.
    """

    def __init__(self, scene=None) -> None:
        self.scene = scene if scene is not None else slicer.mrmlScene
        self.registration = None
        self.method = None
        self.projection: Projection | None = None
        self.lastState = None
        self.ctNode = None
        self.xrayNode = None
        self.xrayDisplayNode = None
        self.transformNode = None
        self.drrNode = None
        self.contour2DNode = None
        self.contour3DNode = None
        self.flowNode = None
        self.carmNode = None
        self.foreignMaskNode = None
        self._foreignShown: int | None = None
        self.T_init: np.ndarray | None = None
        self._stopRequested = False

    # ------------------------------------------------------------------ setup
    def setup(self, ctNode, xrayNode, projection: Projection | None = None, *, sddMM: float | None = None,
              initialTransformNode=None, roi=None, roiNode=None, labelmapNode=None, labelIds=None,
              segmentationNode=None, segmentId: str | None = None, groundTruthTransformNode=None,
              method: str = "classic", maxIterations: int = 30, toleranceMM: float = 0.05, device: str = "auto",
              modelPath: str | None = None, outputTransformNode=None, intensityRefinement: bool = True,
              foreignObjects: bool = True):
        """Build the registration from nodes and create the output nodes.

        Args:
            ctNode: the CT (scalar volume, HU).  It is put under the output transform.
            xrayNode: the X-ray (single-slice volume).  Never modified.
            projection: the C-arm geometry in world (RAS) coordinates; when None the X-ray must already lie
                on its detector plane and ``sddMM`` (or the node's SDD attribute) gives the source.
                When given and the X-ray does not lie on that detector plane, a copy placed there is created.
            initialTransformNode: T_init (e.g. aligned by hand in the Transforms module); else the CT's
                current parent transform, else identity.
            roi / roiNode / labelmapNode+labelIds / segmentationNode+segmentId: the region of interest.
            groundTruthTransformNode: T_gt, for mTRE reporting (simulation, self-test).
            method: a name of ``METHODS`` (``classic``, ``flow``, ``ppc-flow``, ``ppc-flow-attention`` or a
                chained ``<learned>+classic``); ``_`` is accepted for ``-``.
            modelPath: model file of a learned method (default ``Resources/Models/<learned>.pt``).
            device: ``auto``, ``cpu`` or ``cuda`` (the DRR renderer and the learned operator run there).
            outputTransformNode: the transform to write T into (default: a new "PPC registration").
            intensityRefinement: end the classic updates with the intensity refinement (and its retry from the
                initial transform when the result matches the X-ray worse than the start); see
                ``PPCRegistrationLib.refine``.
            foreignObjects: when a registration would end, look for what the CT does not explain in the X-ray
                (metal, collimator shadows), inpaint it and register again (``PPCRegistrationLib.foreign_detection``;
                the pixels found are shown in ``foreignMaskNode``).
        Returns:
            the library Registration object.
        """
        from PPCRegistrationLib.registration import RegistrationConfig

        if ctNode is None or xrayNode is None:
            raise ValueError("select a CT volume and an X-ray image")
        # the method first: a missing model file is reported before anything is read or created
        methodObj = resolveMethod(method, modelPath, device)
        scene = self.scene
        self.ctNode, self.xrayNode = ctNode, xrayNode
        if projection is None:
            projection = projectionFromXrayNode(xrayNode, sddMM)
            self.xrayDisplayNode = xrayNode
        else:
            self.xrayDisplayNode = self._xrayOnDetector(xrayNode, projection)
        self.projection = projection

        # T_init: explicit node, else where the CT is shown now
        if initialTransformNode is not None:
            T_init = transformToWorldArray(initialTransformNode)
        else:
            T_init = nodeToWorldArray(ctNode)
        self.T_init = T_init
        T_gt = transformToWorldArray(groundTruthTransformNode) if groundTruthTransformNode is not None else None

        # the region of interest, in the CT's own frame
        if roi is None:
            if roiNode is not None:
                roi = roiFromMarkupsROI(roiNode, np.linalg.inv(nodeToWorldArray(ctNode)))
            elif segmentationNode is not None:
                roi = roiFromSegment(scene, segmentationNode, segmentId, ctNode)
            elif labelmapNode is not None:
                if not labelIds:
                    raise ValueError("give the label value(s) of the region of interest")
                roi = roiFromLabelmapNode(labelmapNode, labelIds)

        ct = volumeFromNode(ctNode)
        xray = xrayImageFromNode(xrayNode)
        config = baseConfig(maxIterations, toleranceMM, device, intensityRefinement, foreignObjects)
        self.registration = methodObj.registration(ct, xray, projection, torch.from_numpy(T_init), roi, config,
                                                   T_gt=None if T_gt is None else torch.from_numpy(T_gt))
        self.method = methodObj
        self.lastState = None
        self._stopRequested = False

        # outputs
        self.transformNode = outputTransformNode or _findOutput(scene, "transform")
        if self.transformNode is None:
            self.transformNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", OUTPUT_NAMES["transform"])
            self.transformNode.SetAttribute(ATTR_ROLE, "transform")
        setTransformMatrix(self.transformNode, T_init)
        ctNode.SetAndObserveTransformNodeID(self.transformNode.GetID())
        self._createOutputNodes()
        self._updateCArm()
        return self.registration

    def _xrayOnDetector(self, xrayNode, projection: Projection):
        """The X-ray itself when it lies on the detector plane of ``projection``, else a copy placed there."""
        h, w = xrayShape(xrayNode)
        if (h, w) != (projection.height, projection.width):
            raise ValueError(f"the X-ray has {h}x{w} pixels but the C-arm geometry has "
                             f"{projection.height}x{projection.width}")
        target = xrayIJKToRAS(projection)
        current = nodeToWorldArray(xrayNode) @ ijkToRASArray(xrayNode)
        if np.allclose(current[:3, :2], target[:3, :2], atol=1e-4) and np.allclose(current[:3, 3], target[:3, 3],
                                                                                    atol=1e-3):
            return xrayNode
        node = _findOutput(self.scene, "xray")
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", OUTPUT_NAMES["xray"])
            node.SetAttribute(ATTR_ROLE, "xray")
        image = vtk.vtkImageData()
        image.DeepCopy(xrayNode.GetImageData())
        node.SetAndObserveImageData(image)
        node.SetIJKToRASMatrix(vtkMatrix4x4FromArray(target))
        node.SetAttribute(ATTR_SDD, f"{float(projection.sdd[0]):.6g}")
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        return node

    def _createOutputNodes(self) -> None:
        scene = self.scene
        colorNode = weightColorNode(scene)
        if self.drrNode is None or self.drrNode.GetScene() is not scene:
            self.drrNode = _findOutput(scene, "drr")
        if self.drrNode is None:
            self.drrNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", OUTPUT_NAMES["drr"])
            self.drrNode.SetAttribute(ATTR_ROLE, "drr")
            _setVolumeArray(self.drrNode, np.zeros((1, self.projection.height, self.projection.width)))
            self.drrNode.CreateDefaultDisplayNodes()
        setIJKToRAS(self.drrNode, xrayIJKToRAS(self.projection))
        self.drrNode.SetAttribute(ATTR_SDD, f"{float(self.projection.sdd[0]):.6g}")

        self.contour2DNode = _ensureModelNode(scene, "contour2d", OUTPUT_NAMES["contour2d"])
        self.contour3DNode = _ensureModelNode(scene, "contour3d", OUTPUT_NAMES["contour3d"])
        self.flowNode = _ensureModelNode(scene, "flow", OUTPUT_NAMES["flow"])
        self.carmNode = _ensureModelNode(scene, "carm", OUTPUT_NAMES["carm"])
        if scene.GetNodeByID(DRR_COLOR_NODE_ID) is not None:  # a red DRR: misaligned edges show in colour
            self.drrNode.GetDisplayNode().SetAndObserveColorNodeID(DRR_COLOR_NODE_ID)
        _styleWeightDisplay(self.contour2DNode.GetDisplayNode(), colorNode, pointSize=5.0)
        _styleWeightDisplay(self.contour3DNode.GetDisplayNode(), colorNode, pointSize=6.0, projection2D=False)
        self.contour3DNode.GetDisplayNode().SetVisibility2D(False)
        _styleWeightDisplay(self.flowNode.GetDisplayNode(), colorNode, lineWidth=2.0)
        carmDisplay = self.carmNode.GetDisplayNode()
        carmDisplay.SetScalarVisibility(False)
        carmDisplay.SetColor(0.95, 0.75, 0.2)
        carmDisplay.SetVisibility2D(False)
        # the 3D contour points are in the CT frame: they move with the CT
        self.contour3DNode.SetAndObserveTransformNodeID(self.transformNode.GetID())
        for n in (self.contour2DNode, self.contour3DNode, self.flowNode):
            n.SetAndObservePolyData(_pointsPolyData(np.zeros((0, 3)), np.zeros(0)))

    def _updateCArm(self) -> None:
        self.carmNode.SetAndObservePolyData(carmPolyData(self.projection))

    # ------------------------------------------------------------------ iterate
    def _requireRegistration(self):
        if self.registration is None:
            raise RuntimeError("call setup() first (select the inputs and press Step or Run)")
        return self.registration

    def step(self):
        """One update; writes the outputs; returns the library's IterationState."""
        state = self._requireRegistration().step()
        self.applyState(state)
        return state

    def applyState(self, state) -> None:
        """Show the result of one library update (``registration.step()``, which may run in a worker thread)
        in the output nodes; call it on the thread that owns the scene."""
        self.updateOutputs(state)
        setTransformMatrix(self.transformNode, self.registration.T)  # the library's estimate (reverted on divergence)

    def run(self, callback: Callable[[Any], None] | None = None, shouldStop: Callable[[], bool] | None = None):
        """Iterate until convergence, the iteration limit, or :meth:`stop`; outputs are updated every update."""
        reg = self._requireRegistration()
        self._stopRequested = False

        def onState(state):
            self.updateOutputs(state)
            if callback is not None:
                callback(state)

        def stop() -> bool:
            return self._stopRequested or bool(shouldStop and shouldStop())

        result = reg.run(callback=onState, should_stop=stop)
        setTransformMatrix(self.transformNode, reg.T)  # the library's final estimate (reverted on divergence)
        return result

    def stop(self) -> None:
        """Ask a running :meth:`run` to stop after the current update."""
        self._stopRequested = True
        if self.registration is not None:
            self.registration.stop()

    def reset(self) -> None:
        """Back to the initial transform (the registration restarts from T_init; output nodes are kept)."""
        reg = self._requireRegistration()
        reg.reset()
        self.lastState = None
        self._stopRequested = False
        setTransformMatrix(self.transformNode, self.T_init)
        self._updateForeignMask()

    @property
    def isConverged(self) -> bool:
        return self.lastState is not None and getattr(self.lastState, "status", "running") != "running"

    # ------------------------------------------------------------------ outputs
    def updateOutputs(self, state) -> None:
        """Write one IterationState into the output nodes."""
        self.lastState = state
        proj = self.projection
        setTransformMatrix(self.transformNode, state.T)
        self._updateForeignMask()

        drr = getattr(state, "drr", None)
        if drr is not None:
            d = _tensor(drr, torch.float32).numpy()
            if d.ndim == 3:
                d = d[0]
            _setVolumeArray(self.drrNode, d[None])
            setIJKToRAS(self.drrNode, xrayIJKToRAS(proj))
            disp = self.drrNode.GetDisplayNode()
            if disp is not None:
                # window on the rendered pixels only (the DRR is zero outside the window rendered around the
                # region), and those zeros transparent, so that the X-ray shows around the overlay
                rendered = d[d > 0]
                lo, hi = np.percentile(rendered, [1, 99.5]) if rendered.size else (0.0, 1.0)
                disp.SetAutoWindowLevel(False)
                disp.SetWindowLevelMinMax(float(lo), float(max(hi, lo + 1e-6)))
                disp.SetApplyThreshold(True)
                disp.SetLowerThreshold(DRR_TRANSPARENT_BELOW)
                disp.SetUpperThreshold(float(max(d.max(), 1.0)) * 10.0)

        pts3 = getattr(state, "points_3d", None)
        if pts3 is not None and int(pts3.shape[0]) == 0 and getattr(state, "operator", "") == "refine":
            return  # the intensity refinement has no correspondences: the last PPC update's stay on display
        weights = getattr(state, "weights", None)
        w = None if weights is None else _tensor(weights).reshape(-1).numpy()
        if pts3 is not None:
            p3 = _tensor(pts3).reshape(-1, 3).numpy()
            self.contour3DNode.SetAndObservePolyData(_pointsPolyData(p3, w if w is not None else np.ones(len(p3))))
        uv = getattr(state, "uv", None)
        if uv is not None:
            uv_t = _tensor(uv).reshape(-1, 2)
            ww = w if w is not None else np.ones(len(uv_t))
            p2 = self._detectorPoints(uv_t)
            self.contour2DNode.SetAndObservePolyData(_pointsPolyData(p2, ww))
            uvm = getattr(state, "uv_matched", None)
            if uvm is not None:
                self.flowNode.SetAndObservePolyData(
                    _segmentsPolyData(p2, self._detectorPoints(_tensor(uvm).reshape(-1, 2)), ww))

    def _updateForeignMask(self) -> None:
        """Show the registration's foreign-object mask (when it changed): a label map on the detector plane, created
        on the first pass and emptied on reset."""
        mask = getattr(self.registration, "foreign_mask", None)
        count = None if mask is None else int(mask.sum())
        if count == self._foreignShown or (mask is None and self.foreignMaskNode is None):
            return
        self._foreignShown = count
        proj = self.projection
        if self.foreignMaskNode is None or self.foreignMaskNode.GetScene() is not self.scene:
            self.foreignMaskNode = _findOutput(self.scene, "foreign")
        if self.foreignMaskNode is None:
            self.foreignMaskNode = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", OUTPUT_NAMES["foreign"])
            self.foreignMaskNode.SetAttribute(ATTR_ROLE, "foreign")
        data = (np.zeros((proj.height, proj.width), np.uint8) if mask is None
                else mask.detach().cpu().numpy().astype(np.uint8))
        slicer.util.updateVolumeFromArray(self.foreignMaskNode, np.ascontiguousarray(data[None]))
        setIJKToRAS(self.foreignMaskNode, xrayIJKToRAS(proj))
        if self.foreignMaskNode.GetDisplayNode() is None:
            self.foreignMaskNode.CreateDefaultDisplayNodes()

    def _detectorPoints(self, uv: torch.Tensor) -> np.ndarray:
        """World positions of detector pixels (u, v), moved OVERLAY_OFFSET_MM towards the source."""
        p = self.projection.index(0).to(dtype=torch.float64)
        if uv.shape[0] == 0:
            return np.zeros((0, 3))
        w = p.detector_pixel_world(uv[None].to(p.device))[0]
        beam = p.world_from_camera[0, :3, 2]
        return (w - OVERLAY_OFFSET_MM * beam).cpu().numpy()

    def showResults(self, opacity: float = 0.5, sliceNode=None) -> None:
        """X-ray + DRR overlay in the slice views (all, or the one given, reoriented to the detector plane)."""
        if sliceNode is not None:
            alignSliceNodeToXray(sliceNode, self.projection)
        showXrayInSliceViews(self.scene, self.xrayDisplayNode, self.drrNode, opacity,
                             None if sliceNode is None else [sliceNode])

    def setOverlayOpacity(self, opacity: float) -> None:
        """Opacity of the DRR over the X-ray in the slice views that show this session's X-ray."""
        col = self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        for i in range(col.GetNumberOfItems()):
            cn = col.GetItemAsObject(i)
            if self.drrNode is not None and cn.GetForegroundVolumeID() == self.drrNode.GetID():
                cn.SetForegroundOpacity(float(opacity))

    def outputNodes(self) -> dict[str, Any]:
        """The output nodes by role (``"foreign"`` only once a foreign-object pass has made it)."""
        nodes = {"transform": self.transformNode, "drr": self.drrNode, "contour2d": self.contour2DNode,
                 "contour3d": self.contour3DNode, "flow": self.flowNode, "carm": self.carmNode,
                 "xray": self.xrayDisplayNode}
        if self.foreignMaskNode is not None:
            nodes["foreign"] = self.foreignMaskNode
        return nodes

