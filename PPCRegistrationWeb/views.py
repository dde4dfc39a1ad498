"""The page's Slicer views (trame-slicer): the X-ray view (Slicer's Red slice view turned onto the detector
plane: the X-ray, the DRR at the estimate over it, the contour points and flow vectors coloured by weight with a
colour legend) and the 3D view (the CT volume-rendered under the registration transform, the C-arm, the X-ray
slice on the detector and the 3D contour points).  Display settings are the Slicer module's
(``core.PPCRegistrationCoreLogic.showResults``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from PPCRegistrationLogic import core

XRAY_VIEW = "Red"
LAYOUT = "X-ray and 3D"


def register_layout(layout_manager) -> None:
    """The page's layout: the X-ray view beside the 3D view."""
    from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

    layout_manager.register_layout(LAYOUT, Layout(LayoutDirection.Horizontal, [
        ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.threed_view()]))
    layout_manager.set_layout(LAYOUT)


def _views(slicer_app):
    """(the X-ray view: slice view "Red", the first 3D view) of the app's view manager (None where absent)."""
    manager = slicer_app.view_manager
    red = next((v for v in manager.get_slice_views() if v.get_singleton_tag() == XRAY_VIEW), None)
    threeD = next(iter(manager.get_threed_views()), None)
    return red, threeD


def bone_surface(ctNode, threshold_hu: float = 200.0, spacing_mm: float = 3.0):
    """Iso-surface of the CT at ``threshold_hu`` on a ``spacing_mm`` grid, in the CT node's RAS frame."""
    import vtk

    image = ctNode.GetImageData()
    spacing = np.array(ctNode.GetSpacing(), dtype=float)
    resample = vtk.vtkImageResample()
    resample.SetInputData(image)
    for axis in range(3):  # the image data is in IJK (unit spacing); shrink each axis to ~spacing_mm voxels
        resample.SetAxisMagnificationFactor(axis, min(1.0, float(spacing[axis]) / spacing_mm))
    surface = vtk.vtkFlyingEdges3D()
    surface.SetInputConnection(resample.GetOutputPort())
    surface.SetValue(0, threshold_hu)
    surface.ComputeNormalsOff()
    toRAS = vtk.vtkTransform()
    toRAS.SetMatrix(core.vtkMatrix4x4FromArray(core.ijkToRASArray(ctNode)))
    move = vtk.vtkTransformPolyDataFilter()
    move.SetInputConnection(surface.GetOutputPort())
    move.SetTransform(toRAS)
    normals = vtk.vtkPolyDataNormals()  # after the move: IJK -> RAS may mirror, which would flip them
    normals.SetInputConnection(move.GetOutputPort())
    normals.SplittingOff()
    normals.AutoOrientNormalsOff()
    normals.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(normals.GetOutput())
    return out


class SceneViews:
    """Shows one registration session in the page's two views."""

    def __init__(self, slicer_app) -> None:
        self.app = slicer_app
        self.red, self.threeD = _views(slicer_app)
        self._legend = None
        self._bone = None
        self._boneOf = None

    def show_session(self, logic, opacity: float) -> None:
        """X-ray + DRR on the detector plane in the X-ray view, weight legend, CT and C-arm in 3D."""
        import slicer

        scene = logic.scene
        sliceNode = self.red.get_view_node() if self.red is not None else None
        if self.red is not None:
            self.red.fit_view_to_content()  # the slice node's size from the render window (VTK 9.6 sends no resize)
        logic.showResults(opacity, sliceNode)
        if sliceNode is not None:
            sliceNode.SetSliceVisible(True)
            if self._legend is None or self._legend.GetScene() is not scene:
                if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
                    scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())  # SlicerApp does not
                self._legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(logic.contour2DNode)
                self._legend.SetTitleText("weight")
                self._legend.SetViewNodeIDs([sliceNode.GetID()])
                self._legend.SetSize(0.12, 0.4)
        if self.threeD is not None:
            self._show_ct_3d(logic)
            self._aim_camera(logic.projection)

    def show_pose_handles(self, transformNode, centre, visible: bool = True) -> None:
        """Slicer's transform handles on the registration transform about ``centre`` (mm, in the CT's frame):
        in the X-ray view a disk at the region's projection that moves the pose in the detector plane."""
        if transformNode is None:
            return
        transformNode.SetCenterOfTransformation(*[float(v) for v in centre])
        display = transformNode.GetDisplayNode()
        if display is None:
            transformNode.CreateDefaultDisplayNodes()
            display = transformNode.GetDisplayNode()
            display.SetEditorScalingEnabled(False)
            display.SetInteractionSizeAbsolute(True)
            display.SetInteractionSizeMm(40.0)
        display.SetEditorVisibility(bool(visible))
        display.SetEditorVisibility3D(bool(visible))
        display.UpdateEditorBounds()

    def _show_ct_3d(self, logic) -> None:
        """The CT's bone surface (a model under the registration transform): volume rendering on a CPU-only
        machine takes seconds a frame, this renders in milliseconds."""
        ct = logic.ctNode
        if self._bone is None or self._bone.GetScene() is not logic.scene or self._boneOf is not ct:
            self._bone = logic.scene.AddNewNodeByClass("vtkMRMLModelNode", "CT bone surface")
            self._bone.SetAndObservePolyData(bone_surface(ct))
            self._bone.CreateDefaultDisplayNodes()
            display = self._bone.GetDisplayNode()
            display.SetScalarVisibility(False)  # the iso-surface carries the CT's values: plain bone colour
            display.SetColor(0.93, 0.9, 0.82)
            display.SetVisibility2D(False)
            display.SetViewNodeIDs([self.threeD.get_view_node_id()])
            self._boneOf = ct
        self._bone.SetAndObserveTransformNodeID(logic.transformNode.GetID())
        display = ct.GetDisplayNode()
        if display is not None:
            display.SetVisibility(False)  # the CT's slices stay out of the X-ray view

    def _aim_camera(self, projection) -> None:
        """Look at the C-arm from the side of the beam, from above, a little from the source."""
        src, det = projection.source[0].numpy(), core.sliceToRASForXray(projection)[:3, 3]
        beam = (det - src) / np.linalg.norm(det - src)
        focus = src + 0.72 * (det - src)  # between the patient and the detector
        side = np.cross(beam, [0.0, 0.0, 1.0])
        camera = self.threeD.get_camera_node()
        camera.SetFocalPoint(*focus)
        camera.SetPosition(*(focus + 800.0 * side / np.linalg.norm(side) + [0.0, 0.0, 300.0] - 500.0 * beam))
        camera.SetViewUp(0.0, 0.0, 1.0)
        camera.ResetClippingRange()

    def screenshot(self, path: str | Path) -> Path:
        """Both views side by side in one PNG."""
        import vtk

        from PPCRegistrationLogic.render import grabRenderWindow

        images = [grabRenderWindow(view.render_window()) for view in (self.red, self.threeD) if view is not None]
        append = vtk.vtkImageAppend()
        append.SetAppendAxis(0)
        height = max(im.GetDimensions()[1] for im in images)
        for im in images:  # the same height for both, padded with black at the top
            pad = vtk.vtkImageConstantPad()
            pad.SetInputData(im)
            ext = im.GetExtent()
            pad.SetOutputWholeExtent(ext[0], ext[1], ext[2], ext[2] + height - 1, 0, 0)
            append.AddInputConnection(pad.GetOutputPort())  # the pipeline keeps the filter alive
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(path))
        writer.SetInputConnection(append.GetOutputPort())
        writer.Write()
        return Path(path)
