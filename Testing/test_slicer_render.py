"""Off-screen pictures of the module's views (VTK through EGL, no display), saved as screenshots and checked:
the DRR/X-ray composite must be grey (aligned) at the ground truth and after registration, and show colour
fringes (misaligned) at the initial estimate.

Screenshots go to ``$PPCREG_SCREENSHOTS`` (default ``output/screenshots``, ignored by git).
"""

from __future__ import annotations

import os
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

from PPCRegistrationLogic import core, render, scenario  # noqa: E402

OUT = Path(os.environ.get("PPCREG_SCREENSHOTS", ROOT / "output" / "screenshots"))
L3 = 29


def misalignment(session) -> float:
    """Mean |red - cyan| of the composite inside the rendered DRR window (0 = perfectly aligned)."""
    xray = slicer.util.arrayFromVolume(session.xrayDisplayNode)[0].astype(np.float64)
    drr = slicer.util.arrayFromVolume(session.drrNode)[0].astype(np.float64)
    rgb = render.compositeImage(xray, drr).astype(np.float64)
    inside = drr > 0
    return float(np.abs(rgb[..., 0] - rgb[..., 1])[inside].mean())


@pytest.fixture(scope="module")
def session(shared_data):
    pytest.importorskip("PPCRegistrationLib.registration")
    scene = slicer.vtkMRMLScene()
    sc = scenario.buildScenario(scene, str(shared_data / "lumbar_ct" / "ct.nii.gz"),
                                str(shared_data / "lumbar_ct" / "labels.nii.gz"), L3, initialMTREMM=10.0)
    logic = core.PPCRegistrationCoreLogic(scene)
    logic.setup(sc.ctNode, sc.xrayNode, None, initialTransformNode=sc.initialTransformNode, labelmapNode=sc.labelNode,
                labelIds=[L3], groundTruthTransformNode=sc.groundTruthTransformNode, maxIterations=30, device="cpu")
    OUT.mkdir(parents=True, exist_ok=True)
    yield logic, sc
    scene.Clear(1)


def _has_content(img: np.ndarray) -> bool:
    return img.ndim == 3 and img.shape[0] > 100 and float(img[..., :3].std()) > 10


def test_views_before_registration(session):
    logic, sc = session
    logic.step()  # DRR at the initial estimate, contour points and correspondences
    img = render.renderXrayView(logic, OUT / "xray_overlay_before.png",
                                title=f"initial estimate: mTRE {sc.mtre(sc.T_init):.1f} mm")
    assert _has_content(img)
    img = render.renderXrayView(logic, OUT / "contour_points_flow.png", showDRR=False,
                                title="contour points p and flow vectors p -> p' (colour: weight)")
    assert _has_content(img)
    img = render.render3DView(logic, OUT / "carm_3d.png", title="C-arm, X-ray on the detector, 3D contour points")
    assert _has_content(img)


def test_overlay_lines_up_at_the_ground_truth(session):
    """The display path (DRR node, X-ray plane, IJKToRAS) is right: the DRR at T_gt is grey on the X-ray."""
    from PPCRegistrationLib.drr import DRRRenderer

    logic, sc = session
    logic.reset()
    logic.step()  # creates the DRR node (its first update may already have moved the estimate)
    renderer = DRRRenderer(core.volumeFromNode(sc.ctNode))
    saved = slicer.util.arrayFromVolume(logic.drrNode).copy()
    drr_init = renderer.render(logic.projection, torch.from_numpy(sc.T_init)[None])[0]
    core.setVolumeArray(logic.drrNode, drr_init.numpy()[None])
    before = misalignment(logic)
    drr = renderer.render(logic.projection, torch.from_numpy(sc.T_gt)[None])[0]
    core.setVolumeArray(logic.drrNode, drr.numpy()[None])
    at_gt = misalignment(logic)
    render.renderXrayView(logic, OUT / "xray_overlay_ground_truth.png", showPoints=False, showFlow=False,
                          title="DRR at the ground truth (grey = aligned)")
    core.setVolumeArray(logic.drrNode, saved)
    assert at_gt < 0.6 * before, (at_gt, before)


def test_overlay_lines_up_after_registration(session):
    logic, sc = session
    logic.reset()
    result = logic.run()
    final = sc.mtre(core.transformToWorldArray(logic.transformNode))
    logic.step() if logic.lastState is None else None
    img = render.renderXrayView(logic, OUT / "xray_overlay_after.png",
                                title=f"after {result.iterations} updates ({result.status}): mTRE {final:.2f} mm")
    render.render3DView(logic, OUT / "carm_3d_after.png", title=f"after registration: mTRE {final:.2f} mm")
    assert _has_content(img)
    # the accuracy itself is asserted (as a known failure for now) in test_slicer_logic.py
    assert np.isfinite(final)
