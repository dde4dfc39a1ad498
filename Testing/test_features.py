"""Tests of the 3D features (features.py): surface points, contour selection, projected normals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.features import (SurfacePoints, contour_mask, extract_surface_points,
                                         farthest_point_sampling, project_normals)
from PPCRegistrationLib.geometry import Projection, carm_pose, se3_exp, transform_points
from PPCRegistrationLib.roi import BoxROI, roi_from_vertebra
from PPCRegistrationLib.volume import Volume
from PPCRegistrationLib.io import read_volume as _read

RADIUS = 25.0


def _sphere_volume(spacing=(2.0, 2.0, 2.5), n=(40, 40, 34)) -> tuple[Volume, torch.Tensor]:
    """A 1000 HU ball (partial-volume edge) in a 0 HU box, flipped axes (LPS-like); returns (volume, centre)."""
    m = torch.eye(4, dtype=torch.float64)
    m[:3, :3] = torch.diag(torch.tensor([-spacing[0], -spacing[1], spacing[2]], dtype=torch.float64))
    m[:3, 3] = torch.tensor([30.0, -12.0, 7.0], dtype=torch.float64)
    shape = (n[2], n[1], n[0])
    vol = Volume(torch.zeros(shape), m)
    kk, jj, ii = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in shape], indexing="ij")
    w = vol.index_to_world(torch.stack([ii, jj, kk], -1))
    centre = vol.center_world() + torch.tensor([0.7, -0.4, 0.9], dtype=torch.float64)
    r = (w - centre).norm(dim=-1)
    data = (torch.clamp((RADIUS - r) / min(spacing) + 0.5, 0, 1) * 1000.0).to(torch.float32)
    return vol.with_data(data), centre


def test_sphere_surface_points_and_gradients():
    vol, centre = _sphere_volume()
    sp = extract_surface_points(vol, budget=600)
    assert isinstance(sp, SurfacePoints) and len(sp) == 600
    assert sp.points.dtype == torch.float64 and sp.gradients.shape == (600, 3)
    d = sp.points - centre
    r = d.norm(dim=-1)
    assert float((r - RADIUS).abs().max()) < 1.0  # within half a voxel of the true surface (sub-voxel)
    assert float((r - RADIUS).abs().median()) < 0.3
    # the intensity gradient points into the bone, i.e. along the inward normal (= -outward normal)
    cos = (sp.normals * (-d / r[:, None])).sum(-1)
    assert float(cos.min()) > 0.95
    # magnitude: 1000 HU step, HU/mm
    assert 50 < float(sp.gradients.norm(dim=-1).median()) < 1000
    # spatially uniform: points cover the whole sphere (all octants) and are not clumped
    octants = ((d > 0).long() * torch.tensor([1, 2, 4])).sum(-1)
    assert len(torch.unique(octants)) == 8
    nn = torch.cdist(sp.points, sp.points) + torch.eye(600, dtype=torch.float64) * 1e9
    assert float(nn.min(1).values.median()) > 1.5
    # deterministic for a seed
    sp2 = extract_surface_points(vol, budget=600)
    assert torch.equal(sp.points, sp2.points)


def test_roi_restriction_and_budget():
    vol, centre = _sphere_volume()
    box = BoxROI(centre + torch.tensor([0.0, 0.0, 20.0], dtype=torch.float64), (80.0, 80.0, 20.0))
    sp = extract_surface_points(vol, box, budget=100000, roi_margin_mm=2.0)
    dil = box.mask_on(vol, margin_mm=2.0)
    idx = torch.round(vol.world_to_index(sp.points)).long()
    assert bool(dil[idx[:, 2], idx[:, 1], idx[:, 0]].all())
    assert float(sp.points[:, 2].min()) > float(centre[2]) + 10.0 - 2.0 - 2.5
    small = extract_surface_points(vol, box, budget=50, roi_margin_mm=2.0)
    assert len(small) == 50


def test_extraction_errors():
    vol, _ = _sphere_volume()
    flat = vol.with_data(torch.zeros(vol.shape))
    with pytest.raises(InputError, match="canny_thresholds_hu_per_mm"):
        extract_surface_points(flat)
    with pytest.raises(InputError, match="bone_threshold_hu"):
        extract_surface_points(vol, bone_threshold_hu=5000.0)
    with pytest.raises(InputError, match="contains no voxels of the CT"):
        extract_surface_points(vol, BoxROI(vol.center_world() + 500.0, (10.0, 10.0, 10.0)))
    with pytest.raises(InputError):
        extract_surface_points(vol, budget=0)


def test_farthest_point_sampling_deterministic():
    x = torch.rand(500, 3, generator=torch.Generator().manual_seed(3))
    a, b = farthest_point_sampling(x, 50, seed=1), farthest_point_sampling(x, 50, seed=1)
    assert torch.equal(a, b) and len(torch.unique(a)) == 50
    assert len(farthest_point_sampling(x, 600)) == 500


def _sphere_points(n=4000, centre=(0.0, 0.0, 0.0), radius=RADIUS):
    g = torch.Generator().manual_seed(0)
    d = torch.randn(n, 3, generator=g, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    c = torch.tensor(centre, dtype=torch.float64)
    return c + radius * d, -d * 300.0  # gradient into the ball


def test_contour_mask_sphere_rim():
    centre = torch.tensor([5.0, -3.0, 10.0], dtype=torch.float64)
    pts, grads = _sphere_points(centre=centre.tolist())
    source = torch.tensor([[5.0, -750.0, 10.0]], dtype=torch.float64)
    T = se3_exp(torch.tensor([[0.1, -0.2, 0.3, 4.0, 2.0, -6.0]], dtype=torch.float64))
    theta = 5.0
    m = contour_mask(pts[None], grads[None], source, T, theta_deg=theta)
    assert m.shape == (1, 4000) and m.dtype == torch.bool
    # analytic: the moved sphere's rim seen from the source
    pm = transform_points(T, pts[None])[0]
    cm = transform_points(T, centre[None, None])[0, 0]
    nrm = (pm - cm) / RADIUS
    ray = pm - source[0]
    cosang = (nrm * ray).sum(-1).abs() / ray.norm(dim=-1)
    expect = cosang < math.sin(math.radians(theta))
    assert torch.equal(m[0], expect)
    assert 0.03 < float(m.float().mean()) < 0.15  # a band of about +-theta around the rim
    # (N,3) points broadcast over a batch of transforms
    m2 = contour_mask(pts, grads, source.expand(2, 3), T.expand(2, 4, 4), theta)
    assert m2.shape == (2, 4000) and torch.equal(m2[0], m[0])
    # zero gradients are never contour points
    assert not bool(contour_mask(pts, torch.zeros_like(grads), source, T).any())


def test_project_normals_finite_differences():
    pose = carm_pose(torch.tensor([20.0, -35.0]), torch.tensor([10.0, 5.0]), 750.0,
                     torch.tensor([1.0, 2.0, 3.0]))
    proj = Projection.from_carm(pose, 1200.0, 300, 280, 0.8, principal_point=(140.0, 155.0))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 50, 3, generator=g, dtype=torch.float64) * 60
    grad = torch.randn(2, 50, 3, generator=g, dtype=torch.float64) * 100
    n = project_normals(proj, x, grad)
    assert n.shape == (2, 50, 2)
    eps = 1e-4
    gh = grad / grad.norm(dim=-1, keepdim=True)
    fd = (proj.project(x + eps * gh) - proj.project(x - eps * gh)) / (2 * eps)
    fd = fd / fd.norm(dim=-1, keepdim=True)
    assert torch.allclose(n, fd, atol=1e-6)
    assert torch.allclose(n.norm(dim=-1), torch.ones(2, 50, dtype=torch.float64))
    # a gradient along the viewing ray has no image direction
    ray = x - proj.source[:, None]
    assert float(project_normals(proj, x, ray).abs().max()) < 1e-6


def test_l3_surface_points_real(lumbar_ct_path, lumbar_labels_path):
    ct, lab = _read(lumbar_ct_path), _read(lumbar_labels_path)
    roi = roi_from_vertebra(lab, "L3")
    margin = 5.0
    sp = extract_surface_points(ct, roi, budget=800, roi_margin_mm=margin)
    assert len(sp) == 800
    assert torch.isfinite(sp.points).all() and torch.isfinite(sp.gradients).all()
    # all points inside the L3 label dilated by the margin (nearest voxel, plus the sub-voxel shift)
    dil = roi.mask_on(ct, margin_mm=margin + 1.5)
    idx = torch.round(ct.world_to_index(sp.points)).long()
    assert bool(dil[idx[:, 2], idx[:, 1], idx[:, 0]].all())
    # most points lie on bone: within one voxel of a vertebra/sacrum label (TotalSegmentator 25..50)
    from scipy import ndimage

    bone = ((lab.data >= 25) & (lab.data <= 50)).numpy()
    near = torch.from_numpy(ndimage.binary_dilation(bone, iterations=1))
    assert float(near[idx[:, 2], idx[:, 1], idx[:, 0]].float().mean()) > 0.9
    # the CT just inside (along the gradient) is bone
    from scipy.ndimage import map_coordinates

    inner = ct.world_to_index(sp.points + 3.0 * sp.normals).numpy()
    hu = map_coordinates(ct.data.numpy(), inner[:, ::-1].T, order=1)
    assert float(np.mean(hu > 150.0)) > 0.8
