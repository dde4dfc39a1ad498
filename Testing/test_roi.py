"""Tests of the regions of interest (roi.py): boxes, label maps on other grids, margins, errors."""

from __future__ import annotations

import math

import pytest
import torch

from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.geometry import so3_exp
from PPCRegistrationLib.roi import BoxROI, LabelROI, roi_from_vertebra
from PPCRegistrationLib.volume import Volume
from PPCRegistrationLib.io import read_volume as _read


def _grid(shape=(30, 32, 34), spacing=(1.5, 1.5, 2.0), origin=(10.0, -20.0, 5.0), flip=True) -> Volume:
    m = torch.eye(4, dtype=torch.float64)
    d = torch.diag(torch.tensor([-1.0, -1.0, 1.0] if flip else [1.0, 1.0, 1.0], dtype=torch.float64))
    m[:3, :3] = d @ torch.diag(torch.tensor(spacing, dtype=torch.float64))
    m[:3, 3] = torch.tensor(origin, dtype=torch.float64)
    return Volume(torch.zeros(shape), m)


def _voxel_world(vol: Volume) -> torch.Tensor:
    k, j, i = vol.shape
    kk, jj, ii = torch.meshgrid(torch.arange(k), torch.arange(j), torch.arange(i), indexing="ij")
    ijk = torch.stack([ii, jj, kk], -1).to(torch.float64)
    return vol.index_to_world(ijk)  # (K, J, I, 3)


def test_box_mask_matches_world_containment():
    vol = _grid()
    center = vol.center_world() + torch.tensor([3.0, -2.0, 4.0], dtype=torch.float64)
    box = BoxROI(center, (12.0, 9.0, 20.0))
    mask = box.mask_on(vol)
    w = _voxel_world(vol)
    local = w - center
    expect = (local.abs() <= torch.tensor([6.0, 4.5, 10.0], dtype=torch.float64) + 1e-9).all(-1)
    assert torch.equal(mask, expect)
    assert mask.shape == vol.shape and mask.dtype == torch.bool
    b = box.bounds_world()
    assert torch.allclose(b, torch.stack([center - torch.tensor([6.0, 4.5, 10.0], dtype=torch.float64),
                                          center + torch.tensor([6.0, 4.5, 10.0], dtype=torch.float64)]))


def test_oriented_box_and_margin():
    vol = _grid(flip=False)
    axes = so3_exp(torch.tensor([0.0, 0.0, math.pi / 4], dtype=torch.float64))
    c = vol.center_world()
    box = BoxROI(c, (20.0, 6.0, 10.0), axes)
    mask = box.mask_on(vol)
    w = _voxel_world(vol)
    local = (w - c) @ axes
    expect = (local.abs() <= torch.tensor([10.0, 3.0, 5.0], dtype=torch.float64) + 1e-9).all(-1)
    assert torch.equal(mask, expect)
    # the margin dilates: every voxel within 3 mm of the box (Euclidean) is in
    dil = box.mask_on(vol, margin_mm=3.0)
    assert bool((dil | ~mask).all()) and int(dil.sum()) > int(mask.sum())
    d_out = (local.abs() - torch.tensor([10.0, 3.0, 5.0], dtype=torch.float64)).clamp_min(0).norm(dim=-1)
    assert bool(dil[d_out <= 2.0].all())  # voxel-discretised distance: allow 1 mm of slack
    assert not bool(dil[d_out > 3.0 + 2.6].any())


def test_label_roi_same_and_other_grid():
    lab = _grid(shape=(40, 40, 40), spacing=(1.0, 1.0, 1.0), flip=True)
    w = _voxel_world(lab)
    c = lab.center_world()
    r = (w - c).norm(dim=-1)
    data = torch.where(r < 8.0, 7.0, 0.0) + torch.where((r >= 8.0) & (r < 12.0), 3.0, 0.0)
    lab = lab.with_data(data)
    roi = LabelROI(lab, [7])
    assert torch.equal(roi.mask_on(lab), data == 7)
    # a CT on another grid (coarser, shifted, not flipped): nearest-neighbour via world coordinates
    ct = _grid(shape=(20, 22, 24), spacing=(2.0, 2.0, 2.5), origin=(-30.0, -60.0, -25.0), flip=False)
    m = roi.mask_on(ct)
    rc = (_voxel_world(ct) - c).norm(dim=-1)
    assert bool(m[rc < 7.0].all()) and not bool(m[rc > 9.0].any()) and int(m.sum()) > 0
    # several ids
    m2 = LabelROI(lab, [3, 7]).mask_on(ct)
    assert bool(m2[rc < 11.0].all()) and not bool(m2[rc > 13.0].any())
    b = roi.bounds_world()
    assert torch.all(b[0] < c) and torch.all(b[1] > c) and torch.all((b[1] - b[0]) < 20)


def test_empty_roi_errors():
    vol = _grid()
    far = BoxROI(vol.center_world() + 1000.0, (5.0, 5.0, 5.0))
    with pytest.raises(InputError, match="contains no voxels of the CT"):
        far.mask_on(vol)
    with pytest.raises(InputError, match="contains no voxels of the CT"):
        LabelROI(vol, [29])
    with pytest.raises(InputError):
        BoxROI((0, 0, 0), (1, -1, 1))
    with pytest.raises(InputError, match="unknown vertebra"):
        roi_from_vertebra(vol, "X9")
    with pytest.raises(InputError, match="L3"):
        roi_from_vertebra(vol, "L3")


def test_vertebra_roi_real(lumbar_ct_path, lumbar_labels_path):
    ct, lab = _read(lumbar_ct_path), _read(lumbar_labels_path)
    roi = roi_from_vertebra(lab, "L3")
    assert roi.label_ids == [29]
    mask = roi.mask_on(ct)
    assert int(mask.sum()) == int((lab.data == 29).sum())
    assert torch.equal(roi_from_vertebra(lab, "vertebrae_l3").mask_on(ct), mask)
    b = roi.bounds_world()
    assert bool((b[1] - b[0] > 20).all()) and bool((b[1] - b[0] < 150).all())
