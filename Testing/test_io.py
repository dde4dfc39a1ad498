"""File I/O: CT volumes, label maps, DICOM series, X-ray images and their DICOM geometry."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from PPCRegistrationLib import io
from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.geometry import carm_pose
from PPCRegistrationLib.volume import Volume


@pytest.fixture(scope="session")
def lumbar_ct(lumbar_ct_path):
    return io.read_volume(lumbar_ct_path)


@pytest.fixture(scope="session")
def radiograph_path(tmp_path_factory) -> Path:
    """The real CR chest radiograph, fetched once per test session into a temporary cache shared with
    test_sample_data.py (same folder under pytest's base temp)."""
    from PPCRegistrationLib import sample_data

    cache = tmp_path_factory.getbasetemp() / "ppcreg-sample-cache"
    try:
        return sample_data.fetch_radiograph(cache_dir=cache, progress=False)
    except Exception as exc:  # no network / registry
        pytest.skip(f"sample radiograph unavailable: {exc}")


# ============================================================================= CT volumes


def test_read_lumbar_ct(lumbar_ct):
    v = lumbar_ct
    assert v.shape == (112, 101, 122)
    assert v.data.dtype == torch.float32
    assert torch.allclose(v.spacing, torch.full((3,), 3.0, dtype=torch.float64))
    assert float(v.data.min()) == -1207.0 and float(v.data.max()) == 3382.0
    # a RAS NIfTI read in ITK's LPS frame: the first two axes flip sign
    d = v.ijk_to_world[:3, :3] / 3.0
    assert torch.allclose(d, torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)), atol=1e-6)


def test_resample_isotropic_real_ct(lumbar_ct):
    """The lumbar CT (3 mm) resampled to 6 mm voxels: the same extent, origin and frame, half the voxels per axis,
    the mean HU of the body kept, the bone's peak HU lowered by the averaging; resampling to its own 3 mm changes
    nothing but interpolation rounding; a bad size is refused."""
    v = lumbar_ct
    c = io.resample_isotropic(v, 6.0)
    assert c.shape == tuple(round(n / 2) for n in v.shape)
    assert torch.allclose(c.spacing, torch.full((3,), 6.0, dtype=torch.float64))
    assert torch.allclose(c.ijk_to_world[:3, 3], v.ijk_to_world[:3, 3])  # same origin ...
    assert torch.allclose(c.ijk_to_world[:3, :3] / 6.0, v.ijk_to_world[:3, :3] / 3.0)  # ... and frame (LPS)
    body_v, body_c = v.data[v.data > -500], c.data[c.data > -500]
    assert abs(float(body_v.mean()) - float(body_c.mean())) < 25.0
    assert float(c.data.max()) < float(v.data.max())  # fine bone details are averaged out
    same = io.resample_isotropic(v, 3.0)
    assert same.shape == v.shape and float((same.data - v.data).abs().max()) < 1.0
    with pytest.raises(InputError, match="positive"):
        io.resample_isotropic(v, 0.0)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_volume_round_trip(lumbar_ct, tmp_path, suffix):
    f = io.write_volume(tmp_path / f"ct{suffix}", lumbar_ct)
    back = io.read_volume(f)
    assert back.shape == lumbar_ct.shape
    assert torch.equal(back.data, lumbar_ct.data)
    assert torch.allclose(back.ijk_to_world, lumbar_ct.ijk_to_world, atol=1e-5, rtol=0)


def test_read_label_map(lumbar_ct, lumbar_labels_path):
    labels = io.read_label_map(lumbar_labels_path, lumbar_ct)
    assert labels.data.dtype == torch.int32 and labels.shape == lumbar_ct.shape
    ids = set(torch.unique(labels.data).tolist())
    assert {25, 27, 28, 29, 30, 31}.issubset(ids)  # sacrum, L5..L1
    # onto a different grid (a crop): nearest-neighbour resampling gives the cropped labels
    crop = lumbar_ct.crop((10, 5, 20), (100, 90, 80))
    on_crop = io.read_label_map(lumbar_labels_path, crop)
    assert on_crop.shape == crop.shape
    assert torch.equal(on_crop.data, labels.data[20:80, 5:90, 10:100])
    assert torch.equal(on_crop.ijk_to_world, crop.ijk_to_world)


def test_label_map_resampled_to_finer_grid(lumbar_ct, lumbar_labels_path):
    labels = io.read_label_map(lumbar_labels_path)
    fine = lumbar_ct.ijk_to_world.clone()
    fine[:3, :3] /= 2  # a 1.5 mm grid with the same first voxel centre
    ref = Volume(torch.zeros(20, 30, 40), fine)
    out = io.read_label_map(lumbar_labels_path, ref)
    assert out.shape == (20, 30, 40) and torch.equal(out.ijk_to_world, fine)
    # even reference indices fall exactly on label voxel centres
    assert torch.equal(out.data[::2, ::2, ::2], labels.data[:10, :15, :20])
    # a grid partly outside the label map gets background there
    shifted = lumbar_ct.ijk_to_world.clone()
    shifted[:3, 3] -= shifted[:3, 0] * 5  # five voxels before i = 0
    out2 = io.read_label_map(lumbar_labels_path, Volume(torch.zeros(112, 101, 122), shifted))
    assert (out2.data[:, :, :5] == 0).all() and torch.equal(out2.data[:, :, 5:], labels.data[:, :, :117])


def test_read_dicom_series(shared_data):
    d = shared_data / "ct_dicom_series"
    v = io.read_volume(d)
    assert v.shape == (20, 512, 512)
    assert torch.allclose(v.spacing, torch.tensor([0.977, 0.977, 2.0], dtype=torch.float64), atol=1e-3)
    assert float(v.data.min()) <= -1000 and float(v.data.max()) > 300  # HU (rescale applied)
    # slices sorted along the normal: slice k is at the k-th smallest ImagePositionPatient z
    zs = []
    for f in sorted(d.glob("*.dcm")):
        r = sitk.ImageFileReader()
        r.SetFileName(str(f))
        r.ReadImageInformation()
        zs.append(float(r.GetMetaData("0020|0032").split("\\")[2]))
    zs = np.sort(np.array(zs))
    k_world = np.array([float(v.index_to_world(torch.tensor([[0.0, 0.0, float(k)]], dtype=torch.float64))[0, 2])
                        for k in range(20)])
    assert np.allclose(k_world, zs if v.ijk_to_world[2, 2] > 0 else zs[::-1], atol=1e-3)


def test_label_map_rejects_intensities(tmp_path):
    img = sitk.GetImageFromArray(np.full((4, 5, 6), 0.5, np.float32))
    sitk.WriteImage(img, str(tmp_path / "f.nrrd"))
    with pytest.raises(InputError, match="non-integer"):
        io.read_label_map(tmp_path / "f.nrrd")


# ============================================================================= bad inputs


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(InputError, match="not found"):
        io.read_volume(tmp_path / "absent.nii.gz")
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(37))
    with pytest.raises(InputError, match="cannot read the CT volume.*corrupt"):
        io.read_volume(bad)
    with pytest.raises(InputError, match="cannot read"):
        io.read_xray(bad, 0.3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        io.read_volume(tmp_path / "empty")
    with pytest.raises(InputError, match="not found"):
        io.read_xray(tmp_path / "absent.dcm")


def test_2d_image_as_ct(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((30, 40), np.uint8)), str(tmp_path / "x.png"))
    with pytest.raises(InputError, match="2D image of size 40x30.*CT volume is expected"):
        io.read_volume(tmp_path / "x.png")
    img = sitk.GetImageFromArray(np.zeros((1, 30, 40), np.int16))
    sitk.WriteImage(img, str(tmp_path / "slice.nrrd"))
    with pytest.raises(InputError, match="2D image"):
        io.read_volume(tmp_path / "slice.nrrd")


def test_nan_voxels(tmp_path):
    a = np.zeros((4, 5, 6), np.float32)
    a[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(a), str(tmp_path / "nan.mha"))
    with pytest.raises(InputError, match="1 NaN voxels"):
        io.read_volume(tmp_path / "nan.mha")


def test_zero_or_missing_spacing(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    img.SetSpacing((2.0, 3.0, 4.0))
    sitk.WriteImage(img, str(tmp_path / "a.nii"))
    raw = bytearray((tmp_path / "a.nii").read_bytes())
    raw[80:92] = struct.pack("<3f", 0.0, 0.0, 0.0)  # pixdim[1..3]
    (tmp_path / "zero.nii").write_bytes(raw)
    (tmp_path / "zero.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    for name in ("zero.nii", "zero.nii.gz"):
        with pytest.raises(InputError, match="zero or missing voxel spacing.*pixdim"):
            io.read_volume(tmp_path / name)
    (tmp_path / "v.raw").write_bytes(np.zeros((4, 4, 4), np.int16).tobytes())
    (tmp_path / "zero.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\n"
                                       "ElementSpacing = 0 0 0\nElementDataFile = v.raw\n")
    (tmp_path / "nospacing.nhdr").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n"
                                             "data file: v.raw\n")
    with pytest.raises(InputError, match="ElementSpacing"):
        io.read_volume(tmp_path / "zero.mhd")
    with pytest.raises(InputError, match="neither 'spacings'"):
        io.read_volume(tmp_path / "nospacing.nhdr")


# ============================================================================= X-ray images


def _write_xa(path: Path, arr: np.ndarray, spacing_uv=(0.31, 0.2), **tags: str) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing_uv)  # GDCM writes it as ImagerPixelSpacing (row\col) for XA
    img.SetMetaData("0008|0060", "XA")
    for k, v in tags.items():
        img.SetMetaData(k, v)
    sitk.WriteImage(img, str(path))
    return path


XA_TAGS = {"0018|1110": "1195.5", "0018|1111": "780.25", "0018|1510": "-30.5", "0018|1511": "12"}


def test_synthetic_xa_geometry(tmp_path):
    rng = np.random.default_rng(1)
    arr = (rng.random((64, 80)) * 1000).astype(np.uint16)
    f = _write_xa(tmp_path / "xa.dcm", arr, **XA_TAGS)
    x = io.read_xray(f)
    assert x.image.shape == (64, 80) and x.image.dtype == torch.float32
    assert np.array_equal(x.image.numpy(), arr.astype(np.float32))  # MONOCHROME2: kept
    g = x.geometry
    assert g.modality == "XA" and g.photometric == "MONOCHROME2" and not g.inverted
    assert (g.sdd, g.sid, g.primary_deg, g.secondary_deg) == (1195.5, 780.25, -30.5, 12.0)
    assert g.imager_pixel_spacing == pytest.approx((0.31, 0.2))
    assert x.pixel_spacing.tolist() == pytest.approx([0.31, 0.2])  # (u, v)

    iso = torch.tensor([10.0, -20.0, 30.0], dtype=torch.float64)
    proj = io.projection_from_xray(x, iso)
    assert (proj.height, proj.width) == (64, 80)
    assert float(proj.sdd[0]) == pytest.approx(1195.5)
    assert float(torch.linalg.norm(proj.source[0] - iso)) == pytest.approx(780.25)
    pose = carm_pose(-30.5, 12.0, 780.25, iso, "LPS")
    assert torch.allclose(proj.world_from_camera, pose, atol=1e-9)
    # the isocentre projects to the image centre
    uv = proj.project(iso[None, None])[0, 0]
    assert torch.allclose(uv, torch.tensor([39.5, 31.5], dtype=torch.float64), atol=1e-9)


def test_projection_from_xray_missing_tags(tmp_path):
    arr = np.zeros((32, 40), np.uint16)
    x = io.read_xray(_write_xa(tmp_path / "xa.dcm", arr, **{"0018|1110": "1200"}))
    with pytest.raises(InputError) as err:
        io.projection_from_xray(x, [0.0, 0.0, 0.0])
    msg = str(err.value)
    for tag in ("DistanceSourceToPatient (0018,1111)", "PositionerPrimaryAngle (0018,1510)",
                "PositionerSecondaryAngle (0018,1511)", "sid=", "primary_deg="):
        assert tag in msg
    assert "DistanceSourceToDetector" not in msg
    proj = io.projection_from_xray(x, [0.0, 0.0, 0.0], sid=750.0, primary_deg=0.0, secondary_deg=0.0)
    assert float(proj.sdd[0]) == pytest.approx(1200.0)


def test_monochrome1_polarity_synthetic(tmp_path):
    """A MONOCHROME1 file (low stored values = bright) comes back bone-bright: high values where stored low."""
    arr = np.tile(np.arange(0, 4000, 50, dtype=np.uint16), (16, 1))
    f = _write_xa(tmp_path / "m2.dcm", arr)
    raw = f.read_bytes()
    assert raw.count(b"MONOCHROME2") == 1
    (tmp_path / "m1.dcm").write_bytes(raw.replace(b"MONOCHROME2", b"MONOCHROME1"))
    x = io.read_xray(tmp_path / "m1.dcm")
    assert x.geometry.photometric == "MONOCHROME1" and x.geometry.inverted
    row = x.image[0].numpy()
    assert np.all(np.diff(row) < 0)  # stored values increase along the row -> attenuation decreases
    assert np.allclose(np.diff(row), -50)
    # invert=True undoes it
    y = io.read_xray(tmp_path / "m1.dcm", invert=True)
    assert np.all(np.diff(y.image[0].numpy()) > 0) and not y.geometry.inverted


def test_real_radiograph(radiograph_path):
    with pytest.raises(InputError, match=r"PixelSpacing \(0028,0030\) is '0.000.*--pixel-spacing"):
        io.read_xray(radiograph_path)  # the file's PixelSpacing is 0\0 and it has no ImagerPixelSpacing
    x = io.read_xray(radiograph_path, pixel_spacing=0.15)
    assert x.image.shape == (1955, 1841)
    assert x.pixel_spacing.tolist() == [0.15, 0.15]
    g = x.geometry
    assert g.modality == "CR" and g.photometric == "MONOCHROME1" and g.inverted
    assert g.sdd == 1996.0 and g.imager_pixel_spacing is None and g.patient_orientation == "L\\F"
    # polarity: the mediastinum/spine (centre) is brighter than the lung fields on both sides
    img = x.image
    h, w = img.shape
    rows = slice(h // 3, 2 * h // 3)
    centre = img[rows, int(0.45 * w):int(0.55 * w)].mean()
    right_lung = img[rows, int(0.2 * w):int(0.3 * w)].mean()
    left_lung = img[rows, int(0.7 * w):int(0.8 * w)].mean()
    assert centre > right_lung + 2000 and centre > left_lung + 2000
    with pytest.raises(InputError, match="DistanceSourceToPatient"):
        io.projection_from_xray(x, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_xray_round_trip(tmp_path, suffix):
    img = torch.rand(30, 50)
    geom = io.XRayGeometry(modality="XA", sdd=1200.5, sid=780.0, primary_deg=15.0, secondary_deg=-5.0)
    x = io.XRayImage(img, torch.tensor([0.31, 0.29], dtype=torch.float64), geom)
    back = io.read_xray(io.write_xray(tmp_path / f"x{suffix}", x))
    assert torch.equal(back.image, x.image)
    assert back.pixel_spacing.tolist() == pytest.approx([0.31, 0.29])
    if suffix != ".nii.gz":  # NIfTI has no free-form header fields
        g = back.geometry
        assert (g.modality, g.sdd, g.sid, g.primary_deg, g.secondary_deg) == ("XA", 1200.5, 780.0, 15.0, -5.0)


def test_png_xray(tmp_path):
    x = io.XRayImage(torch.linspace(0, 1, 40 * 60).reshape(40, 60), 0.3)
    f = io.write_xray(tmp_path / "x.png", x)
    with pytest.raises(InputError, match=r"\(.png files never do\).*--pixel-spacing"):
        io.read_xray(f)
    back = io.read_xray(f, pixel_spacing=(0.3, 0.25))
    assert back.image.shape == (40, 60) and back.pixel_spacing.tolist() == [0.3, 0.25]
    assert back.image[0, 0] < back.image[-1, -1]  # polarity kept
    assert float(back.image.min()) == 0.0 and float(back.image.max()) == 255.0
    # colour PNG -> grey
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, 15:] = 200
    io.save_png(tmp_path / "c.png", rgb)
    c = io.read_xray(tmp_path / "c.png", 1.0)
    assert c.image.shape == (20, 30) and float(c.image[0, 20]) == 200.0
    # explicit window
    io.save_png(tmp_path / "w.png", np.array([[0.0, 50.0], [100.0, 200.0]]), window=(0, 100))
    w = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "w.png")))
    assert w.tolist() == [[0, 128], [255, 255]]


def test_xray_dimensionality(tmp_path):
    vol = sitk.GetImageFromArray(np.zeros((5, 30, 40), np.float32))
    sitk.WriteImage(vol, str(tmp_path / "v.nrrd"))
    with pytest.raises(InputError, match="expected a 2D X-ray, got a 3D volume of size 40x30x5"):
        io.read_xray(tmp_path / "v.nrrd")
    frames = np.stack([np.full((30, 40), k, np.float32) for k in range(5)])
    sitk.WriteImage(sitk.GetImageFromArray(frames), str(tmp_path / "seq.mha"))
    assert float(io.read_xray(tmp_path / "seq.mha", frame=3).image.mean()) == 3.0
    one = sitk.GetImageFromArray(np.ones((1, 30, 40), np.float32))
    one.SetSpacing((0.2, 0.3, 1.0))
    sitk.WriteImage(one, str(tmp_path / "one.nrrd"))
    x = io.read_xray(tmp_path / "one.nrrd")
    assert x.image.shape == (30, 40) and x.pixel_spacing.tolist() == pytest.approx([0.2, 0.3])
    with pytest.raises(InputError, match="number or \\(u, v\\)"):
        io.read_xray(tmp_path / "one.nrrd", pixel_spacing=(1.0, 2.0, 3.0))
    with pytest.raises(InputError, match="positive"):
        io.read_xray(tmp_path / "one.nrrd", pixel_spacing=-1.0)
    with pytest.raises(InputError, match="must be 2D"):
        io.XRayImage(torch.zeros(2, 3, 4), 1.0)
    with pytest.raises(InputError, match="positive"):
        io.XRayImage(torch.zeros(3, 4), 0.0)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_linear_dicom_gets_the_log_transform(tmp_path, photometric):
    """PixelIntensityRelationship LIN: the stored values are exposures E of a detector behind a slab of growing
    thickness (E = E0 exp(-mu x)); the X-ray comes back as -log(E), linear in x and attenuation-positive."""
    x = np.arange(64, dtype=np.float64)
    exposure = np.round(4000.0 * np.exp(-0.04 * x)).astype(np.uint16)
    arr = np.tile(exposure, (8, 1))
    f = _write_xa(tmp_path / "lin2.dcm", arr, **{"0028|1040": "LIN"})
    if photometric == "MONOCHROME1":
        raw = f.read_bytes()
        f = tmp_path / "lin1.dcm"
        f.write_bytes(raw.replace(b"MONOCHROME2", b"MONOCHROME1"))
    xr = io.read_xray(f)
    assert xr.geometry.log_applied
    row = xr.image[0].numpy().astype(np.float64)
    if photometric == "MONOCHROME1":
        # MONOCHROME1 only says how to display: the stored exposures, and so the result, are the same
        assert xr.geometry.inverted
    assert np.all(np.diff(row) > 0)  # more attenuation along the row
    slope = np.polyfit(x[:40], row[:40], 1)[0]
    assert slope == pytest.approx(0.04, rel=0.08)
    plain = io.read_xray(_write_xa(tmp_path / "log.dcm", arr))
    assert not plain.geometry.log_applied


def test_real_radiograph_downsampled_to_the_registration_grid(radiograph_path):
    """RG1 (1955 x 1841 px CR, no spacing tag) on a registration grid: block means, spacing scaled, input kept."""
    x = io.read_xray(radiograph_path, pixel_spacing=0.2)
    y = x.downsampled(512)
    assert (y.height, y.width) == (1955 // 4, 1841 // 4)
    assert torch.allclose(y.pixel_spacing, torch.tensor([0.8, 0.8], dtype=torch.float64))
    assert float(y.image[10, 20]) == pytest.approx(float(x.image[40:44, 80:84].mean()), rel=1e-5)
    assert x.image.shape == (1955, 1841)
    assert x.downsampled(2000) is x
    with pytest.raises(InputError, match="at least 8"):
        x.downsampled(4)
