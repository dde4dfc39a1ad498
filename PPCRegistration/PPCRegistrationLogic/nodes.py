"""MRML nodes <-> PPCRegistrationLib objects: 4x4 matrices, the CT and X-ray volumes, regions of interest.

Imports only ``slicer`` (MRML classes, ``slicer.util`` array helpers), ``vtk``, ``numpy`` and ``torch``: it runs in
the Slicer application and on slicer-core's headless scene (docs/design.md §8).  Nothing here modifies the nodes it
reads.
"""

from __future__ import annotations

import numpy as np
import torch
import vtk

import slicer

from PPCRegistrationLib.volume import Volume


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
    transformNode.SetMatrixTransformToParent(vtkMatrix4x4FromArray(asNumpy(T)))


def asNumpy(x) -> np.ndarray:
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


def setVolumeArray(volumeNode, array3d: np.ndarray) -> None:
    slicer.util.updateVolumeFromArray(volumeNode, np.ascontiguousarray(array3d, dtype=np.float32))


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
