"""Screenshots of the module's output in REAL Slicer views (a slice view and a 3D view with Slicer's displayable
managers), rendered off-screen by trame-slicer: no trame server, no browser; VTK renders through EGL.

Runs the 10 mm scenario of the module's tests on the lumbar CT (``PPCRegistrationLogic.scenario``: a simulated
X-ray of L3, initial mTRE 10 mm) with ``PPCRegistrationLogic.core`` on the MRML scene of a trame-slicer
``SlicerApp``, shows the outputs as the module's "Show X-ray view" does, and saves to OUT_DIR, for the initial
estimate (``*_before.png``: the DRR at T_init, the first update's contour points and flow vectors) and after the
registration (``*_after.png``: the last PPC update's points and vectors):

* ``slice_*.png``: the Red slice view turned onto the detector plane, the X-ray as background and the DRR as
  foreground (opacity 0.5), the contour points and flow vectors (model nodes) coloured by their ``weight`` point
  scalars, with a colour legend;
* ``3d_*.png``: the 3D view: the CT's bone surface under the registration transform, the C-arm model, the Red
  slice (X-ray + DRR) on the detector, the 2D and 3D contour points.

The module's own display settings are used (the DRR in Slicer's Red colour table, windowed on its rendered
pixels, its zeros transparent; points and vectors 3 px thick in slice views); ``--cyan`` also gives the X-ray
the Cyan colour table, so that the blend is grey where X-ray and DRR agree and red/cyan where they do not.

Runs in the project's ``.venv`` (``bash scripts/app.sh`` or ``bash scripts/test.sh`` installs trame-slicer)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/slicer_views_trame.py [OUT_DIR] [--cyan]

OUT_DIR defaults to output/trame_screenshots.  The CT: ``$PPCREG_SHARED_DATA/lumbar_ct`` (default
``../shared/data`` next to the project root).  About 40 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "PPCRegistration")]
L3 = 29


def screenshot(view, path: Path) -> None:
    """Render a trame-slicer view's render window and write it to a PNG."""
    from PPCRegistrationLogic.render import saveRenderWindow

    saveRenderWindow(view.render_window(), path)
    print("wrote", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=str(ROOT / "output" / "trame_screenshots"))
    parser.add_argument("--cyan", action="store_true", help="show the X-ray in Slicer's Cyan colour table")
    parser.add_argument("--data", default=os.environ.get("PPCREG_SHARED_DATA", str(ROOT.parent / "shared" / "data")))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    import torch
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    from PPCRegistrationLogic import core, scenario

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    # Slicer's application core and two views on its scene, rendered off-screen without a trame server
    app = SlicerApp()
    scene = app.scene
    views = app.view_manager
    views.register_factory(DirectViewFactory(do_render_offscreen=True))
    red = views.create_view(ViewLayoutDefinition.axial_view())  # singleton tag "Red"
    threeD = views.create_view(ViewLayoutDefinition.threed_view())
    views.set_current_view_ids([red.get_singleton_tag(), threeD.get_singleton_tag()])
    red.update_size(800, 800)
    threeD.update_size(1000, 700)
    # VTK 9.6 no longer sends the interactor's WindowResizeEvent that trame-slicer listens to, so the slice
    # node would stay 256 x 256 pixels: fit_view_to_content() resizes it from the render window
    red.fit_view_to_content()
    # DirectRendering re-renders a view on every MRML change (every registration update): render only here
    for view in (red, threeD):
        view.set_render_blocked(True)

    # the module's scenario and logic, on the SlicerApp's scene
    lumbar = Path(args.data) / "lumbar_ct"
    sc = scenario.buildScenario(scene, str(lumbar / "ct.nii.gz"), str(lumbar / "labels.nii.gz"), L3,
                                initialMTREMM=10.0)
    logic = core.PPCRegistrationCoreLogic(scene)
    logic.setup(sc.ctNode, sc.xrayNode, None, initialTransformNode=sc.initialTransformNode, labelmapNode=sc.labelNode,
                labelIds=[L3], groundTruthTransformNode=sc.groundTruthTransformNode, maxIterations=30, device="cpu")

    # what the module's "Show X-ray view" does, as the browser app shows it (PPCRegistrationWeb.views): X-ray +
    # DRR in Red turned onto the detector with a weight legend, the CT's bone surface and the C-arm in 3D
    from PPCRegistrationWeb.views import SceneViews

    SceneViews(app).show_session(logic, 0.5)
    sc.labelNode.GetDisplayNode().SetVisibility(False)

    if args.cyan:
        logic.xrayDisplayNode.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeCyan")

    def shoot(tag: str) -> None:
        screenshot(red, out / f"slice_{tag}.png")
        screenshot(threeD, out / f"3d_{tag}.png")

    # before: the first update's contour points and correspondences, the DRR and the CT at T_init
    t_setup = time.perf_counter()
    logic.step()
    core.setTransformMatrix(logic.transformNode, sc.T_init)
    print(f"initial estimate: mTRE {sc.mtre(sc.T_init):.2f} mm")
    shoot("before")

    # after: the full registration (PPC updates, then the intensity refinement)
    logic.reset()
    t_run = time.perf_counter()
    result = logic.run()
    t_run = time.perf_counter() - t_run
    final = sc.mtre(core.transformToWorldArray(logic.transformNode))
    print(f"after {result.iterations} updates ({result.status}): mTRE {final:.2f} mm, {t_run:.1f} s")
    shoot("after")
    print(f"total {time.perf_counter() - t0:.1f} s (start-up and scenario {t_setup - t0:.1f} s, "
          f"registration {t_run:.1f} s)")


if __name__ == "__main__":
    main()
