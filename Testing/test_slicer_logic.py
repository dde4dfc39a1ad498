"""The Slicer module's logic on a real, headless MRML scene (slicer-core; docs/design.md §8).

The logic part of the module (PPCRegistration/PPCRegistrationLogic) imports no Qt, so it runs here exactly
as in the application.  The end-to-end test is the module's self-test scenario (shared code in
PPCRegistrationLogic/scenario.py): a simulated X-ray of the lumbar CT, initial error 10 mm, registered with
classic PPC below 2 mm, and every output node checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' package has no MRML scene", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PPCRegistration"))

from PPCRegistrationLogic import core, scenario  # noqa: E402

from PPCRegistrationLib.geometry import Projection, carm_pose  # noqa: E402

L3 = 29


@pytest.fixture()
def scene():
    s = slicer.vtkMRMLScene()
    yield s
    s.Clear(1)


def _projection(primary=30.0, secondary=-10.0, iso=(10.0, -20.0, 40.0), h=60, w=80, ps=(1.2, 1.5)):
    return Projection.from_carm(carm_pose(primary, secondary, 750.0, torch.tensor(iso), frame="RAS"), 1200.0, h, w,
                                ps)


# ----------------------------------------------------------------------------- geometry conversions


def test_xray_plane_round_trip():
    proj = _projection()
    m = core.xrayIJKToRAS(proj)
    # voxel (i, j, 0) is detector pixel (u, v) = (i, j) at depth SDD
    uv = torch.tensor([[[0.0, 0.0], [79.0, 0.0], [13.0, 41.0]]], dtype=torch.float64)
    expected = proj.detector_pixel_world(uv)[0].numpy()
    got = (np.c_[uv[0].numpy(), np.zeros(3), np.ones(3)] @ m.T)[:, :3]
    np.testing.assert_allclose(got, expected, atol=1e-9)
    # the k axis points along the beam, away from the source
    beam = m[:3, 2]
    centre = expected.mean(0)
    assert np.dot(beam, centre - proj.source[0].numpy()) > 0
    back = core.projectionFromXrayPlane(m, proj.height, proj.width, 1200.0)
    for name in ("K", "R", "t", "pixel_spacing"):
        np.testing.assert_allclose(getattr(back, name).numpy(), getattr(proj, name).numpy(), atol=1e-8)
    # the projection of a world point agrees
    x = torch.tensor([[[0.0, 10.0, 30.0], [25.0, -40.0, 60.0]]], dtype=torch.float64)
    np.testing.assert_allclose(back.project(x).numpy(), proj.project(x).numpy(), atol=1e-8)


def test_projection_from_xray_node_uses_parent_transform_and_sdd_attribute(scene):
    proj = _projection()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "xray")
    core.setVolumeArray(node, np.random.default_rng(0).random((1, proj.height, proj.width)))
    core.setIJKToRAS(node, core.xrayIJKToRAS(proj))
    with pytest.raises(ValueError, match="source-to-detector"):
        core.projectionFromXrayNode(node)
    node.SetAttribute(core.ATTR_SDD, "1200")
    back = core.projectionFromXrayNode(node)
    np.testing.assert_allclose(back.matrix.numpy(), proj.matrix.numpy(), atol=1e-6)
    # moving the X-ray node with a transform moves the whole C-arm with it
    tnode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = [5.0, -3.0, 7.0]
    core.setTransformMatrix(tnode, shift)
    node.SetAndObserveTransformNodeID(tnode.GetID())
    moved = core.projectionFromXrayNode(node)
    np.testing.assert_allclose(moved.source[0].numpy(), proj.source[0].numpy() + shift[:3, 3], atol=1e-6)


def test_slice_to_ras_shows_the_image_upright():
    proj = _projection()
    s2r = core.sliceToRASForXray(proj)
    m = core.xrayIJKToRAS(proj)
    # slice x follows the columns (u), slice y points to smaller rows (up on screen), normal towards the source
    np.testing.assert_allclose(s2r[:3, 0], m[:3, 0] / np.linalg.norm(m[:3, 0]), atol=1e-9)
    np.testing.assert_allclose(s2r[:3, 1], -m[:3, 1] / np.linalg.norm(m[:3, 1]), atol=1e-9)
    assert np.dot(s2r[:3, 2], proj.source[0].numpy() - s2r[:3, 3]) > 0
    np.testing.assert_allclose(np.linalg.det(s2r[:3, :3]), 1.0, atol=1e-9)
    sliceNode = slicer.vtkMRMLSliceNode()
    sliceNode.SetDimensions(400, 300, 1)
    core.alignSliceNodeToXray(sliceNode, proj)
    np.testing.assert_allclose(core.arrayFromVTKMatrix4x4(sliceNode.GetSliceToRAS()), s2r, atol=1e-9)
    fov = sliceNode.GetFieldOfView()
    assert fov[0] >= proj.width * 1.2 and fov[1] >= proj.height * 1.5


def test_carm_geometry_from_dicom_tags():
    tags = {"0018,1110": "1195.5", "0018,1111": "785", "0018,1164": "0.308\\0.308", "0018,1510": "-12.5",
            "0018,1511": ""}
    g = core.carmGeometryFromDicomTags(lambda t: tags.get(t, ""))
    assert g == {"sdd": 1195.5, "sid": 785.0, "pixelSpacing": 0.308, "primary": -12.5}
    assert core.carmGeometryFromDicomTags(lambda t: 1 / 0) == {}


# ----------------------------------------------------------------------------- node conversions


def test_volume_from_node_keeps_ijk_order_and_matrix(scene):
    arr = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # (K, J, I)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    slicer.util.updateVolumeFromArray(node, arr)
    m = np.array([[0, 0, -2.0, 10], [1.5, 0, 0, -5], [0, 3.0, 0, 7], [0, 0, 0, 1]])
    core.setIJKToRAS(node, m)
    vol = core.volumeFromNode(node)
    assert vol.shape == (2, 3, 4) and vol.data.dtype == torch.float32
    np.testing.assert_array_equal(vol.data.numpy(), arr)
    np.testing.assert_allclose(vol.ijk_to_world.numpy(), m)
    # the node's own value at (i, j, k) = (3, 1, 0) is at world ijk_to_world @ (3, 1, 0, 1)
    assert float(vol.data[0, 1, 3]) == float(arr[0, 1, 3])


def test_xray_image_from_node(scene):
    img = np.random.default_rng(1).random((1, 5, 7)).astype(np.float32)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "x")
    slicer.util.updateVolumeFromArray(node, img)
    x = core.xrayImageFromNode(node)
    assert x.shape == (5, 7)
    np.testing.assert_allclose(x.numpy(), img[0])
    three = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "three")
    slicer.util.updateVolumeFromArray(three, np.zeros((3, 5, 7), np.float32))
    with pytest.raises(ValueError, match="single-slice"):
        core.xrayImageFromNode(three)


def test_roi_from_markups_roi_in_ct_frame(scene):
    roiNode = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roiNode.SetCenter(10.0, 20.0, 30.0)
    roiNode.SetSize(40.0, 50.0, 60.0)
    box = core.roiFromMarkupsROI(roiNode)
    np.testing.assert_allclose(box.center.numpy(), [10, 20, 30])
    np.testing.assert_allclose(box.size.numpy(), [40, 50, 60])
    # when the CT is shown moved by T (world = T x_ct), the ROI drawn in world maps back by T^-1
    T = np.eye(4)
    T[:3, 3] = [1.0, 2.0, 3.0]
    box2 = core.roiFromMarkupsROI(roiNode, np.linalg.inv(T))
    np.testing.assert_allclose(box2.center.numpy(), [9, 18, 27])


def test_roi_from_labelmap_and_segment(scene):
    lab = np.zeros((6, 7, 8), np.int16)
    lab[2:4, 2:5, 3:6] = 29
    lab[0, 0, 0] = 5
    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lab")
    slicer.util.updateVolumeFromArray(labelNode, lab)
    roi = core.roiFromLabelmapNode(labelNode, [29])
    assert roi.label_ids == [29]
    with pytest.raises(Exception, match="no voxel"):
        core.roiFromLabelmapNode(labelNode, [30])
    # a segmentation made from the label map, rasterised back on the reference grid
    segNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    only = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "only29")
    slicer.util.updateVolumeFromArray(only, (lab == 29).astype(np.int16))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(only, segNode)
    segId = segNode.GetSegmentation().GetNthSegmentID(0)
    ref = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ref")
    slicer.util.updateVolumeFromArray(ref, np.zeros_like(lab, dtype=np.float32))
    n_before = scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") + scene.GetNumberOfNodesByClass("vtkMRMLColorNode")
    roiSeg = core.roiFromSegment(scene, segNode, segId, ref)
    # the temporary label map (and its colour table) are removed
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") + scene.GetNumberOfNodesByClass(
        "vtkMRMLColorNode") == n_before
    mask = roiSeg.mask_on(core.volumeFromNode(ref))
    assert int(mask.sum()) == int((lab == 29).sum())


def test_points_and_segments_poly_data():
    pts = np.random.default_rng(0).random((9, 3))
    pd = core.pointsPolyData(pts, np.linspace(-0.5, 1.5, 9))
    assert pd.GetNumberOfPoints() == 9 and pd.GetNumberOfVerts() == 9
    w = pd.GetPointData().GetArray(core.WEIGHT_ARRAY)
    assert 0.0 <= w.GetRange()[0] and w.GetRange()[1] <= 1.0  # clipped into [0, 1]
    seg = core.segmentsPolyData(pts, pts + 1.0, np.ones(9))
    assert seg.GetNumberOfPoints() == 18 and seg.GetNumberOfLines() == 9
    carm = core.carmPolyData(_projection())
    assert carm.GetNumberOfPoints() > 20


def test_weight_color_node_is_shared(scene):
    a = core.weightColorNode(scene)
    b = core.weightColorNode(scene)
    assert a is b and a.GetNumberOfColors() == 256


# ----------------------------------------------------------------------------- the registration scenario


@pytest.fixture(scope="module")
def lumbar_paths(shared_data):
    return shared_data / "lumbar_ct" / "ct.nii.gz", shared_data / "lumbar_ct" / "labels.nii.gz"


@pytest.fixture()
def lumbar_scenario(lumbar_paths):
    pytest.importorskip("PPCRegistrationLib.registration", reason="PPCRegistrationLib.registration not yet there")
    s = slicer.vtkMRMLScene()
    sc = scenario.buildScenario(s, str(lumbar_paths[0]), str(lumbar_paths[1]), L3, initialMTREMM=10.0, seed=0)
    yield s, sc
    s.Clear(1)


def test_scenario_inputs(lumbar_scenario):
    scene, sc = lumbar_scenario
    assert abs(sc.mtre(sc.T_init) - 10.0) < 1e-3
    assert sc.mtre(sc.T_gt) == 0.0
    h, w = core.xrayShape(sc.xrayNode)
    assert (h, w) == (sc.projection.height, sc.projection.width)
    # the simulated X-ray lies on its detector plane: its node alone gives back the geometry
    back = core.projectionFromXrayNode(sc.xrayNode)
    np.testing.assert_allclose(back.matrix.numpy(), sc.projection.matrix.numpy(), atol=1e-6)


def test_logic_registers_the_scenario_and_fills_every_output(lumbar_scenario):
    scene, sc = lumbar_scenario
    logic = core.PPCRegistrationCoreLogic(scene)
    xrayMatrixBefore = core.ijkToRASArray(sc.xrayNode)
    xrayBefore = slicer.util.arrayFromVolume(sc.xrayNode).copy()
    res = scenario.runScenario(logic, sc, method="classic", maxIterations=30)
    assert res.initialMTRE == pytest.approx(10.0, abs=1e-3)
    assert np.isfinite(res.finalMTRE) and res.iterations >= 1
    assert scenario.checkOutputs(logic, sc, res) == []
    # inputs are never modified
    np.testing.assert_allclose(core.ijkToRASArray(sc.xrayNode), xrayMatrixBefore)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(sc.xrayNode), xrayBefore)
    assert logic.xrayDisplayNode is sc.xrayNode  # already on its detector plane: no copy


def test_scenario_reaches_two_mm_from_ten(lumbar_scenario):
    scene, sc = lumbar_scenario
    res = scenario.runScenario(core.PPCRegistrationCoreLogic(scene), sc, method="classic", maxIterations=30)
    assert res.finalMTRE < 2.0, f"final mTRE {res.finalMTRE:.2f} mm ({res.status} after {res.iterations} updates)"


def test_step_reset_and_outputs_reused(lumbar_scenario):
    scene, sc = lumbar_scenario
    logic = core.PPCRegistrationCoreLogic(scene)
    with pytest.raises(RuntimeError, match="setup"):
        logic.step()
    logic.setup(sc.ctNode, sc.xrayNode, sc.projection, initialTransformNode=sc.initialTransformNode,
                labelmapNode=sc.labelNode, labelIds=[L3], groundTruthTransformNode=sc.groundTruthTransformNode,
                maxIterations=5, device="cpu")
    T0 = core.transformToWorldArray(logic.transformNode)
    np.testing.assert_allclose(T0, sc.T_init, atol=1e-9)
    state = logic.step()
    assert state.iteration == 1
    n = int(state.points_3d.shape[0])
    assert logic.contour2DNode.GetPolyData().GetNumberOfPoints() == n
    assert logic.flowNode.GetPolyData().GetNumberOfLines() == n
    np.testing.assert_allclose(core.transformToWorldArray(logic.transformNode), core.asNumpy(state.T), atol=1e-9)
    logic.reset()
    np.testing.assert_allclose(core.transformToWorldArray(logic.transformNode), sc.T_init, atol=1e-9)
    assert logic.registration.iteration == 0
    # a second setup in the same scene reuses the output nodes instead of adding new ones
    count = scene.GetNumberOfNodesByClass("vtkMRMLModelNode")
    logic2 = core.PPCRegistrationCoreLogic(scene)
    logic2.setup(sc.ctNode, sc.xrayNode, sc.projection, initialTransformNode=sc.initialTransformNode,
                 labelmapNode=sc.labelNode, labelIds=[L3], maxIterations=5, device="cpu")
    assert scene.GetNumberOfNodesByClass("vtkMRMLModelNode") == count
    assert logic2.transformNode is logic.transformNode


def test_xray_not_on_detector_is_copied_not_moved(lumbar_scenario):
    scene, sc = lumbar_scenario
    # an X-ray loaded from a 2D file: identity geometry, the C-arm comes from the angles
    flat = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "flat X-ray")
    slicer.util.updateVolumeFromArray(flat, slicer.util.arrayFromVolume(sc.xrayNode).copy())
    logic = core.PPCRegistrationCoreLogic(scene)
    logic.setup(sc.ctNode, flat, sc.projection, initialTransformNode=sc.initialTransformNode,
                labelmapNode=sc.labelNode, labelIds=[L3], maxIterations=3, device="cpu")
    np.testing.assert_allclose(core.ijkToRASArray(flat), np.eye(4))
    placed = logic.xrayDisplayNode
    assert placed is not flat and placed.GetAttribute(core.ATTR_ROLE) == "xray"
    np.testing.assert_allclose(core.ijkToRASArray(placed), core.xrayIJKToRAS(sc.projection), atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(placed), slicer.util.arrayFromVolume(flat))


def test_stop_request_stops_run(lumbar_scenario):
    scene, sc = lumbar_scenario
    logic = core.PPCRegistrationCoreLogic(scene)
    logic.setup(sc.ctNode, sc.xrayNode, None, initialTransformNode=sc.initialTransformNode, labelmapNode=sc.labelNode,
                labelIds=[L3], maxIterations=30, device="cpu")
    seen = []

    def callback(state):
        seen.append(state)
        logic.stop()

    result = logic.run(callback=callback)
    assert len(seen) == 1 and result.status in ("stopped", "converged", "diverged")


def test_foreign_objects_are_found_shown_and_reset(lumbar_scenario):
    """A wire across the vertebra that the CT does not hold (a copy of the scenario's X-ray with a bright bar): the
    registration's foreign-object pass finds it and the logic shows the pixels as a label map on the detector
    plane; the X-ray node is not modified; reset empties the label map; with the option off no pass is made."""
    scene, sc = lumbar_scenario
    img = slicer.util.arrayFromVolume(sc.xrayNode).copy()
    h, w = img.shape[-2:]
    lo, hi = float(img.min()), float(img.max())
    wire = np.zeros((h, w), bool)
    wire[h // 2 - 1:h // 2 + 2, w // 4:3 * w // 4] = True
    img[0][wire] = hi + 0.5 * (hi - lo)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "X-ray with a wire")
    slicer.util.updateVolumeFromArray(node, img)
    core.setIJKToRAS(node, core.ijkToRASArray(sc.xrayNode))
    before = slicer.util.arrayFromVolume(node).copy()
    logic = core.PPCRegistrationCoreLogic(scene)
    kw = dict(initialTransformNode=sc.initialTransformNode, labelmapNode=sc.labelNode, labelIds=[L3],
              groundTruthTransformNode=sc.groundTruthTransformNode, maxIterations=30, device="cpu")
    logic.setup(sc.ctNode, node, sc.projection, **kw)
    logic.run()
    assert logic.registration.foreign_passes == 1
    label = logic.outputNodes()["foreign"]
    assert label.IsA("vtkMRMLLabelMapVolumeNode") and label.GetName() == core.OUTPUT_NAMES["foreign"]
    found = slicer.util.arrayFromVolume(label)[0] > 0
    assert found[wire].mean() > 0.5, found[wire].mean()
    np.testing.assert_allclose(core.ijkToRASArray(label), core.xrayIJKToRAS(sc.projection), atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), before)
    logic.reset()
    assert not slicer.util.arrayFromVolume(label).any()
    off = core.PPCRegistrationCoreLogic(scene)
    off.setup(sc.ctNode, node, sc.projection, foreignObjects=False, **kw)
    off.run()
    assert off.registration.foreign_passes == 0 and off.registration.config.foreign.passes == 0


# ----------------------------------------------------------------------------- learned and chained methods


def test_methods_offered_by_the_module():
    assert set(core.METHODS) == {"classic", "learned", "flow", "ppc-flow", "ppc-flow-attention", "flow+classic",
                                 "ppc-flow+classic", "ppc-flow-attention+classic"}
    assert core.normalizeMethod("ppc_flow_attention") == "ppc-flow-attention"  # scenes saved by older versions
    cfg = core.makeConfig("ppc-flow", maxIterations=7, device="cpu")
    got = (cfg.method, cfg.solver.kind, cfg.prealign.search_px, cfg.guards.max_iterations)
    assert got == ("ppc-flow", "plain", 0.0, 7)
    with pytest.raises(ValueError, match="unknown method"):
        core.makeConfig("magic")
    # the intensity refinement: on for classic by default, never in a learned phase, off on request
    from PPCRegistrationLib.registration import RegistrationConfig

    assert core.makeConfig("classic").refine.iterations == RegistrationConfig().refine.iterations > 0
    assert cfg.refine.iterations == 0
    assert core.makeConfig("classic", intensityRefinement=False).refine.iterations == 0
    assert core.makeConfig("classic").foreign.passes == RegistrationConfig().foreign.passes > 0
    assert core.makeConfig("classic", foreignObjects=False).foreign.passes == 0


def test_learned_method_without_model_file_fails_clearly(lumbar_scenario, tmp_path):
    from PPCRegistrationLib.errors import ModelFileError

    scene, sc = lumbar_scenario
    n_nodes = scene.GetNumberOfNodes()
    logic = core.PPCRegistrationCoreLogic(scene)
    with pytest.raises(ModelFileError, match="nowhere.pt"):
        scenario.runScenario(logic, sc, method="ppc-flow-attention", modelPath=str(tmp_path / "nowhere.pt"))
    assert scene.GetNumberOfNodes() == n_nodes  # nothing created, the CT not moved
    assert sc.ctNode.GetParentTransformNode() is None
    bad = tmp_path / "bad.pt"
    bad.write_text("not a model")
    with pytest.raises(ModelFileError, match="bad.pt"):
        scenario.runScenario(logic, sc, method="flow", modelPath=str(bad))


def test_chained_method_runs_in_the_logic_and_fills_every_output(lumbar_scenario, tmp_path):
    from PPCRegistrationLib.networks import LearnedOperator, save_model

    scene, sc = lumbar_scenario
    torch.manual_seed(0)
    model = tmp_path / "ppc-flow-attention.pt"
    save_model(model, LearnedOperator("ppc-flow-attention"), {"note": "untrained"})
    logic = core.PPCRegistrationCoreLogic(scene)
    res = scenario.runScenario(logic, sc, method="ppc-flow-attention+classic", maxIterations=3,
                               modelPath=str(model))
    ops = [s.operator for s in res.states]
    assert ops[0] == "ppc-flow-attention" and set(ops[1:]) <= {"classic", "refine"} and res.iterations >= 1
    assert logic.method.name == "ppc-flow-attention+classic" and logic.method.model_path == model
    assert scenario.checkOutputs(logic, sc, res) == []
    assert "(ppc-flow-attention)" in core.formatStatus(res.states[0])
    # reset goes back to the learned phase
    logic.reset()
    assert logic.registration.phase.name == "ppc-flow-attention" and logic.step().operator == "ppc-flow-attention"
