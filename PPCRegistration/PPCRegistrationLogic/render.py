"""Off-screen pictures of a registration session with plain VTK (no Qt, no Slicer views): used for the
README screenshots and by the tests to look at the overlay.  Everything is drawn from the output *nodes*
(their world geometry: IJKToRAS, transforms, poly data), so a picture that lines up also checks the
MRML conversions.

* :func:`renderXrayView`: the X-ray seen from the source (as in the module's slice view), the DRR at the
  current estimate as a coloured overlay, contour points and flow vectors coloured by weight.
* :func:`render3DView`: the C-arm (source, beam, detector with the X-ray on it), the CT bone surface at the
  current estimate, and the 3D contour points.
"""

from __future__ import annotations

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

from . import core


def _indexImage(volumeNode) -> vtk.vtkImageData:
    """A copy of the node's voxels in index space (origin 0, spacing 1); IJKToRAS is applied by the caller."""
    image = vtk.vtkImageData()
    image.DeepCopy(volumeNode.GetImageData())
    image.SetOrigin(0, 0, 0)
    image.SetSpacing(1, 1, 1)
    return image


def _imageActor(volumeNode, lut: vtk.vtkScalarsToColors, opacity: float = 1.0) -> vtk.vtkImageActor:
    """A single-slice volume drawn at its world position (IJKToRAS and parent transforms)."""
    image = _indexImage(volumeNode)
    colors = vtk.vtkImageMapToColors()
    colors.SetInputData(image)
    colors.SetLookupTable(lut)
    colors.SetOutputFormatToRGBA()
    colors.Update()
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputConnection(colors.GetOutputPort())
    m = core.nodeToWorldArray(volumeNode) @ core.ijkToRASArray(volumeNode)
    actor.SetUserMatrix(core.vtkMatrix4x4FromArray(m))
    actor.SetOpacity(opacity)
    actor.InterpolateOff()
    return actor


def _greyLUT(volumeNode, lo_pct=0.5, hi_pct=99.5) -> vtk.vtkLookupTable:
    a = slicer.util.arrayFromVolume(volumeNode)
    lo, hi = np.percentile(a, [lo_pct, hi_pct])
    lut = vtk.vtkLookupTable()
    lut.SetRange(float(lo), float(max(hi, lo + 1e-6)))
    lut.SetValueRange(0, 1)
    lut.SetSaturationRange(0, 0)
    lut.SetRampToLinear()
    lut.Build()
    return lut


def _weightLUT(scene) -> vtk.vtkLookupTable:
    colorNode = core.weightColorNode(scene)
    lut = vtk.vtkLookupTable()
    lut.DeepCopy(colorNode.GetLookupTable())
    lut.SetRange(0.0, 1.0)
    return lut


def _polyActor(modelNode, lut=None, pointSize=5.0, lineWidth=2.0, color=(1, 1, 1), opacity=1.0) -> vtk.vtkActor:
    pd = modelNode.GetPolyData()
    transform = vtk.vtkTransform()
    transform.SetMatrix(core.vtkMatrix4x4FromArray(core.nodeToWorldArray(modelNode)))
    tf = vtk.vtkTransformPolyDataFilter()
    tf.SetInputData(pd)
    tf.SetTransform(transform)
    tf.Update()
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(tf.GetOutputPort())
    if lut is not None and pd.GetPointData().GetArray(core.WEIGHT_ARRAY) is not None:
        mapper.SetLookupTable(lut)
        mapper.SetScalarModeToUsePointFieldData()
        mapper.SelectColorArray(core.WEIGHT_ARRAY)
        mapper.SetScalarRange(0.0, 1.0)
        mapper.ScalarVisibilityOn()
    else:
        mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    prop = actor.GetProperty()
    prop.SetColor(*color)
    prop.SetPointSize(pointSize)
    prop.SetLineWidth(lineWidth)
    prop.SetOpacity(opacity)
    prop.LightingOff() if pd.GetNumberOfPolys() == 0 else None
    if pd.GetNumberOfPolys() == 0:
        prop.SetRenderPointsAsSpheres(True)
    return actor


def _scalarBar(lut, title="weight") -> vtk.vtkScalarBarActor:
    bar = vtk.vtkScalarBarActor()
    bar.SetLookupTable(lut)
    bar.SetTitle(title)
    bar.SetNumberOfLabels(3)
    bar.SetMaximumWidthInPixels(70)
    bar.SetPosition(0.02, 0.12)
    bar.SetWidth(0.1)
    bar.SetHeight(0.5)
    bar.GetTitleTextProperty().SetFontSize(14)
    return bar


def _text(text: str, size: int = 16) -> vtk.vtkTextActor:
    actor = vtk.vtkTextActor()
    actor.SetInput(text)
    actor.GetTextProperty().SetFontSize(size)
    actor.GetTextProperty().SetColor(1, 1, 0.85)
    actor.SetPosition(10, 10)
    return actor


def grabRenderWindow(window) -> vtk.vtkImageData:
    """Render ``window`` (off-screen or not) and return a copy of what it shows (RGB)."""
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    image = vtk.vtkImageData()
    image.DeepCopy(grab.GetOutput())
    return image


def saveRenderWindow(window, path) -> vtk.vtkImageData:
    """Render ``window`` (off-screen or not) and write what it shows to the PNG file ``path``; returns the image."""
    image = grabRenderWindow(window)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    return image


def _renderToFile(renderer: vtk.vtkRenderer, path: str, size=(800, 800)) -> np.ndarray:
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.AddRenderer(renderer)
    img = saveRenderWindow(window, path)
    arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())
    dims = img.GetDimensions()
    window.Finalize()
    return arr.reshape(dims[1], dims[0], -1)[::-1]


def _normalised(a: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    ref = a[mask] if mask is not None and mask.any() else a
    lo, hi = np.percentile(ref, [1, 99.5])
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)


def compositeImage(xray: np.ndarray, drr: np.ndarray) -> np.ndarray:
    """Red-cyan composite ``(H, W, 3)`` uint8: X-ray in green and blue, DRR in red.  Where the DRR matches the
    X-ray the picture is grey; misaligned edges show red and cyan fringes.  Outside the rendered DRR window
    (DRR = 0) the X-ray is shown in grey."""
    x = _normalised(xray)
    inside = drr > 0
    d = _normalised(drr, inside)
    r = np.where(inside, d, x)
    return (np.stack([r, x, x], -1) * 255).astype(np.uint8)


def _rgbActor(rgb: np.ndarray, ijkToWorld: np.ndarray) -> vtk.vtkImageActor:
    h, w, _ = rgb.shape
    image = vtk.vtkImageData()
    image.SetDimensions(w, h, 1)
    arr = numpy_support.numpy_to_vtk(np.ascontiguousarray(rgb.reshape(-1, 3)), deep=True)
    image.GetPointData().SetScalars(arr)
    actor = vtk.vtkImageActor()
    actor.GetMapper().SetInputData(image)
    actor.SetUserMatrix(core.vtkMatrix4x4FromArray(ijkToWorld))
    actor.InterpolateOff()
    return actor


def renderXrayView(session, path: str, *, showDRR=True, showPoints=True, showFlow=True, title: str = "",
                   size=(800, 800)) -> np.ndarray:
    """The X-ray as seen in the module's slice view (u right, rows down); with ``showDRR`` the DRR at the
    current estimate is composited in red over the X-ray in cyan (grey where they agree); contour points and
    flow vectors coloured by weight.  Returns the picture ``(H, W, 3 or 4)``."""
    proj = session.projection
    ren = vtk.vtkRenderer()
    ren.SetBackground(0.05, 0.05, 0.08)
    xrayNode = session.xrayDisplayNode
    xray = slicer.util.arrayFromVolume(xrayNode)[0].astype(np.float64)
    drr = slicer.util.arrayFromVolume(session.drrNode)[0].astype(np.float64)
    if showDRR and float(drr.max()) > 0 and drr.shape == xray.shape:
        rgb = compositeImage(xray, drr)
    else:
        g = (_normalised(xray) * 255).astype(np.uint8)
        rgb = np.stack([g, g, g], -1)
    ren.AddActor(_rgbActor(rgb, core.nodeToWorldArray(xrayNode) @ core.ijkToRASArray(xrayNode)))
    lut = _weightLUT(session.scene)
    if showFlow:
        ren.AddActor(_polyActor(session.flowNode, lut, lineWidth=2.5))
    if showPoints:
        ren.AddActor(_polyActor(session.contour2DNode, lut, pointSize=6.0))
    if showPoints or showFlow:
        ren.AddViewProp(_scalarBar(lut))
    if title:
        ren.AddViewProp(_text(title))
    # camera on the source side of the detector, looking along the beam, image rows downwards
    s2r = core.sliceToRASForXray(proj)
    centre = s2r[:3, 3]
    cam = ren.GetActiveCamera()
    cam.ParallelProjectionOn()
    cam.SetFocalPoint(*centre)
    cam.SetPosition(*(centre + 500.0 * s2r[:3, 2]))
    cam.SetViewUp(*s2r[:3, 1])
    ps = proj.pixel_spacing[0].numpy()
    cam.SetParallelScale(0.5 * max(proj.height * ps[1], proj.width * ps[0]) * 1.02)
    ren.ResetCameraClippingRange()
    return _renderToFile(ren, path, size)


def render3DView(session, path: str, *, boneThresholdHU: float = 200.0, title: str = "", size=(900, 700),
                 ctNode=None) -> np.ndarray:
    """The C-arm, the X-ray on its detector, the CT bone surface at the current estimate, 3D contour points."""
    ren = vtk.vtkRenderer()
    ren.SetBackground(0.1, 0.12, 0.16)
    ren.SetBackground2(0.35, 0.4, 0.5)
    ren.GradientBackgroundOn()
    ctNode = ctNode or session.ctNode
    # bone surface of the CT, shown where the registration transform puts it
    image = _indexImage(ctNode)
    shrink = vtk.vtkImageShrink3D()
    shrink.SetInputData(image)
    factor = 1 if max(image.GetDimensions()) < 200 else 2
    shrink.SetShrinkFactors(factor, factor, factor)
    shrink.AveragingOn()
    mc = vtk.vtkFlyingEdges3D()
    mc.SetInputConnection(shrink.GetOutputPort())
    mc.SetValue(0, boneThresholdHU)
    mc.ComputeNormalsOn()
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputConnection(mc.GetOutputPort())
    mapper.ScalarVisibilityOff()
    bone = vtk.vtkActor()
    bone.SetMapper(mapper)
    bone.GetProperty().SetColor(0.93, 0.88, 0.78)
    bone.GetProperty().SetOpacity(0.35)
    scale = np.diag([factor, factor, factor, 1.0])
    m = core.nodeToWorldArray(ctNode) @ core.ijkToRASArray(ctNode) @ scale
    bone.SetUserMatrix(core.vtkMatrix4x4FromArray(m))
    ren.AddActor(bone)
    ren.AddActor(_imageActor(session.xrayDisplayNode, _greyLUT(session.xrayDisplayNode)))
    lut = _weightLUT(session.scene)
    ren.AddActor(_polyActor(session.carmNode, None, lineWidth=2.0, color=(0.95, 0.75, 0.2)))
    ren.AddActor(_polyActor(session.contour3DNode, lut, pointSize=5.0))
    ren.AddActor(_polyActor(session.contour2DNode, lut, pointSize=3.0))
    ren.AddViewProp(_scalarBar(lut))
    if title:
        ren.AddViewProp(_text(title))
    ren.ResetCamera()
    cam = ren.GetActiveCamera()
    proj = session.projection
    src = proj.source[0].numpy()
    det = core.sliceToRASForXray(proj)[:3, 3]
    mid = (src + det) / 2
    beam = (det - src) / np.linalg.norm(det - src)
    side = np.cross(beam, [0.0, 0.0, 1.0])
    side = side / (np.linalg.norm(side) or 1.0)
    cam.SetFocalPoint(*mid)
    cam.SetPosition(*(mid + 1500.0 * side + 500.0 * np.array([0, 0, 1.0]) - 300 * beam))
    cam.SetViewUp(0, 0, 1)
    ren.ResetCamera()
    cam.Zoom(1.25)
    ren.ResetCameraClippingRange()
    return _renderToFile(ren, path, size)
