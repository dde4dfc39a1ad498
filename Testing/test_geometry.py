"""Geometry: SE(3) exp/log, projection / back-projection, C-arm angle conventions, Volume checks."""

import math

import pytest
import torch

from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.geometry import (Projection, carm_pose, centred_update, invert_rigid, rotation_angle_deg,
                                         se3_exp, se3_log, so3_exp, so3_log, transform_points)
from PPCRegistrationLib.volume import Volume, hu_to_mu


def test_se3_exp_log_roundtrip_and_small_angles():
    g = torch.Generator().manual_seed(0)
    dv = torch.randn(64, 6, generator=g, dtype=torch.float64)
    dv[:, :3] *= 0.8  # keep rotation angles below pi, where log is the inverse of exp
    dv[:8, :3] *= 1e-7  # near-identity rotations use the Taylor branch
    assert torch.allclose(se3_log(se3_exp(dv)), dv, atol=1e-10)
    T = se3_exp(dv)
    assert torch.allclose(T[:, :3, :3].transpose(1, 2) @ T[:, :3, :3], torch.eye(3, dtype=torch.float64).expand(64, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(T[:, :3, :3]), torch.ones(64, dtype=torch.float64))


def test_so3_log_near_pi():
    axis = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    axis = axis / axis.norm()
    w = axis * (math.pi - 1e-5)
    assert torch.allclose(so3_exp(so3_log(so3_exp(w))), so3_exp(w), atol=1e-8)


def test_rodrigues_matches_matrix_exponential():
    w = torch.tensor([0.2, -0.4, 0.9], dtype=torch.float64)
    k = torch.tensor([[0, -w[2], w[1]], [w[2], 0, -w[0]], [-w[1], w[0], 0]], dtype=torch.float64)
    assert torch.allclose(so3_exp(w), torch.linalg.matrix_exp(k), atol=1e-12)


def test_exp_is_differentiable():
    dv = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda d: se3_exp(d), (dv,))


def test_invert_and_centred_update():
    g = torch.Generator().manual_seed(1)
    T = se3_exp(torch.randn(3, 6, generator=g, dtype=torch.float64))
    assert torch.allclose(T @ invert_rigid(T), torch.eye(4, dtype=torch.float64).expand(3, 4, 4), atol=1e-12)
    # a pure rotation about the centre leaves the centre fixed
    centre = torch.tensor([[10.0, -20.0, 30.0]], dtype=torch.float64)
    dv = torch.tensor([[0.1, 0.2, -0.1, 0, 0, 0]], dtype=torch.float64)
    Tn = centred_update(dv, centre, torch.eye(4, dtype=torch.float64)[None])
    assert torch.allclose(transform_points(Tn, centre[:, None])[0, 0], centre[0], atol=1e-12)
    assert float(rotation_angle_deg(Tn)[0]) == pytest.approx(math.degrees(dv[0, :3].norm()), rel=1e-9)


@pytest.mark.parametrize("frame", ["LPS", "RAS"])
def test_carm_angle_conventions(frame):
    L = torch.tensor([1.0, 0, 0] if frame == "LPS" else [-1.0, 0, 0], dtype=torch.float64)
    P = torch.tensor([0, 1.0, 0] if frame == "LPS" else [0, -1.0, 0], dtype=torch.float64)
    S = torch.tensor([0, 0, 1.0], dtype=torch.float64)
    iso = torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64)
    ap = carm_pose(0, 0, 800, iso, frame)[0]
    assert torch.allclose(ap[:3, 2], -P)  # beam posterior -> anterior
    assert torch.allclose(ap[:3, 1], -S)  # rows towards the feet
    assert torch.allclose(ap[:3, 3], iso + 800 * P)  # source posterior
    lao = carm_pose(90, 0, 800, iso, frame)[0]
    assert torch.allclose(lao[:3, 2], L, atol=1e-12)  # detector on the patient's left
    cra = carm_pose(0, 90, 800, iso, frame)[0]
    assert torch.allclose(cra[:3, 2], S, atol=1e-12)  # detector towards the head
    for T in (ap, lao, cra):
        assert float(torch.linalg.det(T[:3, :3])) == pytest.approx(1.0)


def test_projection_roundtrip_and_rays():
    pose = carm_pose(torch.tensor([15.0, -40.0]), torch.tensor([10.0, 0.0]), 780.0, torch.zeros(3))
    proj = Projection.from_carm(pose, 1200.0, 200, 300, 1.5)
    assert proj.batch == 2
    assert torch.allclose(proj.sdd, torch.full((2,), 1200.0, dtype=torch.float64))
    x = torch.randn(2, 50, 3, dtype=torch.float64) * 60
    uv = proj.project(x)
    assert torch.allclose(proj.backproject(uv, proj.depth(x)), x, atol=1e-9)
    r = proj.ray_directions(uv)
    v = x - proj.source[:, None]
    assert float(torch.linalg.cross(v, r, dim=-1).norm(dim=-1).max()) < 1e-9
    # the isocentre projects to the principal point, the source is at distance 780
    iso_uv = proj.project(torch.zeros(2, 1, 3, dtype=torch.float64))
    assert torch.allclose(iso_uv[:, 0], torch.tensor([149.5, 99.5], dtype=torch.float64).expand(2, 2), atol=1e-9)
    assert torch.allclose(proj.source.norm(dim=-1), torch.full((2,), 780.0, dtype=torch.float64))
    # P = K [R|t] agrees with project()
    xh = torch.cat([x, torch.ones_like(x[..., :1])], -1)
    p = xh @ proj.matrix.transpose(1, 2)
    assert torch.allclose(p[..., :2] / p[..., 2:], uv, atol=1e-9)
    # detector pixels are at depth SDD
    assert torch.allclose(proj.depth(proj.detector_pixel_world(uv)), torch.full((2, 50), 1200.0, dtype=torch.float64))


def test_projection_rejects_bad_input():
    pose = carm_pose(0, 0, 800, torch.zeros(3))
    with pytest.raises(InputError, match="source-to-detector"):
        Projection.from_carm(pose, -5.0, 10, 10, 1.0)
    with pytest.raises(InputError, match="NaN"):
        Projection.from_carm(pose * float("nan"), 1200.0, 10, 10, 1.0)
    with pytest.raises(InputError, match="pixel spacing"):
        Projection.from_carm(pose, 1200.0, 10, 10, 0.0)
    with pytest.raises(InputError, match="source-to-isocentre"):
        carm_pose(0, 0, 0, torch.zeros(3))


def test_volume_checks_and_helpers():
    m = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    v = Volume(torch.zeros(5, 6, 7), m)
    assert v.shape == (5, 6, 7)
    assert torch.allclose(v.spacing, torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))
    assert torch.allclose(v.center_world(), torch.tensor([6.0, 7.5, 8.0], dtype=torch.float64))
    c = v.crop((1, 2, 3), (4, 5, 5))
    assert c.shape == (2, 3, 3)
    assert torch.allclose(c.index_to_world(torch.zeros(1, 3, dtype=torch.float64)), torch.tensor([[2.0, 6.0, 12.0]], dtype=torch.float64))
    with pytest.raises(InputError, match="3 dimensions"):
        Volume(torch.zeros(5, 6), m)
    with pytest.raises(InputError, match="spacing"):
        Volume(torch.zeros(5, 6, 7), torch.diag(torch.tensor([0.0, 3.0, 4.0, 1.0], dtype=torch.float64)))
    with pytest.raises(InputError, match="NaN"):
        Volume(torch.zeros(5, 6, 7), m * float("nan"))
    with pytest.raises(InputError, match="empty"):
        v.crop((3, 0, 0), (3, 2, 2))
    mu = hu_to_mu(torch.tensor([-2048.0, -1000.0, 0.0, 1000.0]))
    assert torch.allclose(mu, torch.tensor([0.0, 0.0, 0.02, 0.04]))
