"""The cached training data set (PPCRegistrationLib.dataset) and ``ppcreg make-dataset``, on the real sample chest
CT: fields, shapes and masks, the ground-truth flow, resume, refused settings and corrupt shards.

The tiny data set (Testing/tiny_data.py: the chest CT cropped around vertebra T8, 64-pixel windows) is generated
once per session.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import tiny_data
from PPCRegistrationLib.cli import main
from PPCRegistrationLib.dataset import FIELDS, ShardDataset, generate_split, make_sample, read_manifest, \
    sample_projection
from PPCRegistrationLib.errors import InputError
from PPCRegistrationLib.geometry import invert_rigid, transform_points
from PPCRegistrationLib.metrics import mtre
from PPCRegistrationLib.simulation import XRayVariation


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory, chest_ct_paths) -> Path:
    return tiny_data.tiny_dataset(tmp_path_factory, chest_ct_paths)


@pytest.fixture(scope="module")
def chest(chest_ct_paths) -> dict:
    return tiny_data.chest_ct(chest_ct_paths)


@pytest.fixture(scope="module")
def chest_files(tmp_path_factory, chest_ct_paths) -> dict:
    return tiny_data.chest_ct_files(tmp_path_factory, chest_ct_paths)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _rigid(T: torch.Tensor) -> bool:
    R = T[:3, :3]
    return bool(torch.allclose(R.T @ R, torch.eye(3, dtype=T.dtype), atol=1e-9)) and \
        abs(float(torch.linalg.det(R)) - 1) < 1e-9 and bool((T[3] == torch.tensor([0, 0, 0, 1.0], dtype=T.dtype)).all())


# ----------------------------------------------------------------------------- fields, shapes, masks


def test_manifest_and_splits(root):
    man = read_manifest(root)
    assert set(man["splits"]) == {"train", "val"}
    tr = man["splits"]["train"]
    assert tr["n_samples"] == 4 and tr["shard_size"] == 2 and tr["vertebrae"] == ["T8"]
    assert tr["shards"] == ["shard_00000.pt", "shard_00001.pt"]
    assert tr["config"]["crop_px"] == 64 and tr["config"]["detector_px"] == 128
    assert json.loads((root / "train" / "split.json").read_text())["seed"] == 0
    assert len(ShardDataset(root, "train")) == 4 and ShardDataset(root, "train").complete
    assert len(ShardDataset(root, "train", limit=3)) == 3


def test_several_splits_are_used_as_one(root, tmp_path):
    both = ShardDataset(root, "train,val")
    train, val = ShardDataset(root, "train"), ShardDataset(root, "val")
    assert len(both) == len(train) + len(val) == 6 and both.complete and both.vertebrae == ["T8"]
    assert torch.equal(both[4]["xray"], val[0]["xray"]) and torch.equal(both[0]["uv"], train[0]["uv"])
    assert both[5]["vertebra"] == 0 and both.image_size == train.image_size
    assert len(ShardDataset(root, "train, val", limit=5)) == 5
    with pytest.raises(InputError, match="has no split 'test'"):
        ShardDataset(root, "train,test")


def test_sample_fields_shapes_and_masks(root):
    data = ShardDataset(root, "train")
    n, m = tiny_data.tiny_config().max_points, tiny_data.tiny_config().n_targets
    assert data.image_size == (64, 64)
    for i in range(len(data)):
        s = data[i]
        assert set(s) == set(FIELDS)
        shapes = {"xray": (64, 64), "drr": (64, 64), "K": (3, 3), "R": (3, 3), "t": (3,), "T_init": (4, 4),
                  "T_gt": (4, 4), "points": (n, 3), "gradients": (n, 3), "uv": (n, 2), "flow_gt": (n, 2),
                  "mask": (n,), "targets": (m, 3), "initial_mtre": (), "vertebra": ()}
        for k, shape in shapes.items():
            assert tuple(s[k].shape) == shape, k
            assert s[k].dtype == torch.bool or torch.isfinite(s[k]).all(), k
        assert s["xray"].dtype == s["drr"].dtype == s["uv"].dtype == s["flow_gt"].dtype == torch.float32
        assert s["points"].dtype == s["T_init"].dtype == torch.float64 and s["mask"].dtype == torch.bool
        assert int(s["vertebra"]) == 0
        assert _rigid(s["T_init"]) and _rigid(s["T_gt"]) and _rigid(torch.cat(
            [torch.cat([s["R"], s["t"][:, None]], 1), torch.tensor([[0, 0, 0, 1.0]], dtype=torch.float64)]))
        mask = s["mask"]
        k = int(mask.sum())
        assert 6 <= k <= n
        assert mask[:k].all() and not mask[k:].any(), "real points first, padding after"
        assert (s["flow_gt"][~mask] == 0).all()
        # the window shows the vertebra: bone (bright) in both images, and they differ (initial error)
        assert float(s["xray"].std()) > 0 and float(s["drr"].std()) > 0
        assert 0 <= float(s["initial_mtre"]) <= 45.0 + 1e-6
        # uv are the projections of the (moved) contour points, inside the window
        proj = sample_projection(s, 64, 64)
        uv = proj.project(s["points"][None])[0]
        assert torch.allclose(uv[mask].float(), s["uv"][mask], atol=1e-3)
        assert (s["uv"][mask] >= 1).all() and (s["uv"][mask] <= 62).all()
        # contour points: the gradient is (nearly) perpendicular to the ray through the point
        ray = s["points"][mask] - proj.source[0]
        cosang = (torch.nn.functional.normalize(ray, dim=-1)
                  * torch.nn.functional.normalize(s["gradients"][mask], dim=-1)).sum(-1).abs()
        assert float(cosang.max()) <= math.sin(math.radians(tiny_data.tiny_config().contour_theta_deg)) + 1e-6
        # the mTRE over the stored targets (a subset of the vertebra's surface points) is the initial mTRE's
        m_t = float(mtre(s["T_init"], s["T_gt"], s["targets"]))
        assert abs(m_t - float(s["initial_mtre"])) <= 0.15 * float(s["initial_mtre"]) + 0.5


def test_flow_gt_is_the_projection_of_the_ground_truth_motion(root):
    data = ShardDataset(root, "train")
    moved = 0
    for i in range(len(data)):
        s = data[i]
        mask = s["mask"]
        proj = sample_projection(s, 64, 64)
        w_gt = transform_points(s["T_gt"] @ invert_rigid(s["T_init"]), s["points"][mask])
        expect = proj.project(w_gt[None])[0] - s["uv"][mask].double()
        assert torch.allclose(s["flow_gt"][mask].double(), expect, atol=1e-3)
        moved += float(expect.norm(dim=-1).mean()) > 0.1
    assert moved >= 3, "the initial estimates should move most contour points"


def test_flow_gt_is_zero_when_T_init_is_T_gt(chest):
    cfg = replace(tiny_data.tiny_config(), mtre_range_mm=(0.0, 0.0))
    s = make_sample(chest["renderer"], chest["surface"], 5, cfg, XRayVariation.none())
    assert torch.equal(s["T_init"], s["T_gt"])
    assert float(s["initial_mtre"]) == pytest.approx(0.0, abs=1e-9)
    assert int(s["mask"].sum()) >= 6
    assert float(s["flow_gt"].abs().max()) < 1e-3
    # without appearance variation, the X-ray at T_gt is the DRR at T_init = T_gt (up to the intensity scale)
    x, d = s["xray"].double().flatten(), s["drr"].double().flatten()
    corr = float(torch.corrcoef(torch.stack([x, d]))[0, 1])
    assert corr > 0.999, corr


# ----------------------------------------------------------------------------- resume, settings, corrupt shards


def test_resume_skips_finished_shards_and_regenerates_identically(root, chest, chest_ct_paths):
    cfg = tiny_data.tiny_config()
    kw = dict(seed=7, shard_size=1, config=cfg, progress=False, renderer=chest["renderer"])
    generate_split(root, "resume", chest["ct"], chest["rois"], 3, **kw)
    folder = root / "resume"
    shards = [folder / f"shard_{i:05d}.pt" for i in range(3)]
    stamps = [p.stat().st_mtime_ns for p in shards]
    original = torch.load(shards[1], weights_only=True)
    shards[1].unlink()
    entry = generate_split(root, "resume", chest["ct"], chest["rois"], 3, **kw)
    assert entry["shards"] == [p.name for p in shards]
    assert [shards[0].stat().st_mtime_ns, shards[2].stat().st_mtime_ns] == [stamps[0], stamps[2]], \
        "finished shards must not be rewritten"
    again = torch.load(shards[1], weights_only=True)
    for k in FIELDS:  # generation is deterministic: the regenerated shard equals the lost one
        assert torch.equal(original[k], again[k]), k
    assert not list(folder.glob("*.tmp*")), "no temporary files left behind"
    assert len(ShardDataset(root, "resume")) == 3


def test_changed_settings_are_refused(root, chest):
    cfg = tiny_data.tiny_config()
    with pytest.raises(InputError, match="other settings"):
        generate_split(root, "train", chest["ct"], chest["rois"], 4, seed=1, shard_size=2, config=cfg,
                       progress=False, renderer=chest["renderer"])
    with pytest.raises(InputError, match="other settings"):
        generate_split(root, "train", chest["ct"], chest["rois"], 4, seed=0, shard_size=2,
                       config=replace(cfg, mtre_range_mm=(0.0, 20.0)), progress=False, renderer=chest["renderer"])


def test_corrupt_or_missing_shard_gives_a_clear_error(root, tmp_path):
    bad = tmp_path / "ds"
    shutil.copytree(root, bad)
    p = bad / "train" / "shard_00001.pt"
    p.write_bytes(p.read_bytes()[:1000])  # truncated (an interrupted copy)
    with pytest.raises(InputError, match=r"cannot read .*shard_00001\.pt.*make-dataset"):
        ShardDataset(bad, "train")
    torch.save({"xray": torch.zeros(2, 64, 64)}, p)  # a shard of another program
    with pytest.raises(InputError, match="lacks fields"):
        ShardDataset(bad, "train")
    p.unlink()
    with pytest.raises(InputError, match="cannot read"):
        ShardDataset(bad, "train")
    with pytest.raises(InputError, match="no split 'test'"):
        ShardDataset(bad, "test")
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not readable JSON"):
        ShardDataset(bad, "train")
    with pytest.raises(InputError, match="no manifest.json"):
        ShardDataset(tmp_path, "train")


# ----------------------------------------------------------------------------- ppcreg make-dataset


def test_cli_make_dataset_writes_and_resumes(capsys, tmp_path, chest_files):
    out = tmp_path / "ds"
    argv = ["make-dataset", "--ct", chest_files["ct"], "--labels", chest_files["labels"], "--vertebrae", "t8",
            "--split", "val", "--samples", "2", "--shard-size", "1",
            "--detector-px", "128", "--crop-px", "64", "--mtre-range", "0", "20", "--seed", "3", "--out", out,
            "--quiet", "--threads", "1"]
    code, text, err = run(capsys, *argv)
    assert code == 0, err
    assert "wrote 2 shard(s)" in text and "has 2/2 shards" in text and str(out / "manifest.json") in text
    entry = read_manifest(out)["splits"]["val"]
    assert entry["vertebrae"] == ["T8"] and entry["seed"] == 3 and entry["config"]["mtre_range_mm"] == [0.0, 20.0]
    data = ShardDataset(out, "val")
    assert len(data) == 2 and data.image_size == (64, 64)
    assert all(0 <= float(data[i]["initial_mtre"]) <= 20 + 1e-6 for i in range(2))
    stamp = (out / "val" / "shard_00000.pt").stat().st_mtime_ns
    code, text, _ = run(capsys, *argv)  # rerun: complete, nothing to do (the CT is not even read)
    assert code == 0 and "nothing to do" in text
    (out / "val" / "shard_00001.pt").unlink()
    code, text, _ = run(capsys, *argv)  # resume: only the missing shard
    assert code == 0 and "wrote 1 shard(s)" in text and "(1 already on disk)" in text
    assert (out / "val" / "shard_00000.pt").stat().st_mtime_ns == stamp
    # a changed setting names the option, before any CT is read
    code, _, err = run(capsys, *[("5" if a == "3" else a) for a in argv])
    assert code == 2 and err.startswith("error: ") and "--seed: on disk 3, now 5" in err and "Traceback" not in err
    # samples of the same CT at a coarser resolution (another split), the label map following the CT's grid
    code, text, err = run(capsys, *[("lowres" if a == "val" else a) for a in argv], "--resample-mm", "3")
    assert code == 0, err
    entry = read_manifest(out)["splits"]["lowres"]
    assert entry["source"]["resample_mm"] == 3.0 and len(ShardDataset(out, "lowres")) == 2
    code, _, err = run(capsys, *[("lowres2" if a == "val" else a) for a in argv], "--resample-mm", "-1")
    assert code == 2 and "--resample-mm must be a positive" in err


@pytest.mark.parametrize("extra, fragment", [
    (["--vertebrae", "T8,X9"], "unknown vertebra 'X9'"),
    (["--vertebrae", "T8,t8"], "T8 more than once"),
    (["--vertebrae", "T8,"], "comma-separated"),
    (["--vertebrae", "T8", "--crop-px", "300"], "--crop-px (300) cannot be larger"),
    (["--vertebrae", "T8", "--mtre-range", "5", "1"], "--mtre-range needs 0 <= LO <= HI"),
])
def test_cli_make_dataset_errors(capsys, tmp_path, extra, fragment):
    code, out, err = run(capsys, "make-dataset", "--sample", "--split", "train", "--samples", "2", "--out",
                         tmp_path / "ds", "--quiet", *extra)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and fragment in err and "Traceback" not in err


def test_cli_make_dataset_input_errors(capsys, tmp_path, chest_files):
    code, _, err = run(capsys, "make-dataset", "--ct", chest_files["ct"], "--labels", chest_files["labels"],
                       "--vertebrae", "T8,L5", "--split", "a", "--samples", "1", "--out", tmp_path, "--quiet")
    assert code == 2 and "vertebra L5 (label id 27) is not in the label map" in err
    code, _, err = run(capsys, "make-dataset", "--ct", chest_files["ct"], "--vertebrae", "T8", "--split", "a",
                       "--samples", "1", "--out", tmp_path)
    assert code == 2 and "--ct needs --labels" in err
    code, _, err = run(capsys, "make-dataset", "--ct", tmp_path / "nope.nii.gz", "--labels", tmp_path / "l.nii.gz",
                       "--vertebrae", "T8", "--split", "a", "--samples", "1", "--out", tmp_path)
    assert code == 2 and "CT volume file not found" in err


def test_cli_make_dataset_help(capsys):
    code, out, _ = run(capsys, "make-dataset", "--help")
    assert code == 0 and "usage: ppcreg make-dataset" in out
    for opt in ("--vertebrae", "--split", "--samples", "--shard-size", "--mtre-range", "--detector-px", "--crop-px",
                "--part", "--threads"):
        assert opt in out, opt
