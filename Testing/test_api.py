"""The public API: the example of PPCRegistrationLib.api's docstring runs as written (a registration in a few lines)
on the real lumbar CT, and the file readers give what the command line reads."""

import doctest

import pytest
import torch

import PPCRegistrationLib as ppc
from PPCRegistrationLib import api


def test_the_docstring_example_registers_the_lumbar_ct(shared_data):
    lumbar = shared_data / "lumbar_ct"
    if not (lumbar / "ct.nii.gz").exists():
        pytest.skip(f"the lumbar CT is not in {lumbar} (set PPCREG_SHARED_DATA)")
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder().find(api, globs={"lumbar_dir": str(lumbar)}):
        runner.run(test)
    res = runner.summarize(verbose=False)
    assert res.attempted >= 6 and res.failed == 0


def test_read_geometry_and_transform_convert_ras_files(tmp_path):
    from PPCRegistrationLib import formats
    from PPCRegistrationLib.geometry import Projection, carm_pose

    pose = carm_pose(10.0, 5.0, 750.0, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    proj = Projection.from_carm(pose, 1200.0, 64, 64, 2.0)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, 3] = torch.tensor([1.0, 2.0, 3.0])
    formats.save_transform(tmp_path / "t.json", T, frame="RAS")
    lps = ppc.read_transform(tmp_path / "t.json")
    assert torch.allclose(lps[:3, 3], torch.tensor([-1.0, -2.0, 3.0], dtype=torch.float64))
    formats.save_geometry(tmp_path / "g.json", proj)
    got = ppc.read_geometry(tmp_path / "g.json")
    assert torch.allclose(got.matrix, proj.matrix)
    assert set(ppc.__all__) >= {"register", "Registration", "ppc_update", "read_volume", "read_xray"}
