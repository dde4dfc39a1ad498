"""The simulated registration scenario shared by the module's self-test (inside Slicer, on the sample data)
and the pytest suite (``Testing/test_slicer_logic.py``, on slicer-core's headless MRML scene).

1. :func:`buildScenario` loads a CT (and its label map) into the scene, chooses a C-arm view of the target
   vertebra, simulates an X-ray of the CT moved by a known ``T_gt`` and adds it as a single-slice volume lying
   on the detector plane, plus the ground-truth and initial transforms (initial mTRE ``initialMTREMM``).
2. :func:`runScenario` runs the module's logic on those nodes and measures the final mTRE.
3. :func:`checkOutputs` lists what is wrong with the output nodes (empty = all good).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from . import core


@dataclasses.dataclass
class Scenario:
    ctNode: Any
    labelNode: Any
    xrayNode: Any
    groundTruthTransformNode: Any
    initialTransformNode: Any
    projection: Any
    labelId: int
    targets: torch.Tensor  # (M, 3) target points (label surface voxels) in the CT frame, RAS mm
    T_gt: np.ndarray
    T_init: np.ndarray

    def mtre(self, T) -> float:
        from PPCRegistrationLib.metrics import mtre

        return float(mtre(torch.as_tensor(np.asarray(T), dtype=torch.float64),
                          torch.as_tensor(self.T_gt, dtype=torch.float64), self.targets))


@dataclasses.dataclass
class ScenarioResult:
    initialMTRE: float
    finalMTRE: float
    iterations: int
    status: str
    states: list
    result: Any


def loadVolume(scene, path: str, name: str, labelmap: bool = False):
    """Read a volume file into a new node of ``scene`` (works in Slicer and on slicer-core)."""
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    if labelmap and hasattr(storage, "SetCenterImage"):
        storage.SetCenterImage(False)
    if not storage.ReadData(node):
        raise RuntimeError(f"could not read {path}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def surfaceTargets(labelNode, labelId: int, maxPoints: int = 2000, seed: int = 0) -> torch.Tensor:
    """Surface voxels of one label (voxels of the label with a neighbour outside it), in RAS mm."""
    import slicer

    lab = slicer.util.arrayFromVolume(labelNode) == labelId
    if not lab.any():
        raise ValueError(f"label {labelId} is not in '{labelNode.GetName()}'")
    inner = lab.copy()
    for axis in range(3):
        for shift in (1, -1):
            inner &= np.roll(lab, shift, axis)
    surf = np.argwhere(lab & ~inner)  # (n, 3) as (k, j, i)
    rng = np.random.default_rng(seed)
    if len(surf) > maxPoints:
        surf = surf[rng.choice(len(surf), maxPoints, replace=False)]
    ijk = np.c_[surf[:, ::-1], np.ones(len(surf))]
    ras = ijk @ core.ijkToRASArray(labelNode).T
    return torch.from_numpy(ras[:, :3].copy())


def buildScenario(scene, ctPath: str, labelsPath: str, labelId: int, **kwargs) -> Scenario:
    """Load the CT and its label map into ``scene`` and simulate a case (:func:`simulateCase`, same keywords)."""
    ctNode = loadVolume(scene, ctPath, "CT")
    labelNode = loadVolume(scene, labelsPath, "CT labels", labelmap=True)
    return simulateCase(scene, ctNode, labelNode, labelId, **kwargs)


def simulateCase(scene, ctNode, labelNode, labelId: int, *, initialMTREMM: float = 10.0,
                 seed: int = 0, primaryDeg: float = 20.0, secondaryDeg: float = 5.0, sddMM: float = 1200.0,
                 sidMM: float = 750.0, detectorPixels: int = 192, pixelSpacingMM: float = 1.5,
                 groundTruthRotationDeg: float = 4.0, groundTruthShiftMM=(6.0, -4.0, 3.0),
                 xrayName: str = "Simulated X-ray") -> Scenario:
    """Simulate an X-ray of the CT node moved by a known ``T_gt`` (a rotation of ``groundTruthRotationDeg``
    about the vertebra's centre plus ``groundTruthShiftMM``) for a C-arm at ``primaryDeg``/``secondaryDeg``
    (LAO+/CRA+, degrees) aimed at the vertebra, and an initial estimate ``initialMTREMM`` (mm) from it.

    Adds to ``scene``: the X-ray (single-slice volume on the detector plane, ``detectorPixels`` square pixels
    of ``pixelSpacingMM`` mm), the "Ground truth" and "Initial transform" nodes.  The CT and label nodes are
    read, never modified."""
    from PPCRegistrationLib.drr import DRRRenderer
    from PPCRegistrationLib.geometry import se3_exp
    from PPCRegistrationLib.simulation import random_initial_transform, simulate_xray

    targets = surfaceTargets(labelNode, labelId, seed=seed)
    centre = targets.mean(0)

    # a known, non-trivial ground truth: small rotation about the vertebra's centre plus a shift
    ang = np.deg2rad(groundTruthRotationDeg)
    dv = torch.tensor([ang * 0.6, ang * 0.3, ang * 0.74, *groundTruthShiftMM], dtype=torch.float64)
    c = torch.eye(4, dtype=torch.float64)
    c[:3, 3] = centre
    ci = torch.eye(4, dtype=torch.float64)
    ci[:3, 3] = -centre
    T_gt = c @ se3_exp(dv) @ ci
    isoRAS = (T_gt[:3, :3] @ centre + T_gt[:3, 3]).numpy()
    projection = core.projectionFromCArm(primaryDeg, secondaryDeg, sddMM, sidMM, isoRAS, detectorPixels,
                                         detectorPixels, pixelSpacingMM)

    ct = core.volumeFromNode(ctNode)
    xray = simulate_xray(DRRRenderer(ct), projection, T_gt, seed=seed).numpy()
    T_init = random_initial_transform(T_gt, targets, initialMTREMM, torch.Generator().manual_seed(seed + 1))

    xrayNode = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", xrayName)
    core.setVolumeArray(xrayNode, xray[None])
    core.setIJKToRAS(xrayNode, core.xrayIJKToRAS(projection))
    xrayNode.SetAttribute(core.ATTR_SDD, f"{sddMM:.6g}")
    xrayNode.CreateDefaultDisplayNodes()

    gtNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Ground truth")
    core.setTransformMatrix(gtNode, T_gt)
    initNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Initial transform")
    core.setTransformMatrix(initNode, T_init)
    return Scenario(ctNode, labelNode, xrayNode, gtNode, initNode, projection, labelId, targets,
                    T_gt.numpy(), T_init.numpy())


def runScenario(logic, sc: Scenario, *, method: str = "classic", maxIterations: int = 30,
                toleranceMM: float = 0.05, device: str = "cpu", useGeometryFromXray: bool = True,
                modelPath: str | None = None, callback=None) -> ScenarioResult:
    """Set up the logic on the scenario's nodes, run it to the end and measure the final mTRE.

    ``method``/``modelPath``: as ``PPCRegistrationCoreLogic.setup`` (learned methods read their model file)."""
    logic.setup(sc.ctNode, sc.xrayNode, None if useGeometryFromXray else sc.projection,
                initialTransformNode=sc.initialTransformNode, labelmapNode=sc.labelNode, labelIds=[sc.labelId],
                groundTruthTransformNode=sc.groundTruthTransformNode, method=method, maxIterations=maxIterations,
                toleranceMM=toleranceMM, device=device, modelPath=modelPath)
    states = []

    def onState(state):
        states.append(state)
        if callback is not None:
            callback(state)

    result = logic.run(callback=onState)
    T = core.transformToWorldArray(logic.transformNode)
    return ScenarioResult(sc.mtre(sc.T_init), sc.mtre(T), len(states), str(getattr(result, "status", "")),
                          states, result)


def checkOutputs(logic, sc: Scenario, res: ScenarioResult) -> list[str]:
    """Problems with the output nodes after :func:`runScenario` (an empty list when everything is right)."""
    import slicer

    problems: list[str] = []
    nodes = logic.outputNodes()
    for key, node in nodes.items():
        if node is None or node.GetScene() is not logic.scene:
            problems.append(f"output '{key}' is missing from the scene")
    if problems:
        return problems
    # transform: holds the estimate and is applied to the CT
    if sc.ctNode.GetTransformNodeID() != nodes["transform"].GetID():
        problems.append("the CT is not under the registration transform")
    T = core.transformToWorldArray(nodes["transform"])
    Tlast = core.asNumpy(res.states[-1].T) if res.states else sc.T_init
    if res.states and getattr(res.result, "status", "") not in ("diverged", "failed") \
            and not np.allclose(T, Tlast, atol=1e-6) and not np.allclose(T, core.asNumpy(res.result.T), atol=1e-6):
        problems.append("the transform node does not hold the registration result")
    # DRR: single slice on the detector plane, same size as the X-ray, not empty
    drr = slicer.util.arrayFromVolume(nodes["drr"])
    if drr.shape != (1, sc.projection.height, sc.projection.width):
        problems.append(f"DRR shape {drr.shape}")
    elif not np.isfinite(drr).all() or float(drr.max()) <= 0:
        problems.append("the DRR is empty or not finite")
    if not np.allclose(core.ijkToRASArray(nodes["drr"]), core.xrayIJKToRAS(sc.projection), atol=1e-6):
        problems.append("the DRR does not lie on the detector plane")
    # its display: windowed on the rendered pixels (not on the zeros around them), the zeros transparent
    disp = nodes["drr"].GetDisplayNode()
    rendered = drr[drr > 0]
    if disp is None or rendered.size == 0:
        problems.append("the DRR has no display node or no rendered pixel")
    else:
        if disp.GetWindowLevelMin() < float(np.percentile(rendered, 0.5)) - 1e-6:
            problems.append(f"the DRR window starts at {disp.GetWindowLevelMin():.3g}, below its rendered pixels "
                            f"({float(rendered.min()):.3g}..): the overlay looks washed out")
        if not disp.GetApplyThreshold() or disp.GetLowerThreshold() <= 0:
            problems.append("the zeros around the DRR window are not transparent (no threshold)")
    for key in ("contour2d", "flow"):
        if nodes[key].GetDisplayNode().GetSliceIntersectionThickness() < 2:
            problems.append(f"{key} is drawn 1 px thin in the slice views")
    # points and vectors: counts and weights
    # the last update with correspondences (the intensity refinement's updates have none and keep them shown)
    last = next((st for st in reversed(res.states) if getattr(st, "operator", "") != "refine"), None)
    n = int(last.points_3d.shape[0]) if last is not None else 0
    if n == 0:
        problems.append("the last update had no contour points")
    expected = {"contour2d": n, "contour3d": n, "flow": 2 * n}
    for key, count in expected.items():
        pd = nodes[key].GetPolyData()
        if pd is None or pd.GetNumberOfPoints() != count:
            problems.append(f"{key}: {0 if pd is None else pd.GetNumberOfPoints()} points, expected {count}")
            continue
        arr = pd.GetPointData().GetArray(core.WEIGHT_ARRAY)
        if arr is None:
            problems.append(f"{key}: no '{core.WEIGHT_ARRAY}' point scalars")
            continue
        w = np.array([arr.GetValue(i) for i in range(arr.GetNumberOfTuples())])
        if w.size and (w.min() < 0 or w.max() > 1 or not np.isfinite(w).all()):
            problems.append(f"{key}: weights outside [0, 1]: {w.min()}..{w.max()}")
    if nodes["flow"].GetPolyData() is not None and nodes["flow"].GetPolyData().GetNumberOfLines() != n:
        problems.append(f"flow: {nodes['flow'].GetPolyData().GetNumberOfLines()} line segments, expected {n}")
    if nodes["contour3d"].GetTransformNodeID() != nodes["transform"].GetID():
        problems.append("the 3D contour points do not move with the CT")
    carm = nodes["carm"].GetPolyData()
    if carm is None or carm.GetNumberOfPoints() < 10:
        problems.append("the C-arm model is empty")
    # inputs untouched
    if not np.allclose(core.transformToWorldArray(sc.initialTransformNode), sc.T_init, atol=1e-9):
        problems.append("the initial transform was modified")
    return problems
