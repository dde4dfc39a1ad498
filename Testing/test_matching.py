"""Tests of the classic 2D matching (matching.py): sub-pixel accuracy, polarity, rejection, robust weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.matching import (MatchResult, displacement_consistency, match_along_normals,
                                         robust_weights)
from PPCRegistrationLib.volume import Volume
from PPCRegistrationLib.io import read_volume as _read

H = W = 160
R0 = 40.0


def _grad(img: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """(B, H, W) -> (B, 2, H, W) Gaussian-smoothed central differences (d/du, d/dv)."""
    r = int(3 * sigma) + 1
    x = torch.arange(-r, r + 1, dtype=img.dtype)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    im = img[:, None]
    im = F.conv2d(F.pad(im, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    im = F.conv2d(F.pad(im, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    gu, gv = torch.zeros_like(im), torch.zeros_like(im)
    gu[..., 1:-1] = (im[..., 2:] - im[..., :-2]) / 2
    gv[..., 1:-1, :] = (im[..., 2:, :] - im[..., :-2, :]) / 2
    return torch.cat([gu, gv], 1)


def _scene(c: torch.Tensor) -> torch.Tensor:
    """A bright disc with an inner disc and a vertical edge nearby (clutter), centred at c (pixels)."""
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                          indexing="ij")
    r = torch.sqrt((u - c[0]) ** 2 + (v - c[1]) ** 2)
    img = torch.sigmoid((R0 - r) / 1.5) + 0.5 * torch.sigmoid((25 - r) / 1.0) + 0.3 * torch.sigmoid((u - c[0] - 50))
    return img[None]


def _circle_case(shift: torch.Tensor, n: int = 120):
    c0 = torch.tensor([80.0, 78.0])
    phi = torch.linspace(0, 2 * math.pi, n + 1)[:-1]
    nrm = torch.stack([phi.cos(), phi.sin()], -1)
    p = c0 + R0 * nrm
    # exact distance along the normal from p to the shifted circle
    q = p - c0 - shift
    qn = (q * nrm).sum(-1)
    true = -qn + torch.sqrt(qn ** 2 - (q * q).sum(-1) + R0 ** 2)
    return _scene(c0), _scene(c0 + shift), p, nrm, true


@pytest.mark.parametrize("step", [1.0, 0.5])
def test_subpixel_shift_recovered(step):
    shift = torch.tensor([2.37, -1.61])
    a, b, p, nrm, true = _circle_case(shift)
    res = match_along_normals(_grad(a), _grad(b), p[None], nrm[None], None, step_px=step)
    assert isinstance(res, MatchResult)
    assert res.uv_matched.shape == (1, 120, 2) and res.score.shape == (1, 120) and res.valid.shape == (1, 120)
    assert bool(res.valid.all())
    err = (res.offset_px[0] - true).abs()
    assert float(err.max()) < 0.3
    assert torch.allclose(res.uv_matched, p[None] + res.offset_px[..., None] * nrm[None], atol=1e-5)
    assert torch.allclose(res.displacement, res.uv_matched - p[None], atol=1e-5)
    assert float(res.score.min()) > 0.8 and not bool(res.inverted.any())


def test_polarity_auto_and_inverted():
    a, b, p, nrm, true = _circle_case(torch.tensor([-1.3, 0.45]))
    inv = match_along_normals(_grad(a), _grad(-b), p[None], nrm[None])
    assert bool(inv.inverted.all()) and bool(inv.valid.all())
    assert float((inv.offset_px[0] - true).abs().max()) < 0.3
    forced = match_along_normals(_grad(a), _grad(-b), p[None], nrm[None], polarity="inverted")
    assert torch.allclose(forced.offset_px, inv.offset_px)
    wrong = match_along_normals(_grad(a), _grad(-b), p[None], nrm[None], polarity="same")
    assert float((wrong.offset_px[0] - true).abs()[wrong.valid[0]].median()) > 1.0 or \
        float(wrong.valid.float().mean()) < 0.5


def test_batch_mask_and_boundary():
    s1, s2 = torch.tensor([1.2, 0.7]), torch.tensor([-2.5, 1.9])
    a, b1, p, nrm, t1 = _circle_case(s1)
    _, b2, _, _, t2 = _circle_case(s2)
    ga = _grad(torch.cat([a, a]))
    gb = _grad(torch.cat([b1, b2]))
    mask = torch.ones(2, 120, dtype=torch.bool)
    mask[:, ::3] = False
    res = match_along_normals(ga, gb, torch.stack([p, p]), torch.stack([nrm, nrm]), mask)
    assert not bool(res.valid[~mask].any()) and float(res.score[~mask].abs().max()) == 0.0
    assert torch.equal(res.uv_matched[~mask], torch.stack([p, p])[~mask])
    for i, t in enumerate((t1, t2)):
        assert float((res.offset_px[i] - t)[mask[i]].abs().max()) < 0.3
    # a shift beyond the search range: no match may be claimed inside the range
    a, b3, p, nrm, t3 = _circle_case(torch.tensor([7.0, 0.0]))
    far = match_along_normals(_grad(a), _grad(b3), p[None], nrm[None], search_px=3.0)
    big = t3.abs() > 4.0
    assert int(big.sum()) > 20 and not bool(far.valid[0][big].any())
    assert float(far.offset_px.abs().max()) <= 3.0


def test_low_scores_on_noise():
    a, _, p, nrm, _ = _circle_case(torch.tensor([0.0, 0.0]))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, H, W, generator=g)
    res = match_along_normals(_grad(a), _grad(noise), p[None], nrm[None])
    assert float(res.valid.float().mean()) < 0.4
    assert float(res.score.median()) < 0.1 and float(res.score.mean()) < 0.1
    # a flat X-ray gives nothing at all
    flat = match_along_normals(_grad(a), torch.zeros(1, 2, H, W), p[None], nrm[None])
    assert not bool(flat.valid.any())


def test_input_errors():
    g = torch.zeros(1, 2, 20, 20)
    uv = torch.zeros(1, 3, 2)
    with pytest.raises(InputError):
        match_along_normals(g, g[:, :1], uv, uv)
    with pytest.raises(InputError):
        match_along_normals(g, g, uv, uv, polarity="maybe")
    empty = match_along_normals(g, g, torch.zeros(1, 0, 2), torch.zeros(1, 0, 2))
    assert empty.valid.shape == (1, 0)


def test_robust_weights_and_consistency():
    r = torch.tensor([[0.1, -0.2, 0.15, 0.05, -0.1, 8.0, 0.0]])
    valid = torch.tensor([[True, True, True, True, True, True, False]])
    w = robust_weights(r, valid)
    assert w.shape == (1, 7) and float(w[0, 5]) == 0.0 and float(w[0, 6]) == 0.0
    assert bool((w[0, :5] > 0.9).all())
    wh = robust_weights(r, valid, kind="huber", scale=0.5)
    assert float(wh[0, 0]) == 1.0 and 0 < float(wh[0, 5]) < 0.2
    # 2D residual vectors use their norms
    assert torch.allclose(robust_weights(torch.stack([r, torch.zeros_like(r)], -1), valid), w)
    # a smooth displacement field with one outlier
    g = torch.Generator().manual_seed(0)
    uv = torch.rand(1, 60, 2, generator=g) * 100
    disp = torch.tensor([1.5, -0.5]).expand(1, 60, 2).clone()
    disp[0, 7] = torch.tensor([-6.0, 4.0])
    res = displacement_consistency(uv, disp, torch.ones(1, 60, dtype=torch.bool))
    assert float(res[0, 7]) > 5.0 and float(res[0, torch.arange(60) != 7].max()) < 1e-5
    wts = robust_weights(res, torch.isfinite(res))
    assert float(wts[0, 7]) == 0.0 and float(wts[0, 0]) == 1.0


# ----------------------------------------------------------------------------- real CT


def _simple_drr(ct: Volume, proj, T: torch.Tensor, n_steps: int = 192) -> torch.Tensor:
    """Test-only perspective ray marcher (used when drr.py is not available): sum of mu along each ray."""
    from PPCRegistrationLib.geometry import invert_rigid
    from PPCRegistrationLib.volume import hu_to_mu

    h, w = proj.height, proj.width
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                          indexing="ij")
    uv = torch.stack([u, v], -1).reshape(1, -1, 2)
    dirs = proj.ray_directions(uv)  # (1, HW, 3)
    src = proj.source
    # rays in the CT frame (fixed CT seen by the moved camera)
    tinv = invert_rigid(T)
    s_ct = (tinv[:, :3, :3] @ src[..., None])[..., 0] + tinv[:, :3, 3]
    d_ct = dirs @ tinv[:, :3, :3].transpose(-1, -2)
    dist = (ct.center_world() - s_ct).norm(dim=-1)
    half = 0.5 * float((ct.corners_world().max(0).values - ct.corners_world().min(0).values).norm())
    ts = torch.linspace(float(dist) - half, float(dist) + half, n_steps, dtype=torch.float64)
    pts = s_ct[:, None, None] + d_ct[:, :, None] * ts[None, None, :, None]  # (1, HW, S, 3)
    ijk = ct.world_to_index(pts)
    size = torch.tensor([ct.shape[2] - 1, ct.shape[1] - 1, ct.shape[0] - 1], dtype=torch.float64)
    grid = (2 * ijk / size - 1).to(torch.float32).reshape(1, 1, h * w, n_steps, 3)
    mu = hu_to_mu(ct.data)[None, None]
    vals = F.grid_sample(mu, grid, align_corners=True, padding_mode="zeros")
    step = float(ts[1] - ts[0])
    return (vals.reshape(1, h * w, n_steps).sum(-1) * step).reshape(1, h, w)


def test_matching_on_real_ct(lumbar_ct_path, lumbar_labels_path):
    from PPCRegistrationLib.features import contour_mask, extract_surface_points, project_normals
    from PPCRegistrationLib.geometry import Projection, carm_pose, rotate_vectors, transform_points, translation_matrix
    from PPCRegistrationLib.roi import roi_from_vertebra

    ct, lab = _read(lumbar_ct_path), _read(lumbar_labels_path)
    sp = extract_surface_points(ct, roi_from_vertebra(lab, "L3"), budget=2000)
    iso = sp.points.mean(0)
    proj = Projection.from_carm(carm_pose(0.0, 0.0, 750.0, iso, "LPS"), 1200.0, 200, 200, 1.5)
    try:
        from PPCRegistrationLib.drr import DRRRenderer

        render = DRRRenderer(ct).render
    except (ImportError, AttributeError):
        render = lambda p, T: _simple_drr(ct, p, T)  # noqa: E731
    t_gt = torch.eye(4, dtype=torch.float64)[None]
    delta = torch.tensor([2.0, -1.5, 1.5], dtype=torch.float64)
    t_k = translation_matrix(3.0 * delta / delta.norm())[None]  # the two poses are 3 mm apart
    g_x = _grad(render(proj, t_gt).float())
    g_d = _grad(render(proj, t_k).float())
    P, G = sp.points[None], sp.gradients[None]
    m = contour_mask(P, G, proj.source, t_k, 5.0)
    pm, gm = transform_points(t_k, P), rotate_vectors(t_k, G)
    uv, n = proj.project(pm), project_normals(proj, pm, gm)
    true = ((proj.project(transform_points(t_gt, P)) - uv) * n).sum(-1).float()[0]
    res = match_along_normals(g_d, g_x, uv.float(), n.float(), m)
    v = res.valid[0]
    assert int(m.sum()) > 50
    assert float(v.sum()) > 0.8 * float(m.sum())
    assert float(true[m[0]].abs().median()) > 1.0  # the test is meaningful: points move by pixels
    err = (res.offset_px[0] - true)[v]
    assert float(err.abs().median()) < 0.5  # pixels (1 px = 0.94 mm at the isocentre)
    assert abs(float(res.offset_px[0][v].median() - true[v].median())) < 0.3
    assert abs(float(err.median())) < 0.2  # unbiased
    # re-weighting keeps the good matches: weighted mean error well below the displacement
    cons = displacement_consistency(uv.float(), res.displacement, res.valid)
    wts = robust_weights(cons, res.valid) * res.score
    werr = float(((res.offset_px[0] - true).abs() * wts[0]).sum() / wts[0].sum())
    assert werr < 0.6 < float(true[m[0]].abs().mean())
