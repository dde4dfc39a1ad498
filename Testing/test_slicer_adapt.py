"""The Slicer module's "Adapt to this CT" job (Qt-free logic, on a real headless MRML scene): the CT and label map
nodes written out, ``ppcreg adapt`` in a child process that the GUI polls, and Cancel keeping the previous model."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PPCRegistration"))

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("this 'slicer' package has no MRML scene", allow_module_level=True)

from PPCRegistrationLogic import core  # noqa: E402
from PPCRegistrationLogic.adapt import AdaptJob, startAdaptation  # noqa: E402

from PPCRegistrationLib.io import read_label_map, read_volume  # noqa: E402
from PPCRegistrationLib.model_files import load_model, save_model  # noqa: E402
from PPCRegistrationLib.normal_matcher import NormalMatcherNet  # noqa: E402


@pytest.fixture(scope="module")
def popi_files(shared_data, tmp_path_factory):
    """The POPI CT and labels loaded as MRML volume nodes (RAS), exported and started like the module's button."""
    ct = read_volume(shared_data / "popi_thorax" / "ct.nii.gz")
    labels = read_label_map(shared_data / "popi_thorax" / "labels.nii.gz", reference=ct)
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
    scene = slicer.vtkMRMLScene()
    nodes = []
    for cls, vol in (("vtkMRMLScalarVolumeNode", ct), ("vtkMRMLLabelMapVolumeNode", labels)):
        node = scene.AddNewNodeByClass(cls)
        slicer.util.updateVolumeFromArray(node, vol.data.numpy())
        core.setIJKToRAS(node, (flip @ vol.ijk_to_world.to(torch.float64)).numpy())
        nodes.append(node)
    folder = tmp_path_factory.mktemp("adapt")
    model = folder / "init.pt"
    save_model(model, NormalMatcherNet(), {"solver": {"out_of_plane": 0.0, "regularization": 1e-5}})
    with pytest.raises(ValueError, match="label map"):
        startAdaptation(nodes[0], None, "T8")
    with pytest.raises(ValueError, match="vertebra"):
        startAdaptation(nodes[0], nodes[1], " ")
    job = startAdaptation(nodes[0], nodes[1], "T8", budgetS=3, model=str(model), folder=folder / "job",
                          valCases=2)
    ct_path, lab_path = job.cmd[job.cmd.index("--ct") + 1], job.cmd[job.cmd.index("--labels") + 1]
    back = read_volume(ct_path)  # written in LPS, as the library reads files
    assert torch.allclose(back.ijk_to_world.to(torch.float64), ct.ijk_to_world.to(torch.float64), atol=1e-4)
    assert set(torch.unique(read_label_map(lab_path).data).tolist()) == set(torch.unique(labels.data).tolist())
    yield ct_path, lab_path, model, job
    scene.Clear(1)


def _wait_for(job: AdaptJob, text: str, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while text not in (job.logPath.read_text(errors="replace") if job.logPath.exists() else ""):
        assert job.process.poll() is None, job.logPath.read_text()
        assert time.monotonic() - t0 < timeout, f"no {text!r} in the log within {timeout} s"
        time.sleep(0.2)


def test_an_adaptation_job_writes_a_model_and_a_cancelled_one_keeps_it(popi_files, tmp_path):
    ct_path, lab_path, model, job = popi_files
    out = job.outDir
    assert AdaptJob(ct_path, lab_path, "T8", tmp_path).poll()["state"] == "idle"
    first = job.poll()
    assert first["state"] in ("running", "done") and 0 <= first["fraction"] <= 1
    done = job.wait(timeout=300)
    assert done["state"] == "done", job.logPath.read_text()
    net, meta = load_model(job.modelPath, "normal_matcher")
    assert meta["stopped"] == "time budget"
    sha = hashlib.sha256(job.modelPath.read_bytes()).hexdigest()

    again = AdaptJob(ct_path, lab_path, "T8", out, model=str(model), budgetS=600, valCases=2)
    again.start()
    _wait_for(again, "training patients")
    again.cancel()
    res = again.wait(timeout=120)
    assert res["state"] == "cancelled", again.logPath.read_text()
    assert hashlib.sha256(job.modelPath.read_bytes()).hexdigest() == sha


def test_a_failed_adaptation_reports_the_reason(popi_files, tmp_path):
    ct_path, lab_path, model, _ = popi_files
    job = AdaptJob(ct_path, lab_path, "L3", tmp_path / "x", model=str(model), budgetS=3)  # POPI has no L3
    job.start()
    res = job.wait(timeout=120)
    assert res["state"] == "failed" and "L3" in res["message"]
