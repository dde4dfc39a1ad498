"""The PPC solve: recovers known motions, is differentiable (gradcheck), flags rank-deficient systems."""

import pytest
import torch

from PPCRegistrationLib.errors import InputError, RankDeficientError
from PPCRegistrationLib.geometry import Projection, carm_pose, centred_update, se3_exp, transform_points
from PPCRegistrationLib.metrics import mtre
from PPCRegistrationLib.ppc import solve_ppc, solve_ppc_strict


def _sphere_contours(n=400, seed=0, radius=40.0):
    """Points on a sphere with outward normals, seen by a C-arm; returns points, gradients, proj."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, 3, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    # an ellipsoid-ish blob: radius varies so that the normals are not all radial
    scale = torch.tensor([1.0, 0.7, 1.3], dtype=torch.float64)
    pts = d * radius * scale
    grads = d / scale  # gradient of the implicit ellipsoid function
    proj = Projection.from_carm(carm_pose(20.0, 10.0, 780.0, torch.zeros(3)), 1200.0, 256, 256, 1.5)
    return pts, grads, proj


def _correspondences(pts, grads, proj, T_true):
    """Exact correspondences of the moved points: rays through the projections of T_true * w."""
    moved = transform_points(T_true, pts)[None]
    uv = proj.project(moved)
    return proj.ray_directions(uv)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_small_known_motion(seed):
    pts, grads, proj = _sphere_contours(seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    dv_true = torch.randn(6, generator=g, dtype=torch.float64) * torch.tensor([0.01] * 3 + [1.0] * 3, dtype=torch.float64)
    centre = pts.mean(0, keepdim=True)
    T_true = centred_update(dv_true[None], centre, torch.eye(4, dtype=torch.float64)[None])[0]
    rays = _correspondences(pts, grads, proj, T_true)
    sol = solve_ppc(pts[None], grads[None], proj.source, rays)
    assert not bool(sol.rank_deficient[0])
    # first-order solve: the rotation is recovered to second order; the translation along the beam is the
    # weakly determined direction of a single view, so it is checked through the mTRE
    assert torch.allclose(sol.dv[0, :3], dv_true[:3], atol=5e-4)
    T_est = centred_update(sol.dv, sol.centre, torch.eye(4, dtype=torch.float64)[None])[0]
    assert float(mtre(T_est, T_true, pts)) < 0.05 * float(mtre(torch.eye(4, dtype=torch.float64), T_true, pts))


def test_iterating_converges_to_exact_motion():
    pts, grads, proj = _sphere_contours(seed=3)
    dv_true = torch.tensor([0.08, -0.05, 0.1, 5.0, -8.0, 3.0], dtype=torch.float64)
    T_true = centred_update(dv_true[None], pts.mean(0, keepdim=True), torch.eye(4, dtype=torch.float64)[None])[0]
    rays = _correspondences(pts, grads, proj, T_true)
    T = torch.eye(4, dtype=torch.float64)
    for _ in range(8):
        w = transform_points(T, pts)
        g = grads @ T[:3, :3].T
        sol = solve_ppc(w[None], g[None], proj.source, rays)
        T = centred_update(sol.dv, sol.centre, T[None])[0]
    assert float(mtre(T, T_true, pts)) < 1e-6


def test_weights_reject_outliers():
    pts, grads, proj = _sphere_contours(seed=4)
    dv_true = torch.tensor([0.0, 0.01, 0.0, 1.0, 0.5, -0.5], dtype=torch.float64)
    T_true = centred_update(dv_true[None], pts.mean(0, keepdim=True), torch.eye(4, dtype=torch.float64)[None])[0]
    moved = transform_points(T_true, pts)[None]
    uv = proj.project(moved)
    uv[0, :40] += 25.0  # 10 % gross outliers
    rays = proj.ray_directions(uv)
    w = torch.ones(1, pts.shape[0], dtype=torch.float64)
    bad = solve_ppc(pts[None], grads[None], proj.source, rays, w)
    w[0, :40] = 0
    good = solve_ppc(pts[None], grads[None], proj.source, rays, w)
    eye = torch.eye(4, dtype=torch.float64)[None]
    err_good = float(mtre(centred_update(good.dv, good.centre, eye)[0], T_true, pts))
    err_bad = float(mtre(centred_update(bad.dv, bad.centre, eye)[0], T_true, pts))
    assert err_good < 0.05 and err_bad > 10 * err_good


def test_batched_equals_single():
    pts, grads, proj = _sphere_contours(seed=5)
    rays = _correspondences(pts, grads, proj, se3_exp(torch.tensor([0.01, 0, 0, 1, 2, 3], dtype=torch.float64)))
    w = torch.rand(3, pts.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sol = solve_ppc(pts[None].expand(3, -1, -1), grads[None].expand(3, -1, -1), proj.source.expand(3, 3),
                    rays.expand(3, -1, -1), w)
    for b in range(3):
        s = solve_ppc(pts[None], grads[None], proj.source, rays, w[b:b + 1])
        assert torch.allclose(s.dv, sol.dv[b:b + 1], atol=1e-10)


def test_gradcheck_through_the_solve():
    pts, grads, proj = _sphere_contours(n=12, seed=6)
    rays = _correspondences(pts, grads, proj, se3_exp(torch.tensor([0.02, -0.01, 0.01, 1, -2, 1], dtype=torch.float64)))
    w = torch.rand(1, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    w.requires_grad_(True)
    r = rays.clone().requires_grad_(True)
    c = pts.mean(0, keepdim=True)
    f = lambda ww, rr: solve_ppc(pts[None], grads[None], proj.source, rr / rr.norm(dim=-1, keepdim=True), ww, centre=c).dv
    assert torch.autograd.gradcheck(f, (w, r))


def test_rank_deficient_is_flagged_and_finite():
    pts, grads, proj = _sphere_contours(seed=7)
    rays = _correspondences(pts, grads, proj, torch.eye(4, dtype=torch.float64))
    # all weights zero
    sol = solve_ppc(pts[None], grads[None], proj.source, rays, torch.zeros(1, pts.shape[0], dtype=torch.float64))
    assert bool(sol.rank_deficient[0]) and torch.isfinite(sol.dv).all()
    # three points only
    sol = solve_ppc(pts[None, :3], grads[None, :3], proj.source, rays[:, :3])
    assert bool(sol.rank_deficient[0]) and torch.isfinite(sol.dv).all()
    # a degenerate configuration: all normals identical (a plane) cannot fix in-plane motion
    flat_g = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64).expand_as(grads)
    sol = solve_ppc(pts[None], flat_g[None], proj.source, rays)
    assert bool(sol.rank_deficient[0]) and torch.isfinite(sol.dv).all()
    with pytest.raises(RankDeficientError, match="cannot determine"):
        solve_ppc_strict(pts[None, :3], grads[None, :3], proj.source, rays[:, :3])


def test_bad_input_is_rejected():
    pts, grads, proj = _sphere_contours(n=20)
    rays = _correspondences(pts, grads, proj, torch.eye(4, dtype=torch.float64))
    bad = pts.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        solve_ppc(bad[None], grads[None], proj.source, rays)
    with pytest.raises(InputError, match="non-negative"):
        solve_ppc(pts[None], grads[None], proj.source, rays, -torch.ones(1, 20, dtype=torch.float64))
    with pytest.raises(InputError, match=r"\(B, N, 3\)"):
        solve_ppc(pts, grads, proj.source, rays[0])


def test_out_of_plane_damping_holds_depth_and_keeps_in_plane_motion():
    """The damped solve of an in-plane motion is (nearly) unchanged, a pure depth motion is held back."""
    from PPCRegistrationLib.geometry import Projection, carm_pose
    from PPCRegistrationLib.ppc import out_of_plane_damping

    torch.manual_seed(0)
    proj = Projection.from_carm(carm_pose(30.0, 10.0, 780.0, torch.zeros(3)), 1200.0, 256, 256, 1.5)
    pts = torch.randn(1, 300, 3, dtype=torch.float64) * 20
    grads = torch.randn(1, 300, 3, dtype=torch.float64)
    D = out_of_plane_damping(proj.R, 1.0)
    assert D.shape == (1, 6, 6) and torch.allclose(D, D.transpose(1, 2))
    assert float(torch.linalg.eigvalsh(D[0]).min()) > -1e-12
    ez = proj.R[0, 2]
    for t, held in ((proj.R[0, 0] * 3.0, False), (ez * 3.0, True)):
        moved = pts + t
        uv = proj.project(moved)
        rays = proj.ray_directions(uv)
        free = solve_ppc(pts, grads, proj.source, rays).dv[0, 3:]
        damped = solve_ppc(pts, grads, proj.source, rays, damping=D).dv[0, 3:]
        assert torch.allclose(free, t, atol=5e-3)
        if held:
            assert float(torch.linalg.norm(damped)) < 0.7 * 3.0
        else:
            assert torch.allclose(damped, t, atol=0.05)
