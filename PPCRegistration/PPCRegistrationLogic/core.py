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

The conversions live in :mod:`.nodes` (nodes <-> library objects), :mod:`.carm` (the C-arm geometry),
:mod:`.display` (what is drawn) and :mod:`.settings` (the module's settings -> the library's); this module
re-exports them, so ``core.<name>`` is the one place the Slicer module, the browser app and the tests use.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import vtk

import slicer

from PPCRegistrationLib.geometry import Projection

# the conversions, re-exported: core.<name> is what the module, the browser app and the tests use
from .carm import (  # noqa: F401
    ATTR_SDD, alignSliceNodeToXray, carmGeometryFromDicomTags, projectionFromCArm, projectionFromXrayNode,
    projectionFromXrayPlane, sliceToRASForXray, xrayIJKToRAS)
from .display import (  # noqa: F401
    ATTR_ROLE, DRR_COLOR_NODE_ID, DRR_TRANSPARENT_BELOW, SLICE_THICKNESS_PX, WEIGHT_ARRAY, WEIGHT_COLOR_NODE_NAME,
    carmPolyData, ensureModelNode, findOutput, pointsPolyData, segmentsPolyData, showXrayInSliceViews,
    styleWeightDisplay, weightColorNode)
from .nodes import (  # noqa: F401
    arrayFromVTKMatrix4x4, asNumpy, ijkToRASArray, nodeToWorldArray, roiFromLabelmapNode, roiFromMarkupsROI,
    roiFromSegment, setIJKToRAS, setTransformMatrix, setVolumeArray, transformToWorldArray, volumeFromNode,
    vtkMatrix4x4FromArray, xrayImageFromNode, xrayShape)
from .settings import (  # noqa: F401
    DEVICES, METHODS, REFINE_ITERATIONS_PER_UPDATE, baseConfig, formatStatus, makeConfig, normalizeMethod,
    resolveDevice, resolveMethod, stateSummary)

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


def _tensor(x, dtype=torch.float64) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", dtype)


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
        self.transformNode = outputTransformNode or findOutput(scene, "transform")
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
        node = findOutput(self.scene, "xray")
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
            self.drrNode = findOutput(scene, "drr")
        if self.drrNode is None:
            self.drrNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", OUTPUT_NAMES["drr"])
            self.drrNode.SetAttribute(ATTR_ROLE, "drr")
            setVolumeArray(self.drrNode, np.zeros((1, self.projection.height, self.projection.width)))
            self.drrNode.CreateDefaultDisplayNodes()
        setIJKToRAS(self.drrNode, xrayIJKToRAS(self.projection))
        self.drrNode.SetAttribute(ATTR_SDD, f"{float(self.projection.sdd[0]):.6g}")

        self.contour2DNode = ensureModelNode(scene, "contour2d", OUTPUT_NAMES["contour2d"])
        self.contour3DNode = ensureModelNode(scene, "contour3d", OUTPUT_NAMES["contour3d"])
        self.flowNode = ensureModelNode(scene, "flow", OUTPUT_NAMES["flow"])
        self.carmNode = ensureModelNode(scene, "carm", OUTPUT_NAMES["carm"])
        if scene.GetNodeByID(DRR_COLOR_NODE_ID) is not None:  # a red DRR: misaligned edges show in colour
            self.drrNode.GetDisplayNode().SetAndObserveColorNodeID(DRR_COLOR_NODE_ID)
        styleWeightDisplay(self.contour2DNode.GetDisplayNode(), colorNode, pointSize=5.0)
        styleWeightDisplay(self.contour3DNode.GetDisplayNode(), colorNode, pointSize=6.0, projection2D=False)
        self.contour3DNode.GetDisplayNode().SetVisibility2D(False)
        styleWeightDisplay(self.flowNode.GetDisplayNode(), colorNode, lineWidth=2.0)
        carmDisplay = self.carmNode.GetDisplayNode()
        carmDisplay.SetScalarVisibility(False)
        carmDisplay.SetColor(0.95, 0.75, 0.2)
        carmDisplay.SetVisibility2D(False)
        # the 3D contour points are in the CT frame: they move with the CT
        self.contour3DNode.SetAndObserveTransformNodeID(self.transformNode.GetID())
        for n in (self.contour2DNode, self.contour3DNode, self.flowNode):
            n.SetAndObservePolyData(pointsPolyData(np.zeros((0, 3)), np.zeros(0)))

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
            setVolumeArray(self.drrNode, d[None])
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
            self.contour3DNode.SetAndObservePolyData(pointsPolyData(p3, w if w is not None else np.ones(len(p3))))
        uv = getattr(state, "uv", None)
        if uv is not None:
            uv_t = _tensor(uv).reshape(-1, 2)
            ww = w if w is not None else np.ones(len(uv_t))
            p2 = self._detectorPoints(uv_t)
            self.contour2DNode.SetAndObservePolyData(pointsPolyData(p2, ww))
            uvm = getattr(state, "uv_matched", None)
            if uvm is not None:
                self.flowNode.SetAndObservePolyData(
                    segmentsPolyData(p2, self._detectorPoints(_tensor(uvm).reshape(-1, 2)), ww))

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
            self.foreignMaskNode = findOutput(self.scene, "foreign")
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
