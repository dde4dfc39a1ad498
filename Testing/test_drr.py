"""Tests of the DRR renderers (PPCRegistrationLib.drr) and the image gradients (PPCRegistrationLib.gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from PPCRegistrationLib import drr, gradients
from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.geometry import Projection, carm_pose, invert_rigid, se3_exp, so3_exp
from PPCRegistrationLib.io import read_volume
from PPCRegistrationLib.volume import Volume

MU = 0.04  # 1/mm: HU +1000 with mu_water 0.02
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------- phantoms


def _phantom_geometry() -> torch.Tensor:
    """ijk_to_world of a ~1 mm phantom grid with flipped axes (like an LPS NIfTI) and an odd origin."""
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = torch.diag(torch.tensor([-1.0, -0.9, 1.1], dtype=torch.float64))
    m[:3, 3] = torch.tensor([57.0, 40.0, -60.0], dtype=torch.float64)
    return m


_SHAPE = (104, 112, 118)  # (K, J, I)
_ROT = so3_exp(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))  # phantom frame -> world


def _phantom_volume(kind: str) -> tuple[Volume, torch.Tensor]:
    """A uniform ellipsoid or cylinder of attenuation MU in air, with linear partial-volume edges.

    Returns the volume (HU) and the shape's centre (world, mm).
    """
    m = _phantom_geometry()
    vol0 = Volume(torch.zeros(_SHAPE), m)
    centre = vol0.center_world() + torch.tensor([3.0, -2.0, 4.0], dtype=torch.float64)
    k, j, i = _SHAPE
    kk, jj, ii = torch.meshgrid(torch.arange(k, dtype=torch.float64), torch.arange(j, dtype=torch.float64),
                                torch.arange(i, dtype=torch.float64), indexing="ij")
    x = vol0.index_to_world(torch.stack([ii, jj, kk], -1))
    y = (x - centre) @ _ROT  # phantom frame
    if kind == "ellipsoid":
        a = torch.tensor(_ELLIPSOID_AXES, dtype=torch.float64)
        q = torch.linalg.norm(y / a, dim=-1)
        grad = torch.linalg.norm(y / (a * a), dim=-1) / q.clamp_min(1e-9)
        sd = (q - 1) / grad.clamp_min(1e-9)
    else:
        r, half = _CYLINDER
        rho = torch.linalg.norm(y[..., :2], dim=-1)
        sd = torch.maximum(rho - r, y[..., 2].abs() - half)
    frac = (0.5 - sd).clamp(0.0, 1.0)  # ~1 mm voxels: linear partial volume over one voxel
    hu = -1000.0 + 2000.0 * frac
    return Volume(hu.to(torch.float32), m), centre


_ELLIPSOID_AXES = (38.0, 30.0, 24.0)
_CYLINDER = (22.0, 30.0)  # radius, half length (mm)


def _chords(kind: str, centre: torch.Tensor, proj: Projection, T: torch.Tensor, grow: float = 0.0) -> torch.Tensor:
    """Exact chord lengths (mm) ``(B, H, W)`` of the pixel rays through the shape moved by ``T``.

    ``grow`` (mm) enlarges the shape's axes (radius, half length), to bound its blurred voxel edges."""
    b, h, w = T.shape[0], proj.height, proj.width
    proj = proj.expand(b)
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    uv = torch.stack([u, v], -1).reshape(1, -1, 2).expand(b, -1, 2)
    d = proj.ray_directions(uv)  # (B, N, 3) world
    c = proj.source
    tinv = invert_rigid(T)
    c_ct = (tinv[:, :3, :3] @ c[..., None])[..., 0] + tinv[:, :3, 3]
    d_ct = d @ tinv[:, :3, :3].transpose(-1, -2)
    y0 = ((c_ct - centre) @ _ROT)[:, None, :]  # (B, 1, 3) phantom frame
    g = d_ct @ _ROT  # (B, N, 3) unit
    if kind == "ellipsoid":
        a = torch.tensor(_ELLIPSOID_AXES, dtype=torch.float64) + grow
        A = ((g / a) ** 2).sum(-1)
        B = 2 * ((g * y0) / a ** 2).sum(-1)
        C = ((y0 / a) ** 2).sum(-1) - 1
        disc = (B * B - 4 * A * C).clamp_min(0)
        chord = torch.sqrt(disc) / A
    else:
        r, half = _CYLINDER[0] + grow, _CYLINDER[1] + grow
        A = (g[..., :2] ** 2).sum(-1)
        B = 2 * (g[..., :2] * y0[..., :2]).sum(-1)
        C = (y0[..., :2] ** 2).sum(-1) - r * r
        disc = (B * B - 4 * A * C).clamp_min(0)
        t1, t2 = (-B - torch.sqrt(disc)) / (2 * A), (-B + torch.sqrt(disc)) / (2 * A)
        gz = torch.where(g[..., 2].abs() < 1e-12, torch.full_like(g[..., 2], 1e-12), g[..., 2])
        z1, z2 = (-half - y0[..., 2]) / gz, (half - y0[..., 2]) / gz
        lo = torch.maximum(t1, torch.minimum(z1, z2))
        hi = torch.minimum(t2, torch.maximum(z1, z2))
        chord = (hi - lo).clamp_min(0)
    return chord.reshape(b, h, w)


def _proj(primary: float, secondary: float, iso: torch.Tensor, size: int = 64, width_mm: float = 180.0,
          sid: float = 800.0) -> Projection:
    pose = carm_pose(primary, secondary, sid, iso)
    return Projection.from_carm(pose, 1200.0, size, size, width_mm / size)


_VIEWS = [  # (primary, secondary, twist of T)
    (0.0, 0.0, (0, 0, 0, 0, 0, 0)),
    (90.0, 0.0, (0, 0, 0, 0, 0, 0)),
    (30.0, 20.0, (0, 0, 0, 0, 0, 0)),
    (-45.0, 35.0, (0.2, -0.1, 0.3, 4.0, -6.0, 3.0)),
    (60.0, -50.0, (-0.4, 0.25, 0.1, -3.0, 2.0, 5.0)),
]


def _view_T(twist) -> torch.Tensor:
    return se3_exp(torch.tensor([twist], dtype=torch.float64))


@pytest.fixture(scope="module", params=["ellipsoid", "cylinder"])
def phantom(request):
    vol, centre = _phantom_volume(request.param)
    return request.param, vol, centre


# ----------------------------------------------------------------------------- analytic accuracy


@pytest.mark.parametrize("device", DEVICES)
def test_render_matches_analytic_chords(phantom, device):
    kind, vol, centre = phantom
    renderer = drr.DRRRenderer(vol, device=device, bone_boost=1.0)  # analytic: linear in HU
    iso = vol.center_world()
    for prim, sec, twist in _VIEWS:
        proj, T = _proj(prim, sec, iso), _view_T(twist)
        img32 = renderer.render(proj, T)
        assert img32.shape == (1, 64, 64) and img32.dtype == torch.float32
        assert img32.device.type == device
        img = img32.cpu().double()
        chord = _chords(kind, centre, proj, T)
        inside = chord > 0.5 * chord.max()
        assert inside.sum() > 100, "the phantom's shadow should cover many pixels"
        rel = ((img - MU * chord).abs() / (MU * chord))[inside]
        assert rel.mean() < 0.01, f"{kind} view {prim},{sec}: mean relative error {rel.mean():.4f}"
        # outside the shadow (with a margin for the voxels' partial-volume edge) the image is empty
        outside = _chords(kind, centre, proj, T, grow=3.0) == 0
        assert outside.sum() > 100
        assert img[outside].max() < 1e-3 * float(img.max())


def test_reference_matches_analytic_chords(phantom):
    kind, vol, centre = phantom
    iso = vol.center_world()
    for prim, sec, twist in _VIEWS[::2] + [_VIEWS[3]]:
        proj, T = _proj(prim, sec, iso, size=48, width_mm=160.0), _view_T(twist)
        img = drr.render_reference(vol, proj, T, step_mm=0.5, bone_boost=1.0).double()
        chord = _chords(kind, centre, proj, T)
        inside = chord > 0.5 * chord.max()
        rel = ((img - MU * chord).abs() / (MU * chord))[inside]
        assert rel.mean() < 0.01, f"reference {kind} view {prim},{sec}: mean relative error {rel.mean():.4f}"


# ----------------------------------------------------------------------------- transform conventions


def test_moving_ct_equals_moving_camera(phantom):
    _, vol, _ = phantom
    renderer = drr.DRRRenderer(vol)
    iso = vol.center_world()
    pose = carm_pose(20.0, 10.0, 800.0, iso)
    T = se3_exp(torch.tensor([[0.15, -0.25, 0.1, 8.0, -5.0, 12.0]], dtype=torch.float64))
    moved_ct = renderer.render(Projection.from_carm(pose, 1200.0, 64, 64, 180 / 64), T)
    moved_cam = renderer.render(Projection.from_carm(invert_rigid(T) @ pose, 1200.0, 64, 64, 180 / 64),
                                torch.eye(4, dtype=torch.float64)[None])
    assert torch.allclose(moved_ct, moved_cam, rtol=1e-4, atol=1e-4 * float(moved_cam.max()))
    # and the convention x' = T x: the same as a CT whose voxels were physically moved by T
    moved_vol = Volume(vol.data, T[0] @ vol.ijk_to_world)
    physically = drr.DRRRenderer(moved_vol).render(Projection.from_carm(pose, 1200.0, 64, 64, 180 / 64),
                                                   torch.eye(4, dtype=torch.float64)[None])
    assert torch.allclose(moved_ct, physically, rtol=1e-4, atol=1e-4 * float(physically.max()))
    # a different T must give a different image (the test above is not vacuous)
    other = renderer.render(Projection.from_carm(pose, 1200.0, 64, 64, 180 / 64), invert_rigid(T))
    assert (other - moved_ct).abs().max() > 0.1 * float(moved_ct.max())


def test_batch_equals_single_renders(phantom):
    _, vol, _ = phantom
    renderer = drr.DRRRenderer(vol)
    proj = _proj(15.0, -10.0, vol.center_world())
    # the second pose turns the CT by 90 degrees so that a different marching axis is used
    twists = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                           [0.0, 0.0, math.pi / 2, 5.0, 0.0, -4.0],
                           [0.3, 0.2, -0.1, -6.0, 3.0, 2.0]], dtype=torch.float64)
    T = se3_exp(twists)
    batch = renderer.render(proj, T)
    assert batch.shape == (3, 64, 64)
    for b in range(3):
        single = renderer.render(proj, T[b:b + 1])
        assert torch.allclose(batch[b], single[0], rtol=1e-5, atol=1e-5 * float(single.max()))
    # a batch of geometries (one per pose) works too
    projs = Projection(proj.K.expand(3, 3, 3), proj.R.expand(3, 3, 3), proj.t.expand(3, 3), 64, 64,
                       proj.pixel_spacing.expand(3, 2))
    assert torch.allclose(renderer.render(projs, T), batch)
    ref = drr.render_reference(vol, proj, T, step_mm=1.0)
    for b in range(3):
        assert torch.allclose(ref[b], drr.render_reference(vol, proj, T[b:b + 1], step_mm=1.0)[0], atol=1e-4)


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def lumbar(lumbar_ct_path) -> Volume:
    return read_volume(lumbar_ct_path)


def test_lumbar_ap_matches_reference(lumbar):
    renderer = drr.DRRRenderer(lumbar)
    proj = _proj(0.0, 0.0, lumbar.center_world(), size=96, width_mm=400.0)
    T = torch.eye(4, dtype=torch.float64)[None]
    img = renderer.render(proj, T)
    ref = drr.render_reference(lumbar, proj, T, step_mm=1.0)
    assert img.shape == ref.shape == (1, 96, 96)
    assert torch.isfinite(img).all()
    body = ref > 0.1 * ref.max()
    assert body.float().mean() > 0.2, "the lumbar CT should cover a good part of the detector"
    rel = ((img - ref).abs() / ref)[body]
    assert rel.median() < 0.02, f"median relative difference {rel.median():.4f}"
    # not blank: a body-sized line integral (tens of cm of tissue) with contrast between pixels
    assert 2.0 < float(img.max()) < 40.0
    assert float(img[body].std()) > 0.1 * float(img[body].mean())
    # the spine is bright in the middle column band, with the head-foot axis along the rows
    col_profile = img[0, 30:66].mean(0)
    assert col_profile[40:56].mean() > col_profile[:10].mean()


def test_bad_inputs(lumbar):
    renderer = drr.DRRRenderer(lumbar)
    proj = _proj(0.0, 0.0, lumbar.center_world(), size=32)
    eye = torch.eye(4, dtype=torch.float64)[None]
    with pytest.raises(InputError, match="Projection"):
        renderer.render(torch.zeros(1, 32, 32), eye)
    with pytest.raises(InputError, match="NaN"):
        renderer.render(proj, torch.full((1, 4, 4), float("nan"), dtype=torch.float64))
    with pytest.raises(InputError, match="4, 4"):
        renderer.render(proj, torch.eye(3, dtype=torch.float64)[None])
    with pytest.raises(InputError, match="4, 4"):
        renderer.render(proj, torch.eye(4, dtype=torch.float64)[:3][None])
    with pytest.raises(InputError, match="rigid"):
        renderer.render(proj, 2 * eye)
    with pytest.raises(InputError, match="batch"):
        two = Projection(proj.K.expand(2, 3, 3), proj.R.expand(2, 3, 3), proj.t.expand(2, 3), 32, 32,
                         proj.pixel_spacing.expand(2, 2))
        renderer.render(two, eye.expand(3, 4, 4))
    with pytest.raises(InputError, match="Projection"):
        drr.render_reference(lumbar, torch.zeros(1, 32, 32), eye)
    with pytest.raises(InputError, match="NaN"):
        drr.render_reference(lumbar, proj, torch.full((1, 4, 4), float("nan"), dtype=torch.float64))
    with pytest.raises(InputError, match="Hounsfield"):
        drr.DRRRenderer(Volume(torch.full((8, 8, 8), -1000.0), torch.eye(4, dtype=torch.float64)))


def test_downsampled_renderer_stays_close(lumbar):
    """max_voxel_mm and explicit step_mm change the sampling but not the image (much)."""
    proj = _proj(30.0, 10.0, lumbar.center_world(), size=64, width_mm=400.0)
    T = torch.eye(4, dtype=torch.float64)[None]
    fine = drr.DRRRenderer(lumbar, step_mm=0).render(proj, T)
    coarse = drr.DRRRenderer(lumbar, max_voxel_mm=6.0, step_mm=6.0).render(proj, T)
    body = fine > 0.1 * fine.max()
    rel = ((coarse - fine).abs() / fine)[body]
    assert rel.median() < 0.05
    assert float(coarse.sum() / fine.sum()) == pytest.approx(1.0, abs=0.02)


# ----------------------------------------------------------------------------- image gradient


@pytest.mark.parametrize("sigma", [0.0, 1.0, 2.5])
def test_image_gradient_of_ramp(sigma):
    v, u = torch.meshgrid(torch.arange(40, dtype=torch.float32), torch.arange(50, dtype=torch.float32),
                          indexing="ij")
    img = torch.stack([2.5 * u - 1.5 * v + 3.0, -0.5 * u + 4.0 * v])
    g = gradients.image_gradient(img, sigma_px=sigma)
    assert g.shape == (2, 2, 40, 50)
    r = int(math.ceil(3 * sigma)) + 1
    inner = g[..., r:-r, r:-r]
    assert torch.allclose(inner[0, 0], torch.full_like(inner[0, 0], 2.5), atol=1e-4)
    assert torch.allclose(inner[0, 1], torch.full_like(inner[0, 1], -1.5), atol=1e-4)
    assert torch.allclose(inner[1, 0], torch.full_like(inner[1, 0], -0.5), atol=1e-4)
    assert torch.allclose(inner[1, 1], torch.full_like(inner[1, 1], 4.0), atol=1e-4)


def test_image_gradient_smooths_and_rejects_bad_input():
    img = torch.zeros(1, 31, 31)
    img[0, 15, 15] = 1.0
    g = gradients.image_gradient(img, sigma_px=2.0)
    # derivative of a Gaussian blob: antisymmetric, zero at the centre
    assert abs(float(g[0, 0, 15, 15])) < 1e-6
    assert float(g[0, 0, 15, 13]) > 0 > float(g[0, 0, 15, 17])
    assert float(g[0, 1, 13, 15]) > 0 > float(g[0, 1, 17, 15])
    with pytest.raises(InputError):
        gradients.image_gradient(torch.zeros(31, 31))


# ----------------------------------------------------------------------------- unusual geometries, autograd, bench


def test_wide_field_and_detector_inside_volume():
    kind = "ellipsoid"
    vol, centre = _phantom_volume(kind)
    renderer = drr.DRRRenderer(vol, bone_boost=1.0)  # analytic: linear in HU
    iso = vol.center_world()
    eye = torch.eye(4, dtype=torch.float64)[None]
    # a field of view so wide (150 degrees across) that no family of voxel planes suits every ray: the
    # renderer falls back to dense marching (and builds no plane stack)
    pose = carm_pose(10.0, 5.0, 150.0, iso)
    wide = Projection.from_carm(pose, 300.0, 8, 300, 8.0)
    img = renderer.render(wide, eye).double()
    assert not renderer._stacks
    chord = _chords(kind, centre, wide, eye)
    inside = chord > 0.5 * chord.max()
    assert inside.sum() > 40
    rel = ((img - MU * chord).abs() / (MU * chord))[inside]
    assert rel.mean() < 0.01
    # the detector cuts through the phantom: rays end at the detector pixel, in both renderers
    cut = Projection.from_carm(carm_pose(20.0, 10.0, 800.0, iso), 810.0, 48, 48, 100.0 / 48)
    fast = renderer.render(cut, eye)
    ref = drr.render_reference(vol, cut, eye, step_mm=0.5, bone_boost=1.0)
    full = drr.render_reference(vol, Projection.from_carm(carm_pose(20.0, 10.0, 800.0, iso), 1200.0, 48, 48,
                                                           100.0 / 48 * 1200.0 / 810.0), eye, step_mm=0.5,
                                bone_boost=1.0)
    body = ref > 0.1 * ref.max()
    assert float(((fast - ref).abs() / ref)[body].median()) < 0.01
    assert float(ref.sum()) < 0.9 * float(full.sum()), "the part beyond the detector must not be integrated"


def test_render_is_differentiable_in_T():
    vol, _ = _phantom_volume("cylinder")
    renderer = drr.DRRRenderer(vol)
    proj = _proj(10.0, 5.0, vol.center_world(), size=32)
    twist = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    img = renderer.render(proj, se3_exp(twist))
    img.sum().backward()
    assert torch.isfinite(twist.grad).all() and twist.grad.abs().sum() > 0
    # the differentiable path gives the same image as the fast in-place path
    assert torch.allclose(img.detach(), renderer.render(proj, se3_exp(twist.detach())), atol=1e-5)


def test_bench_drr_smoke():
    from PPCRegistrationLib.bench import bench_drr

    vol, _ = _phantom_volume("ellipsoid")
    res = bench_drr(vol, sizes=(24,), repeats=2, reference_step_mm=1.0, detector_width_mm=200.0)
    assert res["volume_shape"] == _SHAPE and len(res["rows"]) == 2
    for row in res["rows"]:
        assert row["render_s"] > 0 and row["reference_s"] > 0
        assert row["rel_diff_median"] < 0.02
