"""What the module draws: poly data of points, segments and the C-arm, the weight colour table, the output
model nodes and their display, and the X-ray / DRR layers of the slice views."""

from __future__ import annotations

import numpy as np
import torch
import vtk

import slicer
from vtk.util import numpy_support

from PPCRegistrationLib.geometry import Projection

#: node attribute: the role of a node the module created (``"transform"``, ``"drr"``, ...), so re-runs reuse it
ATTR_ROLE = "PPCRegistration.Role"
#: point scalar array of the correspondence weights
WEIGHT_ARRAY = "weight"
WEIGHT_COLOR_NODE_NAME = "PPCRegistration weight"

#: DRR pixels below this are outside the rendered window: transparent over the X-ray
DRR_TRANSPARENT_BELOW = 1e-6
#: Slicer's red colour table for the DRR overlay (used when the scene has it: the application's scenes do)
DRR_COLOR_NODE_ID = "vtkMRMLColorTableNodeRed"
#: pixels: line thickness of the contour points and flow vectors in slice views
SLICE_THICKNESS_PX = 3

# ----------------------------------------------------------------------------- poly data helpers


def pointsPolyData(points: np.ndarray, weights: np.ndarray | None) -> vtk.vtkPolyData:
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


def segmentsPolyData(starts: np.ndarray, ends: np.ndarray, weights: np.ndarray | None) -> vtk.vtkPolyData:
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
    append.AddInputData(segmentsPolyData(starts, ends, None))
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


def ensureModelNode(scene, role: str, name: str):
    node = findOutput(scene, role)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLModelNode", name)
        node.SetAttribute(ATTR_ROLE, role)
        node.CreateDefaultDisplayNodes()
    return node


def findOutput(scene, role: str):
    """The output node of this role created earlier in the scene (reused so that re-runs do not pile up)."""
    col = scene.GetNodes()
    for i in range(col.GetNumberOfItems()):
        n = col.GetItemAsObject(i)
        if n is not None and n.GetAttribute(ATTR_ROLE) == role:
            return n
    return None


def styleWeightDisplay(displayNode, colorNode, pointSize: float = 5.0, lineWidth: float = 2.0,
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
