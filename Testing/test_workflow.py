"""PPCRegistrationLogic.workflow (what the browser app drives) on slicer-core's MRML scene with the real CTs:
the sample case from loading to the exported transform, a zipped DICOM series, a DICOM XA with C-arm tags, and
bad inputs that leave the loaded case as it was."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PPCRegistration"))

slicer = pytest.importorskip("slicer", reason="needs slicer-core (requirements-test.txt)")
from PPCRegistrationLogic import core, workflow  # noqa: E402

WorkflowError = workflow.WorkflowError


@pytest.fixture
def wf(tmp_path, one_torch_thread):
    return workflow.Workflow(slicer.vtkMRMLScene(), tmp_path / "work")


def test_sample_case_from_loading_to_the_exported_transform(wf, chest_ct_paths, tmp_path):
    assert "sample" in wf.loadSample()
    names = wf.vertebrae()
    assert "T8" in names and names.index("T1") < names.index("T12") and wf.vertebra == "T8"
    wf.simulate(10.0, seed=0)
    T0 = wf.initialPose()
    assert wf.mtre(T0) == pytest.approx(10.0, abs=1e-6)
    # the six offsets: a translation moves the initial pose by exactly that much, a rotation about the centre
    T = wf.setOffsets([0, 0, 0, 5.0, 0, 0])
    assert np.allclose(T[:3, 3] - T0[:3, 3], [5.0, 0, 0]) and np.allclose(T[:3, :3], T0[:3, :3])
    T = wf.setOffsets([0, 0, 10.0, 0, 0, 0])
    centre = T0[:3, :3] @ wf.roiCentreWorld() + T0[:3, 3]
    assert np.allclose(T[:3, :3] @ np.linalg.inv(T0[:3, :3]) @ [0, 0, 1], [0, 0, 1])  # about z
    assert np.allclose(T @ np.linalg.inv(T0) @ [*centre, 1.0], [*centre, 1.0])  # the centre stays
    with pytest.raises(WorkflowError, match="numbers"):
        wf.setOffsets([0, 0, float("nan"), 0, 0, 0])
    # a pose moved by hand (the X-ray view's handles) becomes the initial pose, through the same six offsets
    from PPCRegistrationLib.geometry import se3_exp

    moved = se3_exp(torch.tensor([0.05, -0.02, 0.1, 3.0, -7.0, 2.0], dtype=torch.float64)).numpy() @ T0
    offsets = wf.setInitialPose(moved)
    assert np.allclose(wf.initialPose(), moved, atol=1e-9) and np.allclose(wf.offsets, offsets)
    with pytest.raises(WorkflowError):
        wf.setInitialPose(np.diag([1.0, 1.0, -1.0, 1.0]))  # a mirror is not a pose
    wf.setOffsets(np.zeros(6))
    assert np.allclose(wf.initialPose(), T0)
    reg = wf.start("classic", "cpu")
    for _ in range(3):
        wf.session.step()
    assert np.allclose(core.transformToWorldArray(wf.session.transformNode), reg.T.numpy())
    paths = wf.exportTransform(tmp_path / "out")
    from PPCRegistrationLib.formats import load_transform

    record = load_transform(paths["json"])
    assert record.frame == "RAS" and np.allclose(record.matrix.numpy(), reg.T.numpy())
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(paths["h5"]))
    assert storage.ReadData(node)
    assert np.allclose(core.transformToWorldArray(node), reg.T.numpy(), atol=1e-6)


def test_zipped_dicom_series_unpacks_inside_the_work_folder(wf, shared_data, tmp_path):
    series = sorted((shared_data / "ct_dicom_series").glob("*.dcm"))
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in series:
            zf.write(f, f"patient/series/{f.name}")
        zf.writestr("../../outside.txt", "a member that tries to leave the folder")
    wf.loadCT(archive)
    assert slicer.util.arrayFromVolume(wf.ctNode).shape == (20, 512, 512)
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path.parent / "outside.txt").exists()
    assert any(p.name.endswith("outside.txt") for p in wf.workDir.rglob("*"))  # flattened into the folder
    with pytest.raises(WorkflowError, match="label map"):
        wf.simulate(10.0)  # no label map: said so


def test_bad_inputs_leave_the_case_and_a_real_dicom_xa_loads(wf, lumbar_ct_path, lumbar_labels_path, tmp_path):
    import SimpleITK as sitk

    wf.loadCT(lumbar_ct_path, lumbar_labels_path)
    wf.setVertebra("L3")
    wf.simulate(10.0, seed=1)
    ct, case = wf.ctNode, wf.case
    # not an image; a 2D image as the CT; a 3D image as the X-ray; an X-ray without its geometry
    junk = tmp_path / "ct.nii.gz"
    junk.write_bytes(b"not a NIfTI file" * 64)
    with pytest.raises(WorkflowError):
        wf.loadCT(junk)
    png = tmp_path / "flat.png"
    sitk.WriteImage(sitk.Image([64, 48], sitk.sitkUInt8) + 100, str(png))
    with pytest.raises(WorkflowError, match="not a file type"):
        wf.loadCT(tmp_path / "notes.txt")
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image([64, 48], sitk.sitkInt16), str(flat))
    with pytest.raises(WorkflowError, match="2D"):
        wf.loadCT(flat)
    vol = tmp_path / "volume.nrrd"
    sitk.WriteImage(sitk.Image([16, 16, 8], sitk.sitkFloat32), str(vol))
    with pytest.raises(WorkflowError, match="3D"):
        wf.loadXray(vol)
    with pytest.raises(WorkflowError):
        wf.loadXray(png)  # a PNG has neither pixel spacing nor C-arm geometry
    with pytest.raises(WorkflowError, match="L9"):
        wf.setVertebra("L9")
    with pytest.raises(WorkflowError, match="positive size"):
        wf.setBox([0, 0, 0], [10, 0, 10])
    assert wf.ctNode is ct and wf.case is case and ct.GetScene() is wf.scene
    assert case.xrayNode.GetScene() is wf.scene and wf.mtre(wf.initialPose()) == pytest.approx(10.0, abs=1e-6)
    # a box outside the CT is an empty region: a clear error at Start, the case kept
    centre = wf.roiCentreWorld()
    wf.setBox(centre + [0.0, 400.0, 0.0], [20.0, 20.0, 20.0])
    with pytest.raises(WorkflowError, match="contains no voxels"):
        wf.start()
    wf.setVertebra("L3")
    # a DICOM XA with C-arm tags: its geometry aimed at the vertebra, no ground truth
    arr = (np.random.default_rng(0).random((96, 128)) * 1000).astype(np.uint16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.2, 1.2))
    for k, v in {"0008|0060": "XA", "0018|1110": "1150", "0018|1111": "760", "0018|1510": "15",
                 "0018|1511": "-5"}.items():
        img.SetMetaData(k, v)
    xa = tmp_path / "xa.dcm"
    sitk.WriteImage(img, str(xa))
    wf.loadXray(xa)
    assert wf.case is not case and wf.case.T_gt is None and wf.mtre(wf.initialPose()) is None
    assert (wf.case.projection.height, wf.case.projection.width) == (96, 128)
    assert float(wf.case.projection.sdd[0]) == pytest.approx(1150.0)
    iso = wf.roiCentreWorld()
    uv = wf.case.projection.project(torch.tensor(iso)[None, None])[0, 0]
    assert np.allclose(uv.numpy(), [63.5, 47.5], atol=1e-6)  # the vertebra at the image centre
    assert not case.xrayNode.GetScene()  # the previous X-ray was replaced, not kept beside it


def test_real_radiograph_loads_on_the_registration_grid(wf, lumbar_ct_path, lumbar_labels_path, tmp_path_factory):
    """The real CR chest radiograph RG1 (1955 x 1841 px, MONOCHROME1, no spacing or C-arm tags) with the values a
    user types: averaged down to the registration grid, its geometry from that grid, bone bright."""
    from PPCRegistrationLib import sample_data
    from PPCRegistrationLib.xray_io import REGISTRATION_GRID_PX

    try:  # the same cache as test_io.py's
        rg1 = sample_data.fetch_radiograph(cache_dir=tmp_path_factory.getbasetemp() / "ppcreg-sample-cache",
                                           progress=False)
    except Exception as exc:  # no network / registry
        pytest.skip(f"sample radiograph unavailable: {exc}")
    wf.loadCT(lumbar_ct_path, lumbar_labels_path)
    wf.setVertebra("L3")
    with pytest.raises(WorkflowError, match="pixel spacing"):
        wf.loadXray(rg1)
    wf.loadXray(rg1, 0.2, sddMM=1800.0, sidMM=1700.0, primaryDeg=0.0, secondaryDeg=0.0)
    proj = wf.case.projection
    assert (proj.height, proj.width) == (1955 // 4, 1841 // 4) and max(proj.height, proj.width) <= REGISTRATION_GRID_PX
    assert torch.allclose(proj.pixel_spacing[0], torch.tensor([0.8, 0.8], dtype=torch.float64))
